"""The host-transfer guard itself (tests/host_guard.py), and every model's hot calls under it."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_diff.config import Config
from recbole_diff.device import host_fast_path
from recbole_diff.utils import get_model

from conftest import SLICE, TINY
from host_guard import CONVERSIONS, HostTransferError, guarded, no_host_transfers

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


def first_batch(loader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, tuple) else batch


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
