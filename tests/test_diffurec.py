"""DiffuRec / DiffuRecSys behaviour on the test slice."""

import pytest
import torch
from helpers import SLICE, TINY
from recbole.data import create_dataset, data_preparation
from recbole.data.interaction import Interaction
from recbole.utils import init_seed

from recbole_diff import get_model, get_trainer
from recbole_diff.config import Config
from recbole_diff.quick_start import load_data_and_model, run_recbole_diff

SMALL = dict(TINY, hidden_size=16, n_blocks=2, n_heads=2)


def build(name="DiffuRec", **overrides):
    config = Config(model=name, dataset=SLICE, config_dict=dict(SMALL, **overrides), cmd_line=False)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model(name)(config, train._dataset)
    return config, model, train, test


def first_batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


def test_schedule_is_diffurecs_truncated_linear():
    _, model, _, _ = build()
    assert model.diffusion.num_steps == 32
    assert model.diffusion.betas[0].item() == pytest.approx(0.013125, rel=1e-6)
    assert model.diffusion.betas[-1].item() == pytest.approx(0.635, rel=1e-6)


def _repad(inter, model, length):
    seq = inter[model.ITEM_SEQ]
    out = torch.zeros(seq.shape[0], length, dtype=seq.dtype)
    n = min(length, seq.shape[1])
    out[:, :n] = seq[:, :n]
    return Interaction(
        {model.ITEM_SEQ: out, model.ITEM_SEQ_LEN: inter[model.ITEM_SEQ_LEN], model.USER_ID: inter[model.USER_ID]}
    )


@pytest.mark.parametrize("name", ["DiffuRec", "DiffuRecSys"])
@torch.no_grad()
def test_padding_changes_nothing_with_lambda_zero(name):
    _, model, _, test = build(name, lambda_mean=0.0, lambda_std=0.0, trim_padding=False, position_embedding=True)
    model.eval()
    inter = first_batch(test)
    assert int(inter[model.ITEM_SEQ_LEN].max()) <= 10
    short = model.full_sort_predict(_repad(inter, model, 10))
    long = model.full_sort_predict(_repad(inter, model, 37))
    assert torch.allclose(short, long, atol=1e-5)
    model.trim_padding = True
    assert torch.allclose(model.full_sort_predict(_repad(inter, model, 37)), short, atol=1e-5)


def test_every_block_of_a_four_block_diffurecsys_learns():
    _, model, train, _ = build("DiffuRecSys", n_blocks=4)
    model.train()
    model.calculate_loss(first_batch(train)).backward()
    for k, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"block {k} {name} got no gradient"


@pytest.mark.parametrize(
    "mode,mean,var,shared",
    [("none", 0.0, 1.0, 0.0), ("constant", 0.1, 1.0, 0.0), ("iid", 0.0, 1.01, 0.0), ("random", 0.0, 1.01, 0.01)],
)
def test_training_noise_modes(mode, mean, var, shared):
    _, model, _, _ = build("DiffuRecSys", offset_noise_mode=mode)
    torch.manual_seed(0)
    h = 64
    eps = model.training_noise((4000, h), "cpu")
    assert eps.mean().item() == pytest.approx(mean, abs=0.01)
    assert eps.var().item() == pytest.approx(var, abs=0.03)
    # what tells random from iid: random's shift is one draw per sample shared by its H dimensions, so a row's
    # mean varies by offset_scale^2 = 0.01 beyond the 1/H of independent noise; iid's shifts average out
    assert eps.mean(dim=1).var().item() - 1 / h == pytest.approx(shared, abs=0.004)


@pytest.mark.parametrize("name", ["DiffuRec", "DiffuRecSys"])
def test_loss_decreases(name):
    _, model, train, _ = build(name)
    batch = first_batch(train)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(0)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


@torch.no_grad()
def test_evaluation_is_reproducible_under_a_fixed_seed():
    _, model, _, test = build("DiffuRecSys", inference_samples=2)
    model.eval()
    inter = first_batch(test)
    torch.manual_seed(123)
    a = model.full_sort_predict(inter)
    torch.manual_seed(456)  # global RNG state must not matter
    b = model.full_sort_predict(inter)
    assert torch.equal(a, b)
    _, other, _, _ = build("DiffuRecSys", inference_samples=2, seed=7)
    other.load_state_dict(model.state_dict())
    other.eval()
    assert not torch.equal(other.full_sort_predict(inter), a)  # another seed draws other noise


@torch.no_grad()
def test_multi_sample_inference_averages_distributions():
    _, model, _, test = build("DiffuRec", inference_samples=3)
    model.eval()
    inter = first_batch(test)
    scores = model.full_sort_predict(inter)
    assert scores.shape == (inter[model.ITEM_SEQ].shape[0], model.n_items)
    assert torch.allclose(torch.logsumexp(scores, dim=1), torch.zeros(scores.shape[0]), atol=1e-4)
    # the same three reverse runs (same generator, in order), averaged here as probabilities
    from recbole_diff.model.utils import eval_generator

    seq, seq_len = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
    generator = eval_generator(model.eval_seed, inter, model.USER_ID, seq.device)
    runs = [model._reverse_grouped(seq, seq_len, generator) @ model.item_embedding.weight.t() for _ in range(3)]
    assert not torch.allclose(runs[0], runs[1])  # independent runs, not one run three times
    expected = torch.log(sum(torch.softmax(r, dim=1) for r in runs) / 3)
    assert torch.allclose(scores, expected, atol=1e-5)


@torch.no_grad()
def test_sampled_evaluation_scores_one_run_per_user():
    _, model, _, test = build("DiffuRec", lambda_mean=0.0, lambda_std=0.0)
    model.eval()
    inter = first_batch(test)
    users = inter[model.USER_ID][:3]
    seq, seq_len = inter[model.ITEM_SEQ][:3], inter[model.ITEM_SEQ_LEN][:3]
    items = torch.tensor([5, 9, 11, 2])
    rows = Interaction(
        {
            model.USER_ID: users.repeat_interleave(4),
            model.ITEM_SEQ: seq.repeat_interleave(4, 0),
            model.ITEM_SEQ_LEN: seq_len.repeat_interleave(4),
            model.ITEM_ID: items.repeat(3),
        }
    )
    scores = model.predict(rows).view(3, 4)
    # each user's candidates are read off that user's own full ranking
    full = model.full_sort_predict(
        Interaction({model.USER_ID: users, model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: seq_len})
    )
    assert torch.allclose(scores, full[:, items], atol=1e-5)


@torch.no_grad()
def test_batches_are_cut_to_their_longest_real_sequence():
    _, model, _, test = build("DiffuRec", length_buckets=1, MAX_ITEM_LIST_LENGTH=50)
    model.eval()
    batch = first_batch(test)
    lengths = torch.tensor([3, 5, 7, 2])
    seq = batch[model.ITEM_SEQ][:4].clone()
    seq[torch.arange(seq.shape[1])[None] >= lengths[:, None]] = 0  # right-padded histories of these lengths
    inter = Interaction({model.USER_ID: batch[model.USER_ID][:4], model.ITEM_SEQ: seq, model.ITEM_SEQ_LEN: lengths})
    widths = []
    original = model.encode_history
    model.encode_history = lambda seq: (widths.append(seq.shape[1]), original(seq))[1]
    model.full_sort_predict(inter)
    assert seq.shape[1] == 50 and widths == [7]
    model.trim_padding = False
    widths.clear()
    model.full_sort_predict(inter)
    assert widths == [50]


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="approximator"):
        build("DiffuRec", approximator="mlp")
    with pytest.raises(ValueError, match="offset_noise_mode"):
        build("DiffuRecSys", offset_noise_mode="big")


def test_checkpoint_round_trip(tiny):
    result = run_recbole_diff(
        "DiffuRecSys", SLICE, config_dict=dict(tiny, hidden_size=16, n_blocks=1, n_heads=2, epochs=1), cmd_line=False
    )
    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    assert dict(trainer.evaluate(test_data, load_best_model=False)) == pytest.approx(
        dict(result["test_result"]), abs=1e-4
    )


def test_length_groups_change_nothing_but_cost():
    _, model, train, test = build("DiffuRecSys", lambda_mean=0.0, lambda_std=0.0, length_buckets=1)
    model.eval()
    batch, inter = first_batch(train), first_batch(test)
    torch.manual_seed(0)
    plain_loss = model.calculate_loss(batch)
    with torch.no_grad():
        plain_scores = model.full_sort_predict(inter)
    model.length_buckets = 4
    assert len(model._groups(batch[model.ITEM_SEQ_LEN])) == 4
    torch.manual_seed(0)
    assert model.calculate_loss(batch).item() == pytest.approx(plain_loss.item(), rel=1e-5)
    with torch.no_grad():
        assert torch.allclose(model.full_sort_predict(inter), plain_scores, atol=1e-5)


@pytest.mark.parametrize("name", ["DiffuRec", "DiffuRecSys"])
@pytest.mark.parametrize("init,scale", [("xavier", "unit"), ("normal", "raw")])
def test_the_noised_target_carries_the_target_at_small_steps(name, init, scale):
    """x0 at the noise's scale (the authors' N(0, 1) table, or a xavier table divided by its std): at the first
    steps x_t is mostly x0, so the reverse process has something to denoise towards."""
    _, model, _, _ = build(name, hidden_size=64, n_heads=2, item_init=init, x0_scale=scale)
    items = torch.arange(1, 257)
    x0 = model.target_embedding(items).detach()
    assert x0.std().item() == pytest.approx(1.0, abs=0.05)
    for step, least in ((0, 0.9), (3, 0.8)):
        t = torch.full((len(x0),), step)
        x_t = model.diffusion.q_sample(x0, t, torch.randn_like(x0))
        assert torch.cosine_similarity(x_t, x0, dim=-1).mean().item() > least, step


def test_a_small_raw_table_leaves_the_noised_target_nearly_pure_noise():
    _, model, _, _ = build(hidden_size=64, n_heads=2, item_init="xavier", x0_scale="raw")
    x0 = model.target_embedding(torch.arange(1, 257)).detach()
    assert x0.std().item() < 0.1
    x_t = model.diffusion.q_sample(x0, torch.zeros(256, dtype=torch.long), torch.randn_like(x0))
    assert torch.cosine_similarity(x_t, x0, dim=-1).mean().item() < 0.5
