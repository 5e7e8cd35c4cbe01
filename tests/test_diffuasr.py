"""DiffuASR: SU-Net, the augmenter's loss and guidance, rounding, the baselines, the dataset writer and the
pipeline (evaluation with prepended items equals the augmented dataset's own evaluation)."""

import logging
import os

import numpy as np
import pytest
import torch
from helpers import DATA_PATH, SLICE, TINY
from recbole.data import create_dataset, data_preparation

from recbole_diff import get_model, get_trainer
from recbole_diff.data.augment import (
    Sequences,
    augmenter_users,
    history_mask,
    random_prefix,
    random_seq_prefix,
    read_atomic,
    round_to_items,
    training_sequences,
    write_augmented_dataset,
)
from recbole_diff.model.plugin.diffuasr import AUG_HEADS, AUG_RAW, AugmenterLoader
from recbole_diff.model.plugin.sunet import SUNet
from recbole_diff.quick_start import build_config, load_data_and_model, prepare_data, run_recbole_diff

ASR = dict(
    TINY,
    hidden_size=16,
    diffusion_embedding_size=16,
    unet_channels=[8, 16, 16],
    M=3,
    augmenter_epochs=2,
    augmenter_train_steps=None,
    sampler="ddim",
    sample_steps=5,
    epochs=2,
)


def build(tmp_path, **overrides):
    config = build_config(
        "DiffuASR", SLICE, config_dict=dict(ASR, checkpoint_dir=str(tmp_path), **overrides), cmd_line=False
    )
    _, train, valid, test = prepare_data(config)
    torch.manual_seed(0)
    return config, get_model("DiffuASR")(config, train.dataset), train, valid, test


# ---- SU-Net ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "m,d,channels",
    [(1, 16, (8, 16, 16)), (4, 64, (8, 16, 16, 16)), (10, 64, (8, 16, 16, 16)), (7, 256, (8, 16, 16, 16))],
)
def test_sunet_output_has_the_input_shape(m, d, channels):
    net = SUNet(m, d, channels)
    x = torch.randn(3, m, d)
    out = net(x, torch.tensor([0, 10, 999]), torch.randn(3, d))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sunet_refuses_non_square_d_and_too_many_levels():
    with pytest.raises(ValueError, match="perfect square"):
        SUNet(4, 48)
    with pytest.raises(ValueError, match="levels"):
        SUNet(4, 16, channels=(8, 16, 16, 16))  # 4 x 4 cannot be halved three times


def test_sunet_reads_the_step_and_the_condition():
    torch.manual_seed(0)
    net = SUNet(3, 16, (8, 16, 16), dropout=0.0).eval()
    x, c = torch.randn(2, 3, 16), torch.randn(2, 16)
    base = net(x, torch.tensor([5, 5]), c)
    assert not torch.allclose(base, net(x, torch.tensor([500, 500]), c))
    assert not torch.allclose(base, net(x, torch.tensor([5, 5]), c + 1))


def test_sunet_passes_x_t_through_only_with_a_first_width_of_at_least_m():
    """At large t x_t is nearly eps, so a working eps network's loss there falls fast. A first level narrower than
    the M position channels cannot carry x_t: 4 channels for 6 positions lose about a third of it (the authors'
    8 channels for M = 10 stayed at 0.24 on ml-100k)."""
    from recbole_diff.diffusion import GaussianDiffusion

    diffusion = GaussianDiffusion("linear", 1000, parameterization="eps")
    m, d = 6, 16

    def late_loss(first):
        torch.manual_seed(0)
        net = SUNet(m, d, (first, 16), res_blocks=1, dropout=0.0)
        table, c = torch.randn(50, d), torch.zeros(64, d)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)

        def loss(grad=True):
            x0, t = table[torch.randint(50, (64, m))], torch.randint(800, 1000, (64,))
            noise = torch.randn_like(x0)
            with torch.set_grad_enabled(grad):
                return ((net(diffusion.q_sample(x0, t, noise), t, c) - noise) ** 2).mean()

        for _ in range(150):
            opt.zero_grad()
            loss().backward()
            opt.step()
        net.eval()
        return sum(loss(False).item() for _ in range(5)) / 5

    wide, narrow = late_loss(8), late_loss(4)
    assert wide < 0.3 < narrow, (wide, narrow)


# ---- the augmenter -----------------------------------------------------------------------------------------
def test_eps_loss_decreases(tmp_path):
    config, model, train, _, _ = build(tmp_path, guide="cf")
    seqs = training_sequences(train.dataset)
    users = augmenter_users(seqs, model.m, 5)
    aug = model.augmenter
    opt = torch.optim.Adam(aug.parameters(), lr=3e-3)
    torch.manual_seed(0)
    (batch,) = list(AugmenterLoader(train.dataset, seqs, users, model.m, len(users)))
    losses = []
    for _ in range(60):
        loss = aug.loss(batch[AUG_HEADS], batch[AUG_RAW])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


def test_training_batches_hold_s_aug_and_s_raw_and_pool_them_as_the_generation_does(tmp_path):
    config, model, train, _, _ = build(tmp_path, guide="cf")
    seqs = training_sequences(train.dataset)
    users = augmenter_users(seqs, model.m, int(config["augmenter_min_raw"]))
    loader = AugmenterLoader(train.dataset, seqs, users, model.m, 7)
    batches = list(loader)
    assert len(batches) == len(loader) == -(-len(users) // 7)
    seen = []
    for batch in batches:
        heads, raw = batch[AUG_HEADS], batch[AUG_RAW]
        for row_heads, row_raw in zip(heads, raw):
            user = next(
                int(u)
                for u in users
                if seqs.of(u)[: model.m].tolist() == row_heads.tolist()
                and seqs.of(u)[model.m :].tolist() == row_raw[row_raw > 0].tolist()
            )
            seen.append(user)
    assert sorted(seen) == sorted(users.tolist())  # every user once an epoch, whole sequences
    batch = batches[0]
    rows = [next(int(u) for u in users if seqs.of(u)[: model.m].tolist() == h.tolist()) for h in batch[AUG_HEADS]]
    flat, offsets = seqs.bags(torch.tensor(rows), start=model.m)
    padded = model.augmenter.condition(batch[AUG_RAW])
    assert torch.allclose(padded, model.augmenter.condition(flat, offsets), atol=1e-6)


def test_condition_dropout_trains_with_the_null_condition_at_rate_p_uncond(tmp_path):
    _, model, _, _, _ = build(tmp_path, guide="cf", p_uncond=0.3)
    aug = model.augmenter
    with torch.no_grad():
        aug.null.fill_(7.0)  # a value no pooled condition takes
    seen = []
    hook = aug.sunet.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[2].detach().clone()))
    n = 4000
    heads = torch.randint(1, model.n_items, (n, model.m))
    raw = torch.randint(1, model.n_items, (n, 2))
    torch.manual_seed(0)
    aug.loss(heads, raw)
    aug.guide = "cg"  # no dropout outside classifier-free guidance
    aug.loss(heads, raw)
    hook.remove()
    null_rows = [(c == 7.0).all(dim=1).float().mean().item() for c in seen]
    assert abs(null_rows[0] - 0.3) < 0.03 and null_rows[1] == 0.0


def test_classifier_free_guidance_combines_the_two_branches():
    torch.manual_seed(0)
    net = SUNet(3, 16, (8, 16, 16), dropout=0.0).eval()
    from recbole_diff.diffusion import classifier_free

    x, t, c, null = torch.randn(4, 3, 16), torch.tensor([3, 50, 400, 999]), torch.randn(4, 16), torch.randn(1, 16)
    with torch.no_grad():
        guided = classifier_free(net, 2.0, {"c": null})(x, t, c=c)
        expected = 3.0 * net(x, t, c=c) - 2.0 * net(x, t, c=null.expand_as(c))
        assert torch.allclose(guided, expected, atol=1e-5)
        assert torch.equal(classifier_free(net, 0.0, {"c": null})(x, t, c=c), net(x, t, c=c))


def test_classifier_free_with_guidance_scale_zero_is_unguided(tmp_path):
    _, model, _, _, _ = build(tmp_path, guide="cf")
    aug = model.augmenter.eval()
    c = torch.randn(4, 16)
    guided = aug.sample(c, guidance_scale=0.0, sampler="ddim", steps=5, generator=torch.Generator().manual_seed(1))
    aug.guide = "none"
    plain = aug.sample(c, guidance_scale=0.0, sampler="ddim", steps=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(guided, plain)
    aug.guide = "cf"
    other = aug.sample(c, guidance_scale=3.0, sampler="ddim", steps=5, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(other, plain)


@pytest.mark.parametrize("backbone", ["SASRec", "BERT4Rec", "GRU4Rec"])
def test_classifier_guidance_raises_the_first_items_probability(tmp_path, backbone):
    _, model, train, _, _ = build(tmp_path, guide="cg", backbone=backbone, embedding_size=16)
    model.eval()
    batch = next(iter(train))
    first = batch["item_id"][:8]
    log_prob = model.first_item_log_prob(first)
    x = torch.randn(8, model.m, model.d)
    with torch.enable_grad():
        xg = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(log_prob(xg, None).sum(), xg)[0]
    assert grad.abs().sum() > 0  # the hook lets the gradient reach the prefix embeddings
    # the guided noise estimate's x0 moves along +grad of log p (at x_t), and log p rises for a modest step
    diffusion = model.augmenter.diffusion
    t = torch.full((8,), 500)
    eps = torch.randn_like(x)
    from recbole_diff.diffusion import ClassifierGuidance

    pred = diffusion.model_predictions(lambda x_t, t: eps, x, t)
    abar = diffusion.alphas_cumprod[500]
    coef = (1 - abar) / abar.sqrt()  # x0 shift per unit of gamma * grad
    gamma = 0.5 / float(coef * grad.flatten(1).norm(dim=1).mean())
    guided = ClassifierGuidance(log_prob, gamma)(diffusion, x, t, dict(pred))
    shift = (guided["pred_x0"] - pred["pred_x0"]).flatten(1)
    cos = torch.nn.functional.cosine_similarity(shift, grad.flatten(1), dim=1)
    assert (cos > 0.99).all()
    with torch.no_grad():
        assert (log_prob(x + shift.view_as(x), t) > log_prob(x, t)).float().mean() > 0.9


@pytest.mark.parametrize("choice,softmax", [("auto", True), ("softmax", True), ("sigmoid", False)])
def test_classifier_reads_a_generated_prefix_as_the_backbone_reads_those_items(tmp_path, choice, softmax):
    from recbole.data.interaction import Interaction

    _, model, _, _, _ = build(tmp_path, guide="cg", embedding_size=16, classifier_logprob=choice)
    model.eval()
    assert model.classifier_uses_softmax() == softmax  # auto: SASRec's default loss_type is CE
    torch.manual_seed(1)
    prefix = torch.randint(2, model.n_items, (6, model.m))
    first = torch.randint(1, model.n_items, (6,))
    model.init_embedding_from_backbone()
    x = model.augmenter.embed(prefix).detach()  # the augmenter's space: the table at unit scale
    assert x.std().item() == pytest.approx(1.0, rel=0.2)
    with torch.no_grad():
        got = model.first_item_log_prob(first)(x, None)
        scores = model.backbone.full_sort_predict(
            Interaction({model.ITEM_SEQ: prefix, model.ITEM_SEQ_LEN: torch.full((6,), model.m)})
        )
    log_p = torch.log_softmax(scores, dim=1) if softmax else torch.nn.functional.logsigmoid(scores)
    assert torch.allclose(got, log_p.gather(1, first[:, None]).squeeze(1), atol=1e-5)


# ---- rounding and baselines --------------------------------------------------------------------------------
def test_rounding_is_the_cosine_argmax_and_exclusion_avoids_history_and_repeats():
    torch.manual_seed(0)
    table = torch.randn(30, 8)
    x0 = torch.randn(5, 4, 8)
    got = round_to_items(x0, table)
    cos = torch.nn.functional.cosine_similarity(x0[:, :, None], table[None, None], dim=-1)
    cos[..., 0] = -2
    assert torch.equal(got, cos.argmax(-1))
    x0[:, 1] = x0[:, 0]  # two positions that want the same item
    exclude = torch.zeros(5, 30, dtype=torch.bool)
    exclude[:, 0] = True
    exclude[:, got[:, 2].unique()] = True
    out = round_to_items(x0, table, exclude)
    for row in range(5):
        assert len(set(out[row].tolist())) == 4 and not exclude[row, out[row]].any()
    exclude[:, 1:] = True
    exclude[:, 5:8] = False  # three items left for four positions
    with pytest.raises(ValueError, match="no item left for generated position 4"):
        round_to_items(x0, table, exclude)


def test_random_baselines():
    seqs = Sequences(torch.tensor([0, 0, 3, 8]), torch.tensor([4, 5, 6, 1, 2, 3, 9, 9]))
    users = torch.tensor([1, 2])
    own = random_seq_prefix(seqs, users, 6, torch.Generator().manual_seed(0))
    assert set(own[0].tolist()) <= {4, 5, 6} and set(own[1].tolist()) <= {1, 2, 3, 9}
    exclude = history_mask(seqs, users, 12)
    uni = random_prefix(users, 6, 12, torch.Generator().manual_seed(0), exclude)
    assert not exclude.gather(1, uni).any() and (uni > 0).all()
    assert all(len(set(row.tolist())) == 6 for row in uni)  # distinct within a prefix


@pytest.mark.parametrize("exclude", [True, False])
def test_exclude_history_decides_if_own_items_may_be_generated_and_padding_never_is(tmp_path, exclude):
    config, model, train, _, _ = build(tmp_path, guide="cf", exclude_history=exclude)
    sequences = training_sequences(train.dataset)
    users = torch.nonzero(sequences.lengths >= model.m).flatten()[:8]
    own = sequences.heads(users, model.m - 1)
    table = model.augmenter.embedding.weight.detach()
    table[0] = 5 * torch.randn(model.d)  # a padding row that a position points at exactly

    def sample(c, *args, **kwargs):  # position 0 aims at padding, the others at the user's own first items
        return torch.cat([table[0].expand(len(c), 1, -1), table[own]], dim=1)

    model.augmenter.sample = sample
    prefix, _ = model.generate(sequences, users)
    assert (prefix > 0).all()
    history = history_mask(sequences, users, model.n_items)
    if exclude:
        assert not history.gather(1, prefix).any()
        assert all(len(set(row.tolist())) == model.m for row in prefix)
    else:
        assert torch.equal(prefix[:, 1:], own)


def test_history_mask_from_a_position_on():
    seqs = Sequences(torch.tensor([0, 3, 7]), torch.tensor([4, 5, 6, 1, 2, 3, 9]))
    mask = history_mask(seqs, torch.tensor([0, 1]), 10, start=2)
    assert mask[0].nonzero().flatten().tolist() == [0, 6] and mask[1].nonzero().flatten().tolist() == [0, 3, 9]


def test_augmenter_sees_training_items_only(tmp_path):
    _, _, train, valid, test = build(tmp_path)
    seqs = training_sequences(train.dataset)
    with open(os.path.join(DATA_PATH, SLICE, f"{SLICE}.inter")) as f:
        raw = sum(1 for _ in f) - 1
    assert int(seqs.lengths.sum()) == raw - len(valid.dataset.inter_feat) - len(test.dataset.inter_feat)
    # RecBole's training rows are (history, target) in time order; a user's first row's history is the first item
    inter = train.dataset.inter_feat
    own = {}
    columns = (inter["user_id"].tolist(), inter["item_id"].tolist(), inter["item_id_list"][:, 0].tolist())
    for u, i, history in zip(*columns):
        own.setdefault(u, [history]).append(i)
    assert len(own) == int((seqs.lengths > 0).sum())
    assert all(seqs.of(u).tolist() == items for u, items in own.items())  # whole sequences, in order


def test_prepending_keeps_the_last_items_and_skips_users_without_a_prefix(tmp_path):
    from recbole.data.interaction import Interaction

    _, model, _, _, _ = build(tmp_path)  # MAX_ITEM_LIST_LENGTH 10, M 3
    model.prefix[5] = torch.tensor([7, 8, 9])
    seq = torch.zeros(3, 10, dtype=torch.long)
    seq[0, :4] = torch.tensor([1, 2, 3, 4])
    seq[1, :10] = torch.arange(11, 21)
    seq[2, :2] = torch.tensor([30, 31])
    inter = Interaction(
        {"user_id": torch.tensor([5, 5, 6]), "item_id_list": seq, "item_length": torch.tensor([4, 10, 2])}
    )
    out = model.augmented_input(inter)
    assert out["item_id_list"][0].tolist() == [7, 8, 9, 1, 2, 3, 4, 0, 0, 0] and out["item_length"][0] == 7
    assert out["item_id_list"][1].tolist() == list(range(11, 21)) and out["item_length"][1] == 10
    assert out["item_id_list"][2].tolist()[:3] == [30, 31, 0] and out["item_length"][2] == 2


def test_users_without_a_validation_item_are_not_augmented(tmp_path):
    from types import SimpleNamespace

    _, model, _, _, _ = build(tmp_path)
    seqs = Sequences(torch.tensor([0, 0, 2, 4, 9]), torch.arange(1, 10))
    valid = SimpleNamespace(dataset=SimpleNamespace(uid_field="user_id", inter_feat={"user_id": torch.tensor([1, 3])}))
    assert model.augmentable_users(seqs, valid, logging.getLogger()).tolist() == [1, 3]
    assert model.stage_info["users_not_augmented"] == 1  # user 2 has training items but no validation row


# ---- the writer ----------------------------------------------------------------------------------------------
def test_writer_keeps_every_interaction_and_the_held_out_targets(tmp_path):
    config, _, train, valid, test = build(tmp_path)
    ds = train.dataset
    users = torch.arange(1, ds.user_num)
    prefix = torch.randint(1, ds.item_num, (len(users), 3), generator=torch.Generator().manual_seed(0))
    uid, iid = ds.uid_field, ds.iid_field
    path = write_augmented_dataset(
        config["data_path"],
        SLICE,
        str(tmp_path / "aug"),
        "aug-slice",
        list(ds.field2id_token[uid][users.numpy()]),
        [list(r) for r in ds.field2id_token[iid][prefix.numpy()]],
        uid,
        iid,
        ds.time_field,
    )
    header, rows = read_atomic(os.path.join(path, "aug-slice.inter"))
    _, original = read_atomic(os.path.join(config["data_path"], f"{SLICE}.inter"))
    assert rows[: len(original)] == original and len(rows) == len(original) + 3 * len(users)

    aug_config = build_config(
        "SASRec", "aug-slice", cmd_line=False, config_dict=dict(TINY, data_path=str(tmp_path / "aug"))
    )
    aug_train, aug_valid, aug_test = data_preparation(aug_config, create_dataset(aug_config))

    def held(loader):
        d, f = loader.dataset.inter_feat, loader.dataset.field2id_token
        return {(f[uid][u], f[iid][i]) for u, i in zip(d[uid].tolist(), d[iid].tolist())}

    assert held(aug_valid) == held(valid) and held(aug_test) == held(test)
    # each user's training part now starts with the generated items, in order
    aug_seqs = training_sequences(aug_train.dataset)
    tok = aug_train.dataset.field2token_id
    for row, u in enumerate(users.tolist()[:20]):
        au = tok[uid][ds.field2id_token[uid][u]]
        want = [tok[iid][ds.field2id_token[iid][i]] for i in prefix[row].tolist()]
        assert aug_seqs.of(au)[:3].tolist() == want

    with pytest.raises(FileExistsError, match="not overwritten"):
        write_augmented_dataset(
            config["data_path"], SLICE, str(tmp_path / "aug"), "aug-slice", [], [], uid, iid, ds.time_field
        )
    assert read_atomic(os.path.join(path, "aug-slice.inter"))[1] == rows


# ---- the pipeline ------------------------------------------------------------------------------------------
def test_pipeline_scores_equal_the_augmented_datasets_own_and_reload(tmp_path):
    cfg = dict(ASR, checkpoint_dir=str(tmp_path), guide="cf", guidance_scale=1.0)
    result = run_recbole_diff("DiffuASR", SLICE, config_dict=cfg, cmd_line=False)
    assert os.path.isdir(result["augmented_dataset"]) and result["generation_users_per_s"] > 0
    assert result["backbone_test_result"] is not None
    groups = result["long_tail_result"]
    total = sum(g["users"] for g in groups.values())
    hit = sum(g["users"] * g["hit@10"] for g in groups.values() if g["users"])
    assert hit / total == pytest.approx(result["test_result"]["hit@10"], abs=1e-3)

    # the augmented backbone on the written dataset's own loaders gives the same test metrics
    name = os.path.basename(result["augmented_dataset"])
    aug_config = build_config(
        "SASRec",
        name,
        cmd_line=False,
        config_dict=dict(ASR, data_path=os.path.dirname(result["augmented_dataset"]), checkpoint_dir=str(tmp_path)),
    )
    _, _, aug_test = data_preparation(aug_config, create_dataset(aug_config))
    final = get_model("SASRec")(aug_config, aug_test.dataset)
    trainer = get_trainer(aug_config["MODEL_TYPE"], "SASRec")(aug_config, final)
    own = trainer.evaluate(aug_test, load_best_model=True, model_file=result["augmented_backbone_checkpoint"])
    assert dict(own) == pytest.approx(dict(result["test_result"]), abs=1e-4)

    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    again = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model).evaluate(test_data, load_best_model=False)
    assert dict(again) == pytest.approx(dict(result["test_result"]), abs=1e-4)

    with pytest.raises(FileExistsError, match="not overwritten"):  # the same run again would overwrite
        run_recbole_diff("DiffuASR", SLICE, config_dict=cfg, cmd_line=False)


@pytest.mark.parametrize("augmenter", ["random", "random_seq"])
def test_random_baselines_run_through_the_same_writer(tmp_path, augmenter):
    result = run_recbole_diff(
        "DiffuASR",
        SLICE,
        cmd_line=False,
        config_dict=dict(ASR, checkpoint_dir=str(tmp_path), augmenter=augmenter, epochs=1),
    )
    assert f"-{augmenter}-SASRec-M3-" in result["augmented_dataset"] and "augmenter_seconds" not in result


def test_augmented_dataset_names_record_source_m_guide_gamma_steps_and_seed():
    from recbole_diff.data.augment import augmented_name

    name = augmented_name("sports", "SASRec", "diffusion", 10, 2021, "cg", 1.0, 50, "ddim", {"p_uncond": 0.1})
    assert name.startswith("sports-diffuasr-SASRec-M10-cg-g1-ddim50-seed2021-")
    assert augmented_name(
        "sports", "SASRec", "diffusion", 10, 2021, "cg", 1.0, None, "ancestral", {"p_uncond": 0.1}
    ).startswith("sports-diffuasr-SASRec-M10-cg-g1-ancestralall-seed2021-")
    other = augmented_name("sports", "SASRec", "diffusion", 10, 2021, "cg", 1.0, 50, "ddim", {"p_uncond": 0.2})
    assert other != name  # any other setting gives another name, so no run meets another's dataset
    assert augmented_name("sports", "BERT4Rec", "random", 5, 2020) == "sports-random-BERT4Rec-M5-seed2020"


def test_long_tail_groups_follow_the_users_lengths(tmp_path):
    from recbole_diff.evaluation import group_metrics

    config, model, _, _, test = build(tmp_path)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    lengths = 3 + (torch.arange(model.prefix.shape[0]) * 7) % 30  # every group gets users
    with model.evaluating("backbone"):
        groups = group_metrics(trainer, test, lengths, (5, 20))
        overall = trainer.evaluate(test, load_best_model=False)
    test_users = torch.as_tensor(test.dataset.inter_feat["user_id"])
    own = lengths[test_users]
    expected = {
        "3-5": int(((own >= 3) & (own <= 5)).sum()),
        "6-20": int(((own >= 6) & (own <= 20)).sum()),
        ">20": int((own > 20).sum()),
    }
    assert {name: g["users"] for name, g in groups.items()} == expected and min(expected.values()) > 0
    hit = sum(g["users"] * g["hit@10"] for g in groups.values()) / len(test_users)
    assert hit == pytest.approx(overall["hit@10"], abs=1e-4)  # the same candidates, the same ranks


def test_long_tail_groups_score_without_autograd(tmp_path):
    from recbole_diff.evaluation import group_metrics

    config, model, _, _, test = build(tmp_path)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    grad_enabled = []

    def spy(score):
        def scored(interaction):
            grad_enabled.append(torch.is_grad_enabled())
            return score(interaction)

        return scored

    for name in ("predict", "full_sort_predict"):  # whichever the trainer's batch scorer calls
        setattr(model, name, spy(getattr(model, name)))
    lengths = 3 + (torch.arange(model.prefix.shape[0]) * 7) % 30
    group_metrics(trainer, test, lengths, (5, 20))
    assert grad_enabled and not any(grad_enabled)


def test_backbone_on_augmented_data_trains_the_same_whatever_the_stages_before_drew(tmp_path):
    result = run_recbole_diff(
        "DiffuASR",
        SLICE,
        cmd_line=False,
        config_dict=dict(ASR, checkpoint_dir=str(tmp_path), augmenter="random", epochs=1),
    )
    root, name = os.path.split(result["augmented_dataset"])
    config, model, train, _, _ = build(tmp_path, augmenter="random", epochs=1)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    start = {k: v.clone() for k, v in model.final.state_dict().items()}
    results = []
    for state in (1, 2):  # as if the augmenter had drawn different amounts of randomness
        model.final.load_state_dict(start)
        torch.manual_seed(state)
        np.random.seed(state)
        results.append(trainer.train_on_augmented(name, root, train.dataset, verbose=False, saved=False))
    assert results[0][0] == results[1][0] and dict(results[0][1]) == dict(results[1][1])


def test_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="embedding_init"):
        build(tmp_path, guide="cg", embedding_init="random")
    with pytest.raises(ValueError, match="diffusion_embedding_size"):
        build(tmp_path, diffusion_embedding_size=64)
    with pytest.raises(ValueError, match="perfect square"):
        build(tmp_path, diffusion_embedding_size=15, embedding_init="random", guide="cf")
    with pytest.raises(ValueError, match="augmenter"):
        build(tmp_path, augmenter="gan")
    with pytest.raises(ValueError, match="MAX_ITEM_LIST_LENGTH"):
        build(tmp_path, M=11)


def test_x0_is_the_item_table_at_unit_scale_and_sampling_stays_in_its_range(tmp_path):
    _, model, _, _, _ = build(tmp_path, guide="cf", embedding_size=16)
    model.init_embedding_from_backbone()
    aug = model.augmenter
    table = aug.embedding.weight[1:].detach()
    assert table.std().item() < 0.5  # a trained or RecBole-initialised table is far smaller than the noise
    items = torch.arange(1, model.n_items)
    x0 = aug.embed(items).detach()
    assert x0.std().item() == pytest.approx(1.0, abs=1e-3)
    # rounding is by cosine: the scale changes no item
    assert torch.equal(model.round(x0[:60].view(20, 3, -1)), items[:60].view(20, 3))
    bound = x0.abs().max().item()
    with torch.no_grad():
        out = aug.sample(torch.randn(8, model.d), guidance_scale=1.0, sampler="ddim", steps=10)
    assert out.abs().max().item() <= bound + 1e-6
    aug.clip_x0 = False  # an untrained network's estimates leave the table's range without the clip
    with torch.no_grad():
        assert aug.sample(torch.randn(8, model.d), guidance_scale=1.0, sampler="ddim", steps=10).abs().max() > bound


def test_augmenter_train_steps_set_the_budget_in_updates(tmp_path):
    from recbole_diff.trainer.diffuasr import DiffuASRTrainer

    config, model, train, valid, _ = build(tmp_path, guide="cf", augmenter_train_steps=5, augmenter_batch_size=16)
    trainer = DiffuASRTrainer(config, model)
    seqs = training_sequences(train.dataset)
    users = augmenter_users(seqs, model.m, int(config["augmenter_min_raw"]))
    calls = []
    loss = model.augmenter.loss
    model.augmenter.loss = lambda *a: calls.append(1) or loss(*a)
    trainer.run_stage("augmenter", train, valid, verbose=False, saved=False)
    per_epoch = -(-len(users) // 16)
    assert len(calls) == per_epoch * -(-5 // per_epoch) and len(calls) >= 5
