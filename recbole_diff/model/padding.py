"""Cutting padding out of right-padded batches.

RecBole trains sequential models on every prefix of every sequence, padded to ``MAX_ITEM_LIST_LENGTH``. In a
shuffled batch the longest row is nearly always the maximum length, so cutting the batch once to its longest
row saves little, while most rows are short (Amazon Sports: median length 6). Splitting the batch into groups
of similar length, each cut to its own longest row, removes most of the padding at the price of one extra
call per group.
"""

import numpy as np
import torch


def length_groups(lengths, max_groups):
    """Row indices of ``lengths`` [B] split into at most ``max_groups`` groups of consecutive lengths, with
    the boundaries that minimise the padded work ``sum_g rows_g * longest_g`` (exact dynamic programme over
    the distinct lengths). Returns a list of index tensors on ``lengths``' device."""
    order = torch.argsort(lengths)
    if max_groups <= 1:
        return [order]
    counts = np.bincount(lengths.cpu().numpy())
    values = np.nonzero(counts)[0]  # distinct lengths, ascending
    cum = np.concatenate([[0], np.cumsum(counts[values])])
    d, k_max = len(values), min(max_groups, len(values))
    # cost[k, j]: least work for the j shortest distinct lengths in k groups; arg[k, j]: where the last begins.
    cost = np.full((k_max + 1, d + 1), np.inf)
    arg = np.zeros((k_max + 1, d + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, d + 1):
            options = cost[k - 1, :j] + (cum[j] - cum[:j]) * values[j - 1]
            arg[k, j] = int(np.argmin(options))
            cost[k, j] = options[arg[k, j]]
    k = int(np.argmin(cost[1:, d])) + 1
    sizes, j = [], d
    while k > 0:
        i = arg[k, j]
        sizes.append(int(cum[j] - cum[i]))
        j, k = i, k - 1
    return list(order.split(sizes[::-1]))
