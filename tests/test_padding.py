import itertools

import torch

from recbole_diff.model.padding import length_groups


def work(groups, lengths):
    return sum(len(g) * int(lengths[g].max()) for g in groups)


def test_groups_partition_the_rows_by_length():
    torch.manual_seed(0)
    lengths = torch.randint(1, 51, (300,))
    groups = length_groups(lengths, 6)
    assert len(groups) <= 6
    assert sorted(torch.cat(groups).tolist()) == list(range(300))
    for a, b in zip(groups, groups[1:]):
        assert lengths[a].max() <= lengths[b].min()


def test_boundaries_are_optimal_against_brute_force():
    torch.manual_seed(1)
    lengths = torch.tensor([1, 1, 2, 2, 2, 3, 5, 8, 8, 13, 21, 21, 34, 50, 50, 50])
    values = sorted(set(lengths.tolist()))
    best = min(
        sum(
            int((lengths <= hi).sum() - (lengths <= lo).sum()) * hi for lo, hi in zip((0,) + cuts, cuts + (values[-1],))
        )
        for r in range(0, 3)
        for cuts in itertools.combinations(values[:-1], r)
    )
    assert work(length_groups(lengths, 3), lengths) == best
    assert work(length_groups(lengths, 1), lengths) == 16 * 50
