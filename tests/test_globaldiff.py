"""GlobalDiff: sample construction, the frozen backbone, Borda fusion, checkpoints and bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SLICE, TINY
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_diff import get_model, get_trainer
from recbole_diff.config import Config
from recbole_diff.data.globaldiff import (
    ItemSimilarity,
    bernoulli_targets,
    reweighted_targets,
    sample_mask_positions,
    training_pairs,
    user_sequences,
)
from recbole_diff.model.plugin.globaldiff import EVAL_MODES, GlobalDiff, borda_fuse, descending_order, fused_topk
from recbole_diff.quick_start import load_data_and_model, run_recbole_diff
from recbole_diff.trainer import GlobalDiffTrainer

FAST = dict(
    TINY,
    epochs=1,
    diffusion_epochs=2,
    hidden_size=16,
    inner_size=32,
    n_layers=1,
    n_heads=1,
    embedding_size=16,
    approx_hidden=16,
)


def build(backbone="SASRec", **overrides):
    config = Config(
        model="GlobalDiff", dataset=SLICE, backbone=backbone, config_dict=dict(FAST, **overrides), cmd_line=False
    )
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    return config, dataset, train, valid, test


def random_interactions(seed=0, n_users=30, n_items=12, n=120):
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, n_users, n), rng.integers(1, n_items, n)
    dense = np.zeros((n_users, n_items))
    dense[users, items] = 1
    norms = np.linalg.norm(dense, axis=0)
    ref = (dense.T @ dense) / np.maximum(np.outer(norms, norms), 1e-12)
    return users, items, n_users, n_items, ref


def test_sparse_and_dense_similarity_match_a_dense_reference():
    users, items, n_users, n_items, ref = random_interactions()
    ids = torch.arange(n_items)
    for kind in ("sparse", "dense"):
        sim = ItemSimilarity(users, items, n_users, n_items, kind=kind)
        assert np.allclose(sim.rows(ids).numpy(), ref, atol=1e-6)


def test_topk_keeps_each_rows_largest_and_the_diagonal():
    users, items, n_users, n_items, ref = random_interactions(1)
    rows = ItemSimilarity(users, items, n_users, n_items, topk=3).rows(torch.arange(1, n_items)).numpy()
    for r, i in zip(rows, range(1, n_items)):
        assert (r > 0).sum() <= 3 and r[i] == pytest.approx(1.0)
        top = np.sort(ref[i])[-3:]
        assert np.allclose(np.sort(r[r > 0]), top[top > 0], atol=1e-6)


def test_cluster_similarity_with_one_cluster_per_item_is_the_cosine():
    users, items, n_users, n_items, ref = random_interactions(2, n=200)
    seen = np.unique(items)
    sim = ItemSimilarity(users, items, n_users, n_items, kind="cluster", n_clusters=n_items)
    got = sim.rows(torch.as_tensor(seen)).numpy()[:, seen]
    assert np.allclose(got, ref[np.ix_(seen, seen)], atol=1e-4)
    assert sim.nbytes() < n_items * n_items * 4 * 2


def test_a_dense_similarity_too_large_for_memory_is_refused():
    with pytest.raises(MemoryError, match="similarity: sparse.*similarity: cluster"):
        ItemSimilarity(np.array([0]), np.array([1]), 1, 200_000, kind="dense", dense_limit_gb=4.0)


def test_position_reweighting_and_clipping_on_a_hand_worked_row():
    A = torch.zeros(1, 9)
    A[0, [3, 5, 7, 8]] = torch.tensor([0.2, 1.0, 0.7, 0.3])  # row of item 5
    seq, lens, pos = torch.tensor([[3, 5, 7, 0]]), torch.tensor([3]), torch.tensor([1])
    q = reweighted_targets(A, seq, lens, pos, zeta=1.5, delta=1.0, position_offset=1)
    # |i - j| = 1 -> 1.5 / 2 + 1 = 1.75; the masked item itself: min(2.5 * 1, 1) = 1
    assert q[0, 3].item() == pytest.approx(0.35)
    assert q[0, 5].item() == pytest.approx(1.0)
    assert q[0, 7].item() == pytest.approx(1.0)  # 1.75 * 0.7 = 1.225, clipped
    assert q[0, 8].item() == pytest.approx(0.3)  # not in the sequence: unchanged
    assert q[0, 0].item() == 0.0


def test_bernoulli_samples_have_the_right_mean():
    q = torch.tensor([[0.0, 0.1, 0.5, 0.9, 1.0]]).expand(20_000, 5)
    x0 = bernoulli_targets(q, torch.Generator().manual_seed(0))
    assert set(x0.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(x0.mean(0), q[0], atol=0.01)


def test_mask_positions_leave_a_prefix_for_causal_backbones():
    lens = torch.tensor([2, 5, 10] * 500)
    causal = sample_mask_positions(lens, causal=True)
    assert bool((causal >= 1).all() and (causal < lens).all())
    bidir = sample_mask_positions(lens, causal=False)
    assert bidir.min() == 0 and bool((bidir < lens).all())


def test_training_data_holds_no_held_out_interaction():
    config, dataset, train, valid, test = build()
    args = (train.dataset, "user_id", "item_id", "item_id_list", "item_length")
    users, items = training_pairs(*args)
    pairs = set(zip(users.tolist(), items.tolist()))
    for loader in (valid, test):
        inter = loader.dataset.inter_feat
        for u, i in zip(inter["user_id"].tolist(), inter["item_id"].tolist()):
            assert (u, i) not in pairs
    u, seqs, lens = user_sequences(*args, max_len=10)
    valid_inter = valid.dataset.inter_feat
    # the valid row's history ends with the same items as the user's training sequence
    by_user = {int(a): (s, n) for a, s, n in zip(u, seqs, lens)}
    for user, hist, n in zip(valid_inter["user_id"][:20], valid_inter["item_id_list"], valid_inter["item_length"]):
        s, m = by_user[int(user)]
        k = min(int(m), int(n))
        assert torch.equal(s[int(m) - k : int(m)], hist[int(n) - k : int(n)])


def _trained_sasrec(tiny, **overrides):
    result = run_recbole_diff(
        "SASRec",
        SLICE,
        cmd_line=False,
        config_dict=dict(tiny, epochs=2, hidden_size=16, inner_size=32, n_layers=1, n_heads=1, **overrides),
    )
    return result


def test_backbone_is_bit_identical_after_globaldiff_training(tiny):
    base = _trained_sasrec(tiny, extra_test_modes=["uni100"])
    before = torch.load(base["saved_model_file"], weights_only=False)["state_dict"]
    result = run_recbole_diff(
        "GlobalDiff",
        SLICE,
        backbone="SASRec",
        cmd_line=False,
        config_dict=dict(
            FAST,
            checkpoint_dir=tiny["checkpoint_dir"],
            backbone_checkpoint=base["saved_model_file"],
            extra_test_modes=["uni100"],
        ),
    )
    after = torch.load(result["saved_model_file"], weights_only=False)["state_dict"]
    for key, value in before.items():
        assert torch.equal(after["backbone." + key], value), key
    # the backbone alone reproduces the plain SASRec run's test metrics on the same split
    assert dict(result["backbone_test_result"]) == pytest.approx(dict(base["test_result"]), abs=1e-4)
    # ... and under the extra protocol too, on the same sampled candidates
    assert dict(result["backbone_test_result_uni100"]) == pytest.approx(dict(base["test_result_uni100"]), abs=1e-4)
    assert result["test_result_uni100"] is not None
    assert set(result) >= {"backbone_test_result", "backbone_best_valid_result", "test_result"}


def test_checkpoint_round_trip_and_consistent_predict(tiny):
    result = run_recbole_diff(
        "GlobalDiff",
        SLICE,
        backbone="GRU4Rec",
        cmd_line=False,
        config_dict=dict(FAST, checkpoint_dir=tiny["checkpoint_dir"], report_diffusion_only=True, filter_history=True),
    )
    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert isinstance(trainer, GlobalDiffTrainer)
    assert dict(trainer.evaluate(test_data, load_best_model=False)) == pytest.approx(
        dict(result["test_result"]), abs=1e-4
    )
    with model.evaluating("diffusion_only"):
        assert dict(trainer.evaluate(test_data, load_best_model=False)) == pytest.approx(
            dict(result["diffusion_only_test_result"]), abs=1e-4
        )
    model.eval()
    inter = next(iter(test_data))[0]
    with torch.no_grad():
        full = model.full_sort_predict(inter)
        # the ensemble is the Borda count of the backbone's (history-filtered) softmax and the diffusion
        # model's distribution, which is what eval_mode diffusion_only scores
        with model.evaluating("diffusion_only"):
            d = model.full_sort_predict(inter)
        with model.evaluating("backbone"):
            y = torch.softmax(model.full_sort_predict(inter).double(), dim=-1)
        history = model._history_mask(inter[model.ITEM_SEQ], d.shape[1])
        assert torch.allclose(d.sum(dim=1), torch.ones(len(d), dtype=d.dtype)) and (d[history] == 0).all()
        assert torch.equal(full, borda_fuse(y, d, model.gamma))
        items = torch.randint(1, model.n_items, (inter[model.ITEM_SEQ].shape[0],))
        inter.update(type(inter)({model.ITEM_ID: items}))
        # float32 for RecBole's sampled evaluation, in exactly the full-sort order (places, best = n_items)
        places = torch.empty_like(full)
        places.scatter_(
            1,
            torch.argsort(full, dim=1, descending=True, stable=True),
            torch.arange(full.shape[1], 0, -1, dtype=full.dtype).expand_as(full),
        )
        predicted = model.predict(inter)
        assert predicted.dtype == torch.float32
        assert torch.equal(predicted.double(), places.gather(1, items[:, None]).squeeze(1))


def test_borda_ranks_with_ties():
    y = torch.tensor([[0.5, 0.2, 0.2, 0.1]])
    assert torch.allclose(borda_fuse(y, y, 1.0), torch.tensor([[2.0, 0.6, 0.4, 0.1]], dtype=torch.float64))
    x = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    fused = borda_fuse(y, x, 0.5)
    expected = 0.5 * torch.tensor([2.0, 0.6, 0.4, 0.1]) + 0.5 * torch.tensor([0.1, 0.4, 0.9, 1.6])
    assert torch.allclose(fused[0].float(), expected)


def test_fast_borda_equals_the_stable_sort_definition_with_ties_and_zeros():
    def reference(v):  # the definition: stable descending sort, best item M
        v = v.double()
        order = torch.argsort(v, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(v)
        for row in range(v.shape[0]):
            ranks[row, order[row]] = torch.arange(v.shape[1], 0, -1, dtype=v.dtype)
        return ranks * v

    gen = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(16, 300, generator=gen, dtype=torch.float64) * 4, dim=-1)
    x = torch.rand(16, 300, generator=gen, dtype=torch.float64)
    x[:, :40] = 0.0  # exact zeros, as history filtering leaves them
    x[::3, 100:110] = x[::3, 100:101]  # non-zero ties in every third row
    y[1, 50:60] = y[1, 50]
    for gamma in (0.0, 0.3, 1.0):
        assert torch.equal(
            borda_fuse(y, x, gamma),
            gamma * reference(y) + (1 - gamma) * reference(x) if 0 < gamma < 1 else reference(y if gamma == 1 else x),
        )
    assert torch.equal(
        descending_order(x)[::3, :10], torch.argsort(x[::3], dim=1, descending=True, stable=True)[:, :10]
    )
    # every tie in index order, zeros included (what sampled evaluation's places need)
    assert torch.equal(descending_order(x, zero_ties=True), torch.argsort(x, dim=1, descending=True, stable=True))


def test_gamma_one_reproduces_the_backbones_ranking_exactly():
    torch.manual_seed(0)
    logits = torch.randn(8, 500) * 6
    y = torch.softmax(logits.double(), dim=-1)
    fused = borda_fuse(y, torch.rand(8, 500), 1.0)
    assert torch.equal(torch.argsort(fused, dim=1, descending=True), torch.argsort(logits, dim=1, descending=True))


@pytest.fixture
def fusion_on_small_catalogues(monkeypatch):
    """The slice's 916 items are too few for the top-k fusion to pay (full Borda there); tests of it lift that."""
    import recbole_diff.model.plugin.globaldiff as module

    monkeypatch.setattr(module, "FUSION_ITEMS_PER_CANDIDATE", 0)


def test_every_eval_mode_filter_and_fusion_composes_the_same_inference_steps(fusion_on_small_catalogues):
    """eval_mode x filter_history x topk_fusion on one model: the backbone mode is the backbone's own scores,
    diffusion_only is the diffusion vote the ensemble fuses, the ensemble is the Borda count of the two votes and
    its exact top-k the full count's top k; history items are never ranked with filter_history. A model whose
    choices come from its config scores as the one switched to them."""
    config, dataset, train, _, test = build(fusion_candidates=60)
    model = get_model("GlobalDiff")(config, train.dataset).eval()
    assert set(model.SCORERS) == set(EVAL_MODES)
    with torch.no_grad():
        model.backbone.item_embedding.weight.mul_(40)  # peaked scores, as a trained model's: rows get certified
    inter = next(iter(test))[0]
    k, rows = max(config["topk"]), len(inter)
    assert model.fusion_k == k
    with torch.no_grad():
        for filter_history in (False, True):
            model.filter_history, model.fusion_fallbacks = filter_history, 0
            history = model._history_mask(inter[model.ITEM_SEQ], model.n_items)
            scores = {}
            for mode in EVAL_MODES:
                with model.evaluating(mode):
                    scores[mode] = model.full_sort_predict(inter)
                    with model.ranking_depth(model.n_items):  # as with topk_fusion: False
                        scores[mode, "full"] = model.full_sort_predict(inter)
            own = model.backbone.full_sort_predict(inter)
            assert torch.equal(scores["backbone"], own.masked_fill(history, float("-inf")) if filter_history else own)
            d = scores["diffusion_only"]
            for mode in ("backbone", "diffusion_only"):  # they rank every item whatever the depth
                assert torch.equal(scores[mode], scores[mode, "full"])
            assert torch.allclose(d.sum(dim=1), torch.ones(rows, dtype=d.dtype))
            y = torch.softmax(scores["backbone"].double(), dim=-1)
            assert torch.equal(scores["ensemble", "full"], borda_fuse(y, d, model.gamma))
            assert 0 < model.fusion_fallbacks < rows  # the top-k fusion certified most rows, ranked the rest in full
            top = descending_order(scores["ensemble"])[:, :k]
            assert torch.equal(top, descending_order(scores["ensemble", "full"])[:, :k])
            if filter_history:
                assert (d[history] == 0).all() and not history.gather(1, top).any()
                assert not history.gather(1, descending_order(scores["backbone"])[:, :k]).any()
            else:
                assert history.gather(1, top).any()  # the filter, not the model, keeps history out
    switched = model.state_dict()
    for mode in EVAL_MODES:
        chosen = dict(FAST, fusion_candidates=60, eval_mode=mode, filter_history=True, topk_fusion=False)
        built = GlobalDiff(
            Config(model="GlobalDiff", dataset=SLICE, backbone="SASRec", config_dict=chosen, cmd_line=False),
            train.dataset,
        )
        built.load_state_dict(switched)
        with torch.no_grad(), model.evaluating(mode), model.ranking_depth(model.n_items):
            assert torch.equal(built.eval().full_sort_predict(inter), model.full_sort_predict(inter))


def test_condition_never_sees_the_masked_item_with_a_causal_backbone():
    config, dataset, train, _, _ = build()
    model = get_model("GlobalDiff")(config, train.dataset).eval()
    seq = torch.tensor([[4, 8, 15, 16, 23, 0, 0, 0, 0, 0]])
    lens, pos = torch.tensor([5]), torch.tensor([3])
    changed = seq.clone()
    changed[0, 3:5] = torch.tensor([42, 99])
    assert torch.allclose(model.condition(seq, lens, pos), model.condition(changed, lens, pos))


@pytest.mark.parametrize("guidance", ["full", "target", "none"])
def test_guidance_sets_what_the_approximator_is_conditioned_on(guidance):
    config, _, train, _, _ = build(guidance=guidance)
    model = get_model("GlobalDiff")(config, train.dataset)
    states = torch.randn(3, 5, 16)
    pick, count = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    cond = model.condition_from_states(states, pick, count)
    h = states[torch.arange(3), pick]
    mean = torch.stack([states[b, :c].mean(0) for b, c in enumerate(count.tolist())])
    expected = {"full": torch.cat([h, mean], dim=-1), "target": h, "none": None}[guidance]
    if expected is None:
        assert cond is None
    else:
        assert torch.allclose(cond, expected, atol=1e-6)
        later = states.clone()
        later[0, 1:] = 99.0  # states past a sequence's end never enter its condition
        assert torch.allclose(model.condition_from_states(later, pick, count)[0], cond[0])
    model.eval()
    out = model.approximator(torch.rand(3, model.n_items), torch.tensor([1, 2, 3]), cond)
    assert out.shape == (3, model.n_items)


def test_each_sequence_is_masked_mask_samples_times_per_epoch():
    from recbole_diff.data.globaldiff import UserSequenceLoader

    users = torch.tensor([4, 7, 9])
    seqs, lens = torch.arange(15).view(3, 5), torch.tensor([5, 3, 2])
    loader = UserSequenceLoader(None, users, seqs, lens, 4, 3, "user_id", "seq", "len")
    batches = list(loader)
    assert len(batches) == len(loader) == 3  # 9 rows in batches of 4
    seen = torch.cat([b["user_id"] for b in batches])
    assert sorted(seen.tolist()) == [4, 4, 4, 7, 7, 7, 9, 9, 9]
    for b in batches:  # each row keeps its own user's sequence
        rows = torch.searchsorted(users, b["user_id"])
        assert torch.equal(b["seq"], seqs[rows]) and torch.equal(b["len"], lens[rows])

    # the config key reaches the loader GlobalDiff trains on
    config, _, train, _, _ = build(mask_samples=3)
    once = get_model("GlobalDiff")(config, train.dataset).build_training_data(train)
    assert once.mask_samples == 3 and len(once) == -(-3 * len(once.users) // once.batch_size)


def test_backbones_without_position_states_are_refused():
    config, dataset, train, _, _ = build("CORE")
    with pytest.raises(ValueError, match="per-position states.*'CORE'"):
        get_model("GlobalDiff")(config, train.dataset)


def test_bert4rec_backbone_runs_end_to_end(tiny):
    result = run_recbole_diff(
        "GlobalDiff",
        SLICE,
        backbone="BERT4Rec",
        cmd_line=False,
        config_dict=dict(FAST, checkpoint_dir=tiny["checkpoint_dir"], diffusion_epochs=1),
    )
    assert 0 <= result["test_result"]["ndcg@10"] <= 1 and result["backbone"] == "BERT4Rec"


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="guidance"):
        config, dataset, train, _, _ = build(guidance="half")
        get_model("GlobalDiff")(config, train.dataset)
    with pytest.raises(ValueError, match="similarity_window must be one of \\('last', 'all'\\), got 'recent'"):
        config, dataset, train, _, _ = build(similarity_window="recent")
        get_model("GlobalDiff")(config, train.dataset)
    with pytest.raises(ValueError, match="diffusion_valid_signal"):
        config, dataset, train, _, _ = build(diffusion_valid_signal="loss")
        GlobalDiffTrainer(config, get_model("GlobalDiff")(config, train.dataset))


def test_similarity_window_last_uses_only_each_users_last_items():
    """Hand-built: user 1's training items are 1..6 in time order, user 2's are 5, 6, 7; with a window of 3 the
    similarity sees (1: 4, 5, 6) and (2: 5, 6, 7) only."""
    from recbole.data.interaction import Interaction

    from recbole_diff.data.globaldiff import window_pairs

    # the latest training row of each user (its history and target), as user_sequences reads it
    rows = {
        "user_id": torch.tensor([1, 1, 2]),
        "item_id_list": torch.tensor([[1, 2, 3, 4, 0], [1, 2, 3, 4, 5], [5, 6, 0, 0, 0]]),
        "item_length": torch.tensor([4, 5, 2]),
        "item_id": torch.tensor([5, 6, 7]),
    }

    class Data:
        inter_feat = Interaction(rows)

    u, seqs, lens = user_sequences(Data(), "user_id", "item_id", "item_id_list", "item_length", max_len=3)
    assert torch.equal(seqs, torch.tensor([[4, 5, 6], [5, 6, 7]])) and lens.tolist() == [3, 3]
    users, items = window_pairs(u, seqs, lens)
    assert sorted(zip(users.tolist(), items.tolist())) == [(1, 4), (1, 5), (1, 6), (2, 5), (2, 6), (2, 7)]
    sim = ItemSimilarity(users, items, 3, 8)
    rows = sim.rows(torch.arange(8))
    assert rows[1].sum() == 0 and rows[2].sum() == 0 and rows[3].sum() == 0  # outside every window
    assert rows[4, 7] == 0 and rows[5, 6] == pytest.approx(1.0) and rows[4, 5] == pytest.approx(1 / 2**0.5)

    # on the slice, the window's pairs are a subset of all training pairs, and at most L per user
    config, dataset, train, _, _ = build(MAX_ITEM_LIST_LENGTH=5)
    args = (train.dataset, "user_id", "item_id", "item_id_list", "item_length")
    every = set(zip(*[a.tolist() for a in training_pairs(*args)]))
    users, items = window_pairs(*user_sequences(*args, max_len=5))
    assert set(zip(users.tolist(), items.tolist())) <= every and np.bincount(users).max() <= 5
    model = get_model("GlobalDiff")(config, train.dataset)
    model.build_training_data(train)
    assert int(model.similarity.crow[-1]) < len(every)  # fewer co-occurrences than from every interaction


def _borda_topk_reference(y, d, gamma, k):
    """The full Borda ranking's top k (items and scores)."""
    full = borda_fuse(y, d, gamma)
    return torch.topk(full, k, dim=1)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.8, 1.0])
def test_topk_fusion_equals_the_full_borda_ranking(gamma):
    gen = torch.Generator().manual_seed(1)
    b, m, k = 64, 400, 20
    y = torch.softmax(torch.randn(b, m, generator=gen, dtype=torch.float64) * 3, dim=-1)
    d = torch.softmax(torch.randn(b, m, generator=gen, dtype=torch.float64) * 4, dim=-1)
    d[:, :30] = 0.0  # history filtered: exact zeros
    y[:, :30] = 0.0
    d[5, 100:140] = d[5].max()  # non-zero ties at the top: their places (index order) decide, so a vote of d
    scores, certified = fused_topk(y, d, gamma, k, candidates=60)  # falls back to the full ranking
    assert certified[5] == (gamma == 1.0) and certified.float().mean() > 0.5
    ref_scores, ref_items = _borda_topk_reference(y, d, gamma, k)
    got_scores, got_items = torch.topk(scores, k, dim=1)
    assert torch.equal(got_items, ref_items)
    exact = certified[:, None] & torch.ones(b, k, dtype=torch.bool)
    # certified rows score their items by a lower bound of the Borda score; the others by the Borda score
    full = borda_fuse(y, d, gamma)
    assert torch.equal(scores[~certified], full[~certified])
    assert (got_scores[exact] <= ref_scores[exact]).all()


def test_topk_fusion_certifies_a_large_sparse_catalogue():
    """Many items, a diffusion vote that is zero for half of them and a candidate in one list only that sits
    anywhere in the other: the histogram's place ranges still separate the top k on nearly every row."""
    gen = torch.Generator().manual_seed(2)
    b, m, k = 32, 20000, 20
    y = torch.softmax(torch.randn(b, m, generator=gen, dtype=torch.float64) * 2.5, dim=-1)
    d = torch.randn(b, m, generator=gen, dtype=torch.float64).clamp(min=0) ** 3
    d /= d.sum(dim=1, keepdim=True)
    scores, certified = fused_topk(y, d, 0.5, k, candidates=100)
    assert certified.float().mean() > 0.9
    assert torch.equal(torch.topk(scores, k, dim=1).indices, _borda_topk_reference(y, d, 0.5, k).indices)


def test_small_catalogues_are_ranked_in_full():
    config, dataset, train, _, test = build(fusion_candidates=60)
    model = get_model("GlobalDiff")(config, train.dataset).eval()
    y = torch.softmax(torch.randn(4, model.n_items, dtype=torch.float64) * 5, dim=-1)
    d = torch.softmax(torch.randn(4, model.n_items, dtype=torch.float64) * 5, dim=-1)
    assert torch.equal(model.fuse(y, d, fusion_k=20), borda_fuse(y, d, model.gamma))
    assert model.fusion_fallbacks == 0  # not a fallback: the fusion was not tried


def test_topk_fusion_falls_back_where_the_certificate_fails():
    """A flat diffusion vote with a long flat tail of y: the outside bound beats the candidates, so the rows are
    ranked in full (and still match)."""
    b, m, k = 4, 300, 10
    y = torch.full((b, m), 1.0 / m, dtype=torch.float64) + torch.linspace(0, 1e-9, m, dtype=torch.float64)
    d = torch.full((b, m), 1.0 / m, dtype=torch.float64) - torch.linspace(0, 1e-9, m, dtype=torch.float64)
    scores, certified = fused_topk(y, d, 0.5, k, candidates=k)
    assert not certified.any()
    assert torch.equal(scores, borda_fuse(y, d, 0.5))
    # and with too few candidates for k nothing is certified either
    assert not fused_topk(y, d, 0.5, 50, candidates=20)[1].any()


def test_topk_fusion_gives_the_full_borda_metrics_on_every_row(tiny, fusion_on_small_catalogues):
    """Full-ranking evaluation of one trained GlobalDiff with and without the top-k fusion: the same metrics on
    the slice's every user (valid and test). The tiny model's scores are nearly flat, which no row could
    certify, so they are also sharpened (as a trained model's are) to take both paths."""
    result = run_recbole_diff(
        "GlobalDiff",
        SLICE,
        backbone="SASRec",
        cmd_line=False,
        config_dict=dict(FAST, checkpoint_dir=tiny["checkpoint_dir"], filter_history=True, fusion_candidates=60),
    )
    config, model, dataset, train, valid, test = load_data_and_model(result["saved_model_file"])
    trainer = get_trainer(config["MODEL_TYPE"], "GlobalDiff")(config, model)
    assert model.fusion_k == 20
    flat = [trainer.evaluate(data, load_best_model=False) for data in (valid, test)]
    assert model.fusion_fallbacks > len(test.dataset)  # nearly flat scores: most rows ranked in full
    model.fusion_k = None
    assert [dict(trainer.evaluate(data, load_best_model=False)) for data in (valid, test)] == [dict(r) for r in flat]
    model.fusion_k = 20
    scores_and_states, denoise = model.adapter.scores_and_states, model.denoise_scores
    model.adapter.scores_and_states = lambda inter: (lambda s: (s[0] * 300, s[1]))(scores_and_states(inter))
    model.denoise_scores = lambda y, cond, generator=None: torch.roll(y, 7, dims=1)  # another peaked vote
    model.fusion_fallbacks = 0
    fused = [trainer.evaluate(data, load_best_model=False) for data in (valid, test)]
    assert 0 < model.fusion_fallbacks < len(test.dataset)  # most rows certified, some not
    model.fusion_k = None
    full = [trainer.evaluate(data, load_best_model=False) for data in (valid, test)]
    assert [dict(r) for r in fused] == [dict(r) for r in full]
    model.fusion_k = 20
    model.adapter.scores_and_states, model.denoise_scores = scores_and_states, denoise
    assert [dict(trainer.evaluate(data, load_best_model=False)) for data in (valid, test)] == [dict(r) for r in flat]
    # a metric that reads the whole ranking turns the fusion off
    config["metrics"] = ["Hit", "GAUC"]
    assert model._fusion_k(config) is None


def test_the_diffusion_stage_stops_on_its_own_signal_and_keeps_the_ensembles_result(tiny, monkeypatch):
    config, dataset, train, valid, test = build(checkpoint_dir=tiny["checkpoint_dir"], filter_history=True)
    model = get_model("GlobalDiff")(config, train.dataset).to(config["device"])
    trainer = GlobalDiffTrainer(config, model)
    model.build_training_data(train)
    seen = []
    real = GlobalDiffTrainer.evaluate

    def spy(self, data, load_best_model=True, model_file=None, show_progress=False):
        seen.append(self.model.eval_mode)
        return real(self, data, load_best_model=False)

    monkeypatch.setattr(GlobalDiffTrainer, "evaluate", spy)
    score, result = trainer._valid_epoch(valid)
    assert seen == ["diffusion_only", "ensemble"]
    with model.evaluating("diffusion_only"):
        own = real(trainer, valid, load_best_model=False)
    ensemble = real(trainer, valid, load_best_model=False)
    assert score == own[config["valid_metric"].lower()] and dict(result) == dict(ensemble)
    # a flat ensemble (gamma = 1 ranks as the frozen backbone) cannot stop the stage: its score is not read
    model.gamma = 1.0
    seen.clear()
    assert trainer._valid_epoch(valid)[0] == score and seen == ["diffusion_only", "ensemble"]


def test_validation_subset_draws_users_with_the_seed():
    from recbole_diff.trainer.globaldiff import validation_subset

    config, dataset, train, valid, test = build()
    sub = validation_subset(valid, 40, seed=3)
    again = validation_subset(valid, 40, seed=3)
    users = sub.dataset.inter_feat["user_id"]
    assert len(sub.dataset) == 40 and torch.equal(users, again.dataset.inter_feat["user_id"])
    assert set(users.tolist()) <= set(valid.dataset.inter_feat["user_id"].tolist())
    assert validation_subset(valid, None, seed=3) is valid and validation_subset(valid, 10**6, seed=3) is valid


def test_long_term_evaluation_p1_matches_recbole_and_later_targets_are_held_out(tiny):
    result = run_recbole_diff(
        "SASRec",
        SLICE,
        cmd_line=False,
        config_dict=dict(tiny, epochs=2, hidden_size=16, inner_size=32, n_layers=1, n_heads=1, long_term_eval=True),
    )
    long_term = result["long_term_result"]
    assert list(long_term) == ["P1", "P2", "P3", "P4"]
    assert long_term["P1"]["hit@20"] == pytest.approx(result["test_result"]["hit@20"], abs=1e-4)
    assert long_term["P1"]["ndcg@20"] == pytest.approx(result["test_result"]["ndcg@20"], abs=1e-4)


def test_long_term_evaluation_scores_the_p_th_held_out_item_of_each_user():
    from recbole_diff.evaluation import long_term_evaluate

    config = Config(model="SASRec", dataset=SLICE, config_dict=dict(TINY), cmd_line=False)
    _, _, test = data_preparation(config, create_dataset(config))
    n = test.dataset.item_num

    class Scorer(torch.nn.Module):
        """Scores that depend on the user and the item, so a target taken from another user or position ranks
        elsewhere."""

        USER_ID, ITEM_ID, device = "user_id", "item_id", torch.device("cpu")

        def full_sort_predict(self, interaction):
            u = interaction["user_id"][:, None]
            return -((torch.arange(n)[None, :] * 7 + u * 13) % n).double()

    users = torch.unique(torch.as_tensor(test.dataset.inter_feat["user_id"])).tolist()
    # three held-out items for most users, one for every fifth: P4 counts only the others
    held = {u: [(u * 3 + p * 11) % (n - 1) + 1 for p in range(1 if u % 5 == 0 else 3)] for u in users}
    k = n // 2  # about half the targets within the top k
    result = long_term_evaluate(Scorer(), test, held, k=k)

    scores = Scorer().full_sort_predict({"user_id": torch.tensor(users)})
    scores[:, 0] = float("-inf")
    for p in (2, 3, 4):
        ranks = [
            int((scores[b] > scores[b, held[u][p - 2]]).sum()) for b, u in enumerate(users) if len(held[u]) >= p - 1
        ]
        hit = np.mean([r < k for r in ranks])
        ndcg = np.mean([1 / np.log2(r + 2) if r < k else 0.0 for r in ranks])
        assert 0.2 < hit < 0.8
        assert result[f"P{p}"] == pytest.approx({f"hit@{k}": hit, f"ndcg@{k}": ndcg}, abs=1e-9), p


def test_hold_out_last_removes_each_users_latest_interactions():
    from recbole_diff.evaluation import hold_out_last

    config = Config(model="SASRec", dataset=SLICE, config_dict=dict(TINY), cmd_line=False)
    dataset = create_dataset(config)
    inter = dataset.inter_feat
    before = {}
    for u, i, t in zip(inter["user_id"].tolist(), inter["item_id"].tolist(), inter["timestamp"].tolist()):
        before.setdefault(u, []).append((t, i))
    n_before = len(inter)
    held = hold_out_last(dataset, 3)
    assert len(dataset.inter_feat) == n_before - 3 * len(before)
    for u, rows in before.items():
        rows.sort(key=lambda r: r[0])
        last_times = [t for t, _ in rows[-3:]]
        assert held[u] == [i for t, i in rows[-3:]] or len(set(last_times)) < 3  # equal timestamps: any order


def test_diffusion_input_forms():
    config, dataset, train, _, _ = build(y_form="topk", y_topk=3, y_scale="raw")
    model = get_model("GlobalDiff")(config, train.dataset)
    logits = torch.tensor([[0.1, 5.0, -1.0, 3.0, 2.0, float("-inf")]])
    assert torch.equal(model.diffusion_input(logits), torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]]))
    model.y_form = "softmax"
    assert model.diffusion_input(logits).sum().item() == pytest.approx(1.0)
    model.y_form = "logits"  # a filtered item (-inf) takes the row's lowest logit: finite, and still the lowest
    assert torch.equal(model.diffusion_input(logits), torch.tensor([[0.1, 5.0, -1.0, 3.0, 2.0, -1.0]]))
    # unit (with mse): each form at the training x0's length, same direction, filtered item lowest
    model.y_scale = "unit"
    model.x0_length.fill_(4.0)
    for form in ("topk", "softmax", "logits"):
        model.y_form = form
        unit = model.diffusion_input(logits)
        assert torch.isfinite(unit).all() and unit.norm().item() == pytest.approx(4.0, abs=1e-5)
        assert unit[0, 5] == unit.min()
        model.y_scale = "raw"
        raw = model.diffusion_input(logits)
        model.y_scale = "unit"
        assert torch.cosine_similarity(unit, raw).item() == pytest.approx(1.0, abs=1e-6)
    model.diffusion_loss = "ce"  # the ce model's x0 estimates are logits: y enters as formed
    assert torch.equal(model.diffusion_input(logits), raw)


def test_mse_loss_scores_the_normalised_output_summed_over_items(monkeypatch):
    import recbole_diff.model.plugin.globaldiff as gd

    config, dataset, train, _, _ = build(step_sampler="uniform")
    model = get_model("GlobalDiff")(config, train.dataset)
    model.freeze_backbone()
    batch = next(iter(model.build_training_data(train)))
    x0 = torch.bernoulli(torch.full((len(batch), model.n_items), 0.2))
    monkeypatch.setattr(gd, "bernoulli_targets", lambda q: x0)
    seen = {}
    model.approximator.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    loss = model.calculate_loss(batch)
    expected = ((F.normalize(seen["out"], dim=-1) - x0) ** 2).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.x0_length.item() == pytest.approx(x0.norm(dim=-1).mean().item(), rel=1e-5)


def test_the_reverse_steps_use_estimates_at_the_training_x0s_length():
    """Whatever the output's scale, every reverse step's x0 estimate has the training x0's length, and so does
    y: raw outputs of norm 8-13 used to swamp y (~0.09) in every posterior mean."""
    config, dataset, train, _, _ = build()
    model = get_model("GlobalDiff")(config, train.dataset)
    model.x0_length.fill_(5.0)
    seen = []

    def stub(x_t, t, cond):
        seen.append(x_t.norm(dim=-1))
        return torch.full_like(x_t, 7.0)

    model.approximator.forward = stub
    model.eval()
    y = model.diffusion_input(torch.randn(2, model.n_items))
    x0_hat = model.denoise_scores(y, None)
    assert torch.allclose(x0_hat, torch.full_like(x0_hat, 5.0 * model.n_items**-0.5))
    assert len(seen) == model.diffusion.num_steps
    for norms in seen:  # posterior means of two length-5 vectors: never near 0 or the raw output's 7 * sqrt(M)
        assert ((norms > 2.0) & (norms <= 5.0 + 1e-4)).all()


def test_the_approximator_reads_x_t_at_the_scale_of_its_other_inputs():
    """Whatever y's form (a binary x0, a softmax, logits) and scale, x_t reaches the network with entries of order
    one, like the condition and the step embedding it is joined with. A unit-norm input came out ~40x smaller and
    the trained network ignored it."""
    from recbole_diff.model.plugin.approximators import GlobalApproximator

    torch.manual_seed(0)
    m = 1683
    net = GlobalApproximator(m, 64, 0, kind="mlp", dropout=0.0)
    binary = (torch.rand(8, m) < 0.15).float()
    forms = {
        "binary": binary,
        "softmax": torch.softmax(torch.randn(8, m) * 3, -1),
        "logits": torch.randn(8, m) * 5,
        "scaled": binary * 1e-3,
    }
    seen = {}
    net.w_in.register_forward_hook(lambda mod, args, out: seen.__setitem__("h", out))
    for name, x in forms.items():
        net(x, torch.zeros(8, dtype=torch.long))
        assert 0.2 < seen["h"].std().item() < 2.0, name
    net(binary * 1e-3, torch.zeros(8, dtype=torch.long))
    small = seen["h"]
    net(binary, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(small, seen["h"], atol=1e-5)  # only the direction over items counts


@pytest.mark.parametrize("hide", [False, True])
def test_hide_target_removes_the_answer_from_the_diffusion_input(monkeypatch, hide):
    import recbole_diff.model.plugin.globaldiff as gd

    config, dataset, train, _, _ = build(hide_target=hide)
    model = get_model("GlobalDiff")(config, train.dataset)
    model.freeze_backbone()
    loader = model.build_training_data(train)
    batch = next(iter(loader))
    monkeypatch.setattr(gd, "sample_mask_positions", lambda lens, causal: torch.ones_like(lens))
    seen = {}
    model.approximator.register_forward_pre_hook(lambda m, args: seen.__setitem__("x_t", args[0]))
    model.calculate_loss(batch)
    masked = batch[model.ITEM_SEQ][:, 1]
    at_target = seen["x_t"][torch.arange(len(masked)), masked]
    if hide:
        assert at_target.abs().max().item() < 0.5
    else:
        assert at_target.min().item() > 0.5


def test_backbone_validation_is_scored_like_the_ensemble_and_the_diffusion_stage_has_its_own_patience(tiny):
    result = run_recbole_diff(
        "GlobalDiff",
        SLICE,
        backbone="SASRec",
        cmd_line=False,
        config_dict=dict(FAST, checkpoint_dir=tiny["checkpoint_dir"], filter_history=True, gamma=1.0, epochs=2),
    )
    # gamma = 1 ranks as the backbone does, so with history filtered on both sides the two validations agree
    assert dict(result["backbone_best_valid_result"]) == pytest.approx(dict(result["best_valid_result"]), abs=1e-6)

    config, dataset, *_ = build(stopping_step=2, diffusion_stopping_step=7)
    trainer = GlobalDiffTrainer(config, get_model("GlobalDiff")(config, dataset))
    assert trainer.stopping_step == 7 and config["stopping_step"] == 2  # the backbone keeps its own

    config, dataset, *_ = build(eval_step=1, diffusion_eval_step=3, diffusion_epochs=10)
    trainer = GlobalDiffTrainer(config, get_model("GlobalDiff")(config, dataset))
    assert trainer._diffusion_eval_step(batches_per_epoch=4) == 3 and config["eval_step"] == 1
    # without diffusion_eval_step: every diffusion_eval_every_steps optimiser steps, in whole epochs
    config, dataset, *_ = build(diffusion_eval_every_steps=50, diffusion_epochs=100)
    trainer = GlobalDiffTrainer(config, get_model("GlobalDiff")(config, dataset))
    assert trainer._diffusion_eval_step(batches_per_epoch=4) == 13
    assert trainer._diffusion_eval_step(batches_per_epoch=140) == 1
