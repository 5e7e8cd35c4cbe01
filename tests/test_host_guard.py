"""The host-transfer guard itself (tests/host_guard.py), and every model's hot calls under it."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import SLICE, TINY
from host_guard import CONVERSIONS, HostTransferError, guarded, no_host_transfers
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed
from test_diffurec import first_batch

from recbole_diff import get_model
from recbole_diff.config import Config
from recbole_diff.device import host_fast_path

READS = {
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "item": lambda t: t[0].item(),
    "tolist": lambda t: t.tolist(),
    "array": lambda t: np.asarray(t),
    "int": lambda t: int(t[0]),
    "float": lambda t: float(t[0]),
    "bool": lambda t: bool(t[0]),
    "index": lambda t: [1, 2, 3][t[0]],
}


@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_every_host_read_raises_inside_and_works_after(name):
    t = torch.tensor([1, 0])
    with no_host_transfers(), pytest.raises(HostTransferError, match=name):
        READS[name](t)
    READS[name](t)  # restored on leaving


def test_scipy_conversions_of_tensors_raise():
    dense = torch.eye(3)
    with no_host_transfers():
        for convert in (sp.csr_matrix, sp.coo_matrix, sp.csc_matrix):
            with pytest.raises(HostTransferError):
                convert(dense)
    assert sp.csr_matrix(dense.numpy()).nnz == 3


def test_device_math_passes_and_allow_lets_one_kind_through():
    t = torch.arange(6.0)
    with no_host_transfers():
        out = (t * 2).sum(0, keepdim=True).exp()
        assert out.shape == (1,)
    with no_host_transfers(allow=("item",)):
        assert t[1].item() == 1.0
        with pytest.raises(HostTransferError):
            t.tolist()
    with pytest.raises(ValueError, match="unknown allow"):
        with no_host_transfers(allow=("items",)):
            pass


def test_the_guard_puts_recbole_diff_on_its_device_path():
    t = torch.zeros(1)
    assert host_fast_path(t)
    with no_host_transfers():
        assert not host_fast_path(t)
    assert host_fast_path(t)


def test_the_guard_restores_torch_even_when_the_call_fails():
    t = torch.tensor([3])
    with pytest.raises(KeyError):
        with no_host_transfers():
            raise KeyError("boom")
    assert t.item() == 3 and int(t) == 3 and t.cpu().tolist() == [3]


# ---- a planted host read in a real model's hot call is caught ------------------------------------------------
def build(name, **overrides):
    config = Config(model=name, dataset=SLICE, config_dict=dict(TINY, **overrides), cmd_line=False)
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model(name)(config, train._dataset)
    return config, model, train, test


def test_a_planted_item_in_a_hot_call_is_caught(monkeypatch):
    _, model, train, _ = build("SASRec")
    batch = first_batch(train)
    clean = guarded(model.calculate_loss)(batch)  # RecBole's SASRec reads nothing on the host
    original = type(model).calculate_loss

    def planted(self, interaction):
        loss = original(self, interaction)
        self.last_loss = loss.item()  # the kind of line that slips into a training step
        return loss

    monkeypatch.setattr(type(model), "calculate_loss", planted)
    with pytest.raises(HostTransferError, match=r"item\(?.* at .*test_host_guard.py"):
        guarded(model.calculate_loss)(batch)
    assert torch.isfinite(clean)


# ---- every model's hot calls pass it (on the device-agnostic path) -----------------------------------------
SEQUENTIAL = {"SASRec": {}, "DiffuRec": dict(n_blocks=2, n_heads=2), "DiffuRecSys": dict(n_blocks=2, n_heads=2)}


@pytest.mark.parametrize("name", sorted(SEQUENTIAL))
def test_sequential_models_train_and_score_without_host_reads(name):
    _, model, train, test = build(name, **SEQUENTIAL[name])
    batch, users = first_batch(train), first_batch(test)
    loss = guarded(model.calculate_loss)(batch)
    loss.backward()  # autograd runs outside the guard's reach anyway; the step itself is what is checked
    model.eval()
    with torch.no_grad():
        scores = guarded(model.full_sort_predict)(users)
        # predict (sampled evaluation) reads its rows' full sort
        rows = users[torch.arange(4)]
        own = guarded(model.full_sort_predict)(rows)
        rows.update(type(rows)({model.ITEM_ID: torch.tensor([1, 2, 3, 4])}))
        picked = guarded(model.predict)(rows)
    assert torch.isfinite(loss) and scores.shape == (len(users), model.n_items)
    assert torch.allclose(picked, own[torch.arange(4), torch.tensor([1, 2, 3, 4])], atol=1e-5)


def test_diffurec_device_path_scores_equal_the_trimmed_cpu_path_without_noise():
    """The device path runs untrimmed batches under the padding mask; with lambda = 0 the reverse process is
    deterministic given x_T, so both paths must score alike (the noise of the two differs only in its draw)."""
    _, model, _, test = build("DiffuRec", lambda_mean=0.0, lambda_std=0.0, **SEQUENTIAL["DiffuRec"])
    model.eval()
    users = first_batch(test)
    with torch.no_grad():
        fast = model.full_sort_predict(users)
        with no_host_transfers():
            device = model.full_sort_predict(users)
    assert torch.allclose(fast, device, atol=1e-4)


def test_diffuasr_generation_step_and_scoring_without_host_reads(tmp_path):
    from recbole_diff.quick_start import build_config, prepare_data

    config = build_config(
        "DiffuASR",
        SLICE,
        cmd_line=False,
        config_dict=dict(
            TINY,
            checkpoint_dir=str(tmp_path),
            hidden_size=16,
            diffusion_embedding_size=16,
            unet_channels=[8, 16, 16],
            M=3,
            sampler="ddim",
            sample_steps=5,
            guide="cf",
            gamma=1.0,
            clip_x0=True,
        ),
    )
    _, train, _, test = prepare_data(config)
    model = get_model("DiffuASR")(config, train.dataset)
    model.eval()
    aug = model.augmenter
    cond = aug.condition(torch.tensor([3, 4, 5, 6]), torch.tensor([0, 2]))
    exclude = torch.zeros(2, model.n_items, dtype=torch.bool)
    exclude[:, :3] = True
    with torch.no_grad():
        x0 = guarded(aug.sample)(cond, 1.0, "ddim", 5)
        items = guarded(model.round)(x0)
        # with exclusion, one read per chunk raises the user's error if a user has no item left
        excluded = guarded(model.round, allow=("bool",))(x0, exclude)
        assert guarded(model.full_sort_predict)(first_batch(test)).shape[1] == model.n_items
    assert items.shape == excluded.shape == (2, 3) and (excluded >= 3).all()
