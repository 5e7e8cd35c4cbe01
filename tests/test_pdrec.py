"""PDRec: the preference store (stage 2), HBR/NNS/DPA (stage 3), the all-off equivalence and the pipeline."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import SLICE, TINY

from recbole_diff import get_model, get_trainer
from recbole_diff.data.interactions import training_interactions
from recbole_diff.data.pdrec import (
    PreferenceStore,
    TrainingItems,
    ascending_ranks,
    check_store_meta,
    compute_preference_store,
    draw_pool,
    hbr_weights,
    nns_band,
    store_meta,
)
from recbole_diff.model.plugin.pdrec import LAST_FIELD, mark_last_rows
from recbole_diff.quick_start import build_config, load_data_and_model, prepare_data, run_recbole_diff

PD = dict(TINY, tidiffrec_epochs=1, tidiffrec={"dims_dnn": [32]}, dpa_m=20, dpa_n=3, learning_rate=0.005)


def build(tmp_path, **overrides):
    config = build_config(
        "PDRec", SLICE, config_dict=dict(PD, checkpoint_dir=str(tmp_path), **overrides), cmd_line=False
    )
    _, train, valid, test = prepare_data(config)
    torch.manual_seed(0)
    model = get_model("PDRec")(config, train.dataset)
    return config, model, train, valid, test


def fake_preferences(n_users, n_items, seed=0):
    table = torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(seed))
    return table, (lambda users: table[users])


# ---- stage 2 ---------------------------------------------------------------------------------------------
def small_training():
    # user 1: items 2, 5, 7; user 2: item 3 (twice: one entry); user 0 is RecBole's padding user
    return TrainingItems.from_pairs([1, 1, 1, 2, 2], [5, 2, 7, 3, 3], n_users=3, n_items=12)


def test_training_items_are_distinct_and_sorted():
    t = small_training()
    assert t.counts.tolist() == [0, 3, 1]
    assert t.items.tolist() == [2, 5, 7, 3]
    assert t.keys().tolist() == [14, 17, 19, 27]


def test_ascending_ranks_within_rows():
    rows = torch.tensor([0, 0, 0, 1, 1])
    values = torch.tensor([0.5, 0.1, 0.9, 3.0, -1.0])
    assert ascending_ranks(rows, values).tolist() == [2, 1, 3, 2, 1]


def dense_band(table, user, own, omega_m):
    """The NNS band written out from a dense preference row: ranks [floor(omega_m N), ceil(0.99 N)) of the N
    non-interacted items, best first."""
    free = [i for i in range(1, table.shape[1]) if i not in own]
    by_pref = sorted(free, key=lambda i: -table[user, i].item())
    n = len(free)
    return by_pref, set(by_pref[int(np.floor(omega_m * n)) : int(np.ceil(0.99 * n))])


def own_items(t, user):
    return set(t.items[t.offsets[user] : t.offsets[user + 1]].tolist())


def test_store_keeps_preferences_ranks_top_m_and_the_band():
    t = small_training()
    table, prefs = fake_preferences(3, 12)
    store = compute_preference_store(prefs, t, m=4, omega_m=0.5, batch_size=2)
    assert torch.allclose(store.train_pref, table[[1, 1, 1, 2], [2, 5, 7, 3]])
    ranks_u1 = torch.argsort(torch.argsort(table[1, [2, 5, 7]])) + 1
    assert torch.allclose(store.train_rank[:3], ranks_u1.float() / 3)
    assert store.train_rank[3] == 1.0
    for user, own in ((1, {2, 5, 7}), (2, {3})):
        by_pref, band = dense_band(table, user, own, 0.5)
        assert store.topm[user].tolist() == by_pref[:4]  # DPA candidates: best non-interacted items, in order
        assert set(store.pool_items(user).tolist()) == band  # 20 epochs of draws cover these small bands
        assert int(store.band_size[user]) == len(band)


@pytest.mark.parametrize("omega_m", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("pool_epochs", [1, 3, 1000])
def test_compact_pools_reproduce_the_dense_band(omega_m, pool_epochs):
    """Every user's pool: distinct items of the band computed from the dense users x items preferences, as many
    as its draws over pool_epochs epochs, the whole band when that is fewer."""
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(1, 40), rng.integers(1, 30, size=39))
    items = rng.integers(1, 203, size=len(users))
    t = TrainingItems.from_pairs(users, items, 40, 203)
    rows = torch.bincount(torch.from_numpy(users), minlength=40)  # one training row per interaction
    table, prefs = fake_preferences(40, 203, seed=4)
    store = compute_preference_store(prefs, t, m=5, omega_m=omega_m, batch_size=7, rows=rows, pool_epochs=pool_epochs)
    for user in range(1, 40):
        _, band = dense_band(table, user, own_items(t, user), omega_m)
        pool = store.pool_items(user).tolist()
        assert len(set(pool)) == len(pool) == min(len(band), pool_epochs * int(rows[user]))
        assert set(pool) <= band
        assert int(store.band_size[user]) == len(band)
        if pool_epochs == 1000:
            assert set(pool) == band


def test_nns_draws_are_fresh_every_epoch_and_stay_in_the_band():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, 30), 20)
    t = TrainingItems.from_pairs(users, rng.integers(1, 3000, size=len(users)), 30, 3000)
    rows = torch.full((30,), 20)
    table, prefs = fake_preferences(30, 3000)
    store = compute_preference_store(prefs, t, m=5, omega_m=0.5, rows=rows, pool_epochs=5)
    cursor = torch.zeros(30, dtype=torch.long)
    epoch = torch.arange(1, 30).repeat(20)  # every user's 20 rows, in a shuffled order
    torch.manual_seed(0)
    orders = [epoch[torch.randperm(len(epoch))] for _ in range(5)]
    drawn = [draw_pool(store, order, cursor) for order in orders]
    assert cursor[1:].tolist() == [100] * 29
    for user in range(1, 30):
        own = own_items(t, user)
        _, band = dense_band(table, user, own, 0.5)
        seen = [item for d, order in zip(drawn, orders) for item in d[order == user].tolist()]
        assert set(seen) <= band and not set(seen) & own
        assert len(set(seen)) == len(seen) == 100  # five epochs of new items: no draw repeats within the pool
    # the sixth epoch walks the pool again
    again = draw_pool(store, epoch, cursor)
    assert set(again[epoch == 1].tolist()) <= set(store.pool_items(1).tolist())


def test_draws_of_one_batch_take_consecutive_pool_entries():
    t = TrainingItems.from_pairs([1, 1, 2], [1, 2, 3], 3, 50)
    store = compute_preference_store(fake_preferences(3, 50)[1], t, m=1, omega_m=0.5, rows=torch.tensor([0, 4, 2]))
    cursor = torch.zeros(3, dtype=torch.long)
    picks = draw_pool(store, torch.tensor([2, 1, 1, 2, 1]), cursor)
    pool1, pool2 = store.pool_items(1), store.pool_items(2)
    assert picks.tolist() == [int(pool2[0]), int(pool1[0]), int(pool1[1]), int(pool2[1]), int(pool1[2])]
    assert cursor.tolist() == [0, 3, 2]


def test_pools_are_uniform_samples_of_the_band():
    """Users with one band (the same preferences) get pools that cover its items evenly: a uniform sample."""
    t = TrainingItems.from_pairs(np.arange(1, 4001), np.ones(4000, dtype=int), 4001, 42)
    store = compute_preference_store(
        lambda u: torch.arange(42.0).expand(len(u), 42),
        t,
        m=1,
        omega_m=0.5,
        rows=torch.ones(4001, dtype=torch.long),
        pool_epochs=5,
    )
    band = set(range(2, 22))  # preferences 41..2 best first among items 2..41; ranks [20, 40) are items 21..2
    picks = store.pool[int(store.pool_offsets[1]) :]
    assert set(picks.tolist()) == band and len(picks) == 4000 * 5
    counts = torch.bincount(picks.long(), minlength=42)[sorted(band)].float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1  # 1000 expected per item: a 3-sigma band is 0.095
    firsts = torch.bincount(store.pool[store.pool_offsets[1:-1]].long(), minlength=42)[sorted(band)].float()
    assert (firsts / firsts.mean() - 1).abs().max() < 0.35  # the first draw too (200 per item expected)


def test_batched_and_one_user_at_a_time_give_the_same_store():
    t = small_training()
    _, prefs = fake_preferences(3, 12)
    a = compute_preference_store(prefs, t, 4, 0.5, batch_size=256)
    b = compute_preference_store(prefs, t, 4, 0.5, batch_size=1)
    for name in PreferenceStore.TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_band_is_never_empty():
    lo, hi = nns_band(torch.tensor([1, 2, 10, 1000]), 0.5)
    assert lo.tolist() == [0, 1, 5, 500] and hi.tolist() == [1, 2, 10, 990]


def test_store_memory_is_per_row_not_dense():
    t = TrainingItems.from_pairs(np.repeat(np.arange(1, 201), 3), np.arange(600) % 5000 + 1, 201, 5001)
    _, prefs = fake_preferences(201, 5001)
    store = compute_preference_store(prefs, t, m=10, omega_m=0.5, pool_epochs=20)
    # per interaction key, preference, rank; per user m candidates, band size, pool offset; 20 epochs x 3 rows
    assert store.pool_sizes[1:].tolist() == [60] * 200 and int(store.pool_sizes[0]) == 1
    assert store.nbytes() == 600 * (8 + 4 + 4) + 201 * (10 * 8 + 8) + 202 * 8 + (200 * 60 + 1) * 4
    assert store.nbytes() < 201 * 5001 * 4 / 20


def test_store_saves_and_loads_exactly(tmp_path):
    t = small_training()
    store = compute_preference_store(
        fake_preferences(3, 12)[1], t, m=4, omega_m=0.5, meta=store_meta("x", t, 4, 0.5, "abc")
    )
    store.save(str(tmp_path / "s.pt"))
    back = PreferenceStore.load(str(tmp_path / "s.pt"))
    for name in PreferenceStore.TENSORS:
        assert torch.equal(getattr(back, name), getattr(store, name))
    assert back.meta == store.meta


@pytest.mark.parametrize("n_items", [40000, 70000])
def test_item_ids_past_16_bits_survive_the_file(tmp_path, n_items):
    """Ids are stored in 16 bits when they fit (40,000 items: ids past 32,767 use the sign bit), else in 32."""
    t = TrainingItems.from_pairs([1, 2], [n_items - 1, 5], 3, n_items)
    store = compute_preference_store(
        fake_preferences(3, n_items)[1], t, m=30, omega_m=0.0, pool_epochs=3000, meta=store_meta("x", t, 30, 0.0, "a")
    )
    assert int(store.pool.max()) >= 1 << 15 and int(store.topm.max()) >= 1 << 15
    store.save(str(tmp_path / "s.pt"))
    back = PreferenceStore.load(str(tmp_path / "s.pt"))
    assert torch.equal(back.pool, store.pool) and torch.equal(back.topm, store.topm)
    width = torch.load(str(tmp_path / "s.pt"), weights_only=False)["pool"].dtype
    assert width == (torch.int16 if n_items <= 1 << 16 else torch.int32)


def test_store_of_an_older_layout_is_refused(tmp_path):
    t = small_training()
    store = compute_preference_store(fake_preferences(3, 12)[1], t, m=4, omega_m=0.5)
    store.meta["version"] = 2
    store.save(str(tmp_path / "s.pt"))
    with pytest.raises(ValueError, match="older layout"):
        PreferenceStore.load(str(tmp_path / "s.pt"))


def test_mismatched_store_is_refused_naming_what_differs():
    t = small_training()
    mine = store_meta("ml-100k", t, 4, 0.5, "abc")
    check_store_meta(dict(mine), mine, "s.pt")
    with pytest.raises(ValueError, match=r"another dataset \(dataset: stored 'sports'"):
        check_store_meta(dict(mine, dataset="sports"), mine, "s.pt")
    with pytest.raises(ValueError, match=r"another TI-DiffRec \(its weights\)"):
        check_store_meta(dict(mine, tidiffrec="def"), mine, "s.pt")
    other = TrainingItems.from_pairs([1, 1, 2], [5, 2, 3], n_users=3, n_items=12)
    with pytest.raises(ValueError, match="training split"):
        check_store_meta(store_meta("ml-100k", other, 4, 0.5, "abc"), mine, "s.pt")
    with pytest.raises(ValueError, match="training rows per user"):
        check_store_meta(store_meta("ml-100k", t, 4, 0.5, "abc", rows=t.counts * 2), mine, "s.pt")
    with pytest.raises(ValueError, match=r"nns_pool_epochs \(pool_epochs: stored 5, this run 20\)"):
        check_store_meta(store_meta("ml-100k", t, 4, 0.5, "abc", pool_epochs=5), mine, "s.pt")


def test_too_many_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match="dpa_m"):
        compute_preference_store(fake_preferences(3, 12)[1], small_training(), m=9, omega_m=0.5)


# ---- HBR ---------------------------------------------------------------------------------------------------
def test_hbr_on_a_hand_worked_row():
    t = TrainingItems.from_pairs([1, 1, 1, 1], [1, 2, 3, 4], 2, 6)
    table = torch.zeros(2, 6)
    table[1, 1:5] = torch.tensor([0.2, 0.6, 1.0, 0.4])
    store = compute_preference_store(lambda u: table[u], t, m=1, omega_m=0.5)
    # min-max: [0, .5, 1, .25], mean .4375 -> [0, 8/7, 16/7, 4/7]; ranks / P: [.25, .75, 1, .5]
    # mix with omega_r .1, clamp at c_w 2, times omega_f 3
    s = torch.tensor([0, 8 / 7, 16 / 7, 4 / 7])
    r = torch.tensor([0.25, 0.75, 1.0, 0.5])
    expected = (0.9 * s + 0.1 * r).clamp(0, 2) * 3
    assert torch.allclose(hbr_weights(store, omega_r=0.1, c_w=2.0, omega_f=3.0), expected, atol=1e-6)
    assert hbr_weights(store, 0.1, 2.0, 3.0)[2] == pytest.approx(6.0)  # the clamp bites


def test_hbr_with_equal_preferences_uses_the_rank_only():
    t = TrainingItems.from_pairs([1, 1], [1, 2], 2, 5)
    store = compute_preference_store(lambda u: torch.ones(len(u), 5), t, m=1, omega_m=0.5)
    w = hbr_weights(store, omega_r=0.5, c_w=10.0, omega_f=1.0)
    assert torch.allclose(w, torch.tensor([0.5 + 0.25, 0.5 + 0.5]))


# ---- the model ---------------------------------------------------------------------------------------------
def test_dot_scores_are_the_backbones_own(tmp_path):
    _, model, _, _, test = build(tmp_path)
    model.eval()
    inter = next(iter(test))[0]
    with torch.no_grad():
        assert torch.allclose(model.full_sort_predict(inter), model.backbone.full_sort_predict(inter))
        inter.interaction["item_id"] = inter["item_id"]
        full = model.full_sort_predict(inter)
        assert torch.allclose(model.predict(inter), full.gather(1, inter["item_id"][:, None]).squeeze(1), atol=1e-5)


def test_cosine_scores_are_tempered_cosines(tmp_path):
    _, model, _, _, test = build(tmp_path, score="cosine", temperature=7.0)
    model.eval()
    inter = next(iter(test))[0]
    with torch.no_grad():
        full = model.full_sort_predict(inter)
        h = model.backbone.forward(inter["item_id_list"], inter["item_length"])
        e = model.backbone.item_embedding.weight
        expected = 7.0 * F.cosine_similarity(h[:, None], e[None], dim=-1)
        assert torch.allclose(full, expected, atol=1e-4)
        assert torch.allclose(model.predict(inter), full.gather(1, inter["item_id"][:, None]).squeeze(1), atol=1e-5)


def bce_reference(model, batch, pos_weight=1.0):
    """The backbone trained with BCE and one uniform negative, written out independently."""
    h = model.backbone.forward(batch["item_id_list"], batch["item_length"])
    e = model.backbone.item_embedding
    s_pos = (h * e(batch["item_id"])).sum(-1)
    s_neg = (h * e(batch["neg_item_id"])).sum(-1)
    return (-pos_weight * F.logsigmoid(s_pos) - F.logsigmoid(-s_neg)).mean()


def test_all_off_is_the_backbone_with_bce_and_one_uniform_negative(tmp_path):
    _, model, train, _, _ = build(tmp_path, use_hbr=False, use_nns=False, use_dpa=False, pos_weight=1.5)
    assert not model.needs_preferences
    batch = next(iter(train))
    assert "neg_item_id" in batch.interaction  # RecBole sampled the uniform negative
    model.train()
    torch.manual_seed(3)
    loss = model.calculate_loss(batch)
    torch.manual_seed(3)
    assert torch.allclose(loss, bce_reference(model, batch, pos_weight=1.5), atol=1e-6)


def test_all_off_skips_stages_1_and_2(tmp_path):
    config, model, train, valid, _ = build(tmp_path, use_hbr=False, use_nns=False, use_dpa=False, epochs=1)
    trainer = get_trainer(config["MODEL_TYPE"], "PDRec")(config, model)
    trainer.fit(train, valid, saved=False)
    assert "tidiffrec" not in trainer.checkpoints and not model.stage_models and model.store is None


def with_store(model, train, seed=0):
    users, items = training_interactions(train.dataset)
    t = TrainingItems.from_pairs(users, items, train.dataset.user_num, train.dataset.item_num)
    model.fake_table, prefs = fake_preferences(t.n_users, t.n_items, seed)
    model.set_store(compute_preference_store(prefs, t, 20, 0.5, rows=model._training_rows(train)))
    return t


def test_hbr_weights_every_positive_of_a_training_batch(tmp_path):
    _, model, train, _, _ = build(tmp_path, use_nns=False, use_dpa=False)
    with_store(model, train)
    batch = next(iter(train))
    w = model.positive_weights(batch["user_id"], batch["item_id"])
    assert w.shape == batch["item_id"].shape and (w >= 0).all() and (w <= model.c_w * model.omega_f + 1e-6).all()
    assert w.std() > 0


def test_dpa_soft_positives_are_re_ranked_by_the_current_backbone(tmp_path):
    _, model, train, _, _ = build(tmp_path, use_hbr=False, use_nns=False)
    t = with_store(model, train)
    batch = next(iter(train))
    model.eval()
    with torch.no_grad():
        h = model.adapter.last_hidden(batch)
        items, scores = model.soft_positives(h, batch["user_id"])
        full = model.full_sort_predict(batch)
    for row in range(0, len(batch), 37):
        user = int(batch["user_id"][row])
        cand = model.store.topm[user]
        expected = cand[torch.topk(full[row, cand], model.dpa_n).indices]
        assert set(items[row].tolist()) == set(expected.tolist())
        own = set(t.items[t.offsets[user] : t.offsets[user + 1]].tolist())
        assert not set(cand.tolist()) & own  # unobserved items only
    assert torch.allclose(scores, full.gather(1, items), atol=1e-5)


def test_nns_negatives_of_training_batches_stay_in_the_band_and_change(tmp_path):
    _, model, train, _, _ = build(tmp_path)
    t = with_store(model, train)
    batch = next(iter(train))
    users = batch["user_id"]
    assert "nns_cursor" in model.state_dict()  # a resume point carries where each user's draws stand
    first, second = model.nns_negatives(users), model.nns_negatives(users)
    assert first.shape == users.shape and not torch.equal(first, second)
    assert torch.equal(model.nns_cursor, 2 * torch.bincount(users, minlength=len(model.nns_cursor)))
    for user in torch.unique(users)[:25].tolist():
        own = own_items(t, user)
        _, band = dense_band(model.fake_table, user, own, 0.5)
        mine = first[users == user].tolist() + second[users == user].tolist()
        assert set(mine) <= band and not set(mine) & own and len(set(mine)) == len(mine)


def test_full_loss_is_the_specs_formula(tmp_path):
    """w * BCE(pos) + 1/2 BCE(uniform neg) + 1/2 BCE(NNS neg) + omega_d * mean_n BCE(soft), written out here
    from the store and the backbone, with the same NNS draws."""
    _, model, train, _, _ = build(tmp_path, omega_d=0.3, dpa_state="prefix")
    t = with_store(model, train)
    batch = next(iter(train))
    model.eval()  # no dropout: the reference reads the same backbone state
    users, pos, neg = batch["user_id"], batch["item_id"], batch["neg_item_id"]
    with torch.no_grad():
        cursor = model.nns_cursor.clone()
        loss = model.calculate_loss(batch)
        h = model.backbone.forward(batch["item_id_list"], batch["item_length"])
        e = model.backbone.item_embedding.weight
        nns = draw_pool(model.store, users, cursor)
        w = torch.stack([model.hbr[model.store.lookup(u[None], i[None])][0] for u, i in zip(users, pos)])
        cand = model.store.topm[users]
        s_cand = (h[:, None] * e[cand]).sum(-1)
        s_soft = s_cand.topk(model.dpa_n, dim=1).values
        s = lambda items: (h * e[items]).sum(-1)  # noqa: E731
        expected = (
            -w * F.logsigmoid(s(pos))
            - 0.5 * F.logsigmoid(-s(neg))
            - 0.5 * F.logsigmoid(-s(nns))
            - 0.3 * F.logsigmoid(s_soft).mean(1)
        ).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    for user, item in zip(users.tolist(), nns.tolist()):
        assert item not in set(t.items[t.offsets[user] : t.offsets[user + 1]].tolist())


def test_dpa_last_uses_one_state_per_user(tmp_path):
    """dpa_state: last: DPA's term is the mean over the batch's last rows (one per user: the row whose prefix is
    the whole training history), the same for every row; the other rows' own states do not enter it."""
    _, model, train, _, _ = build(tmp_path, use_hbr=False, use_nns=False, omega_d=0.3)
    assert model.dpa_state == "last"
    with_store(model, train)
    mark_last_rows(train.dataset)
    inter = train.dataset.inter_feat
    last = inter[LAST_FIELD]
    users = inter["user_id"]
    assert int(last.sum()) == len(torch.unique(users))  # one per user
    for user in torch.unique(users)[:20].tolist():
        rows = torch.nonzero(users == user).flatten()
        longest = rows[inter["item_length"][rows] == inter["item_length"][rows].max()]
        assert last[rows].sum() == 1 and last[rows[-1]]  # the user's latest row
        assert bool(last[longest[-1]])
    batch = next(iter(train))
    assert 0 < int(batch[LAST_FIELD].sum()) < len(batch)
    model.eval()
    with torch.no_grad():
        h = model.adapter.last_hidden(batch)
        term = model.dpa_loss(h, batch["user_id"], batch)
        _, s_soft = model.soft_positives(h, batch["user_id"])
        per_row = -F.logsigmoid(s_soft).mean(1)
        sel = batch[LAST_FIELD]
        assert torch.allclose(term, torch.full_like(term, 0.3 * float(per_row[sel].mean())), atol=1e-6)
        # changing the states of the other rows leaves the term unchanged
        h2 = torch.where(sel[:, None], h, torch.randn_like(h))
        assert torch.allclose(model.dpa_loss(h2, batch["user_id"], batch), term, atol=1e-6)
        model.dpa_state = "prefix"
        assert torch.allclose(model.dpa_loss(h, batch["user_id"], batch), 0.3 * per_row, atol=1e-6)


def test_dpa_last_without_the_last_row_field_is_a_clear_error(tmp_path):
    _, model, train, _, _ = build(tmp_path, use_hbr=False, use_nns=False)
    with_store(model, train)
    with pytest.raises(RuntimeError, match=LAST_FIELD):
        model.calculate_loss(next(iter(train)))


def test_full_loss_trains(tmp_path):
    _, model, train, _, _ = build(tmp_path)
    with_store(model, train)
    mark_last_rows(train.dataset)
    batch = next(iter(train))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    model.train()
    for _ in range(15):
        torch.manual_seed(0)
        loss = model.calculate_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_missing_store_is_a_clear_error(tmp_path):
    _, model, train, _, _ = build(tmp_path)
    with pytest.raises(RuntimeError, match="preference store"):
        model.calculate_loss(next(iter(train)))


def test_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="BERT4Rec"):
        build(tmp_path, backbone="BERT4Rec")
    with pytest.raises(ValueError, match="dpa_n"):
        build(tmp_path, dpa_n=30)
    with pytest.raises(ValueError, match="score"):
        build(tmp_path, score="euclid")
    with pytest.raises(ValueError, match="dpa_state"):
        build(tmp_path, dpa_state="first")


# ---- the pipeline ----------------------------------------------------------------------------------------
def test_pipeline_uses_training_items_only_reuses_its_store_and_reloads(tmp_path):
    cfg = dict(PD, checkpoint_dir=str(tmp_path), epochs=2)
    first = run_recbole_diff("PDRec", SLICE, config_dict=cfg, cmd_line=False)
    assert first["preference_store_reused"] is False and os.path.isfile(first["preference_store"])
    assert first["tidiffrec_test_result"] is not None and first["hbr_mean_weight"] > 0

    # what stage 2 saw: every interaction but each user's last two (validation and test)
    config = build_config("PDRec", SLICE, config_dict=cfg, cmd_line=False)
    dataset, train, valid, test = prepare_data(config)
    users, items = training_interactions(train.dataset)
    store = PreferenceStore.load(first["preference_store"])
    held = set()
    for loader in (valid, test):
        d = loader.dataset.inter_feat
        held |= set(zip(d["user_id"].tolist(), d["item_id"].tolist()))
    train_pairs = set(zip(users.tolist(), items.tolist()))
    stored = {(k // store.n_items, k % store.n_items) for k in store.train_key.tolist()}
    assert stored == train_pairs
    with open(os.path.join(config["data_path"], f"{SLICE}.inter")) as f:
        raw_rows = sum(1 for _ in f) - 1
    assert len(users) == raw_rows - len(valid.dataset.inter_feat) - len(test.dataset.inter_feat)
    assert not (held - train_pairs) & stored

    stamp = os.path.getmtime(first["preference_store"])
    second = run_recbole_diff(
        "PDRec", SLICE, cmd_line=False, config_dict=dict(cfg, tidiffrec_checkpoint=first["tidiffrec_checkpoint"])
    )
    assert second["preference_store_reused"] is True
    assert second["preference_store"] == first["preference_store"]
    assert os.path.getmtime(first["preference_store"]) == stamp

    saved_config, model, _, _, _, test_data = load_data_and_model(first["saved_model_file"])
    trainer = get_trainer(saved_config["MODEL_TYPE"], "PDRec")(saved_config, model)
    assert trainer.evaluate(test_data, load_best_model=False) == first["test_result"]


def test_store_is_a_stage_of_its_own_and_resumes_without_tidiffrec(tmp_path):
    """With stage_cache, the store is stored under its own key; a machine holding only the store (no TI-DiffRec
    weights) resumes from it; a store whose meta says another dataset is refused, not used."""
    import glob

    cache = tmp_path / "stages"
    cfg = dict(PD, checkpoint_dir=str(tmp_path / "a"), epochs=1, stage_cache=str(cache))
    first = run_recbole_diff("PDRec", SLICE, config_dict=cfg, cmd_line=False)
    stores = glob.glob(str(cache / "PDRec-preferences-*.pth"))
    assert first["preference_store_reused"] is False and first["preference_store"] == stores[0]
    for path in glob.glob(str(cache / "TIDiffRec-*")):  # a new machine: only the committed store
        os.remove(path)
    second = run_recbole_diff("PDRec", SLICE, cmd_line=False, config_dict=dict(cfg, checkpoint_dir=str(tmp_path / "b")))
    assert second["preference_store_reused"] is True and "tidiffrec_test_result" not in second
    assert not glob.glob(str(cache / "TIDiffRec-*.pth"))  # stage 1 was not trained again
    assert second["hbr_mean_weight"] == first["hbr_mean_weight"]
    # another omega_m is another stage: a new store, not this one
    third = run_recbole_diff(
        "PDRec", SLICE, cmd_line=False, config_dict=dict(cfg, checkpoint_dir=str(tmp_path / "c"), omega_m=0.8)
    )
    assert third["preference_store_reused"] is False and third["preference_store"] != stores[0]
    data = torch.load(stores[0], weights_only=False)
    data["meta"]["dataset"] = "sports"
    torch.save(data, stores[0])
    with pytest.raises(ValueError, match="another dataset"):
        run_recbole_diff("PDRec", SLICE, cmd_line=False, config_dict=dict(cfg, checkpoint_dir=str(tmp_path / "d")))


def test_wrong_tidiffrec_checkpoint_is_refused(tmp_path):
    sasrec = run_recbole_diff(
        "SASRec", SLICE, config_dict=dict(TINY, checkpoint_dir=str(tmp_path), epochs=1), cmd_line=False
    )
    with pytest.raises(ValueError, match="TIDiffRec"):
        run_recbole_diff(
            "PDRec",
            SLICE,
            cmd_line=False,
            config_dict=dict(
                PD, checkpoint_dir=str(tmp_path), epochs=1, tidiffrec_checkpoint=sasrec["saved_model_file"]
            ),
        )
