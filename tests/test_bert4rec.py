"""BERT4Rec's loss at the counted masked slots only: RecBole's loss and gradients, from fewer logits."""

import pytest
import torch
from helpers import SLICE, TINY
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender.bert4rec import BERT4Rec as RecBoleBERT4Rec
from recbole.utils import init_seed

from recbole_diff import get_model
from recbole_diff.config import Config

TINY_BERT = {k: v for k, v in TINY.items() if k != "embedding_size"}  # BERT4Rec reads hidden_size


def build(**extra):
    # length 10 with mask_ratio 0.3: 3 slots a row, many of them padding on the slice's short prefixes
    config = Config(
        model="BERT4Rec", dataset=SLICE, config_dict=dict(TINY_BERT, mask_ratio=0.3, **extra), cmd_line=False
    )
    init_seed(config["seed"], True)
    train, _, _ = data_preparation(config, create_dataset(config))
    model = get_model("BERT4Rec")(config, train._dataset).eval()  # no dropout: both losses see one network
    return model, next(iter(train))


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_registry_gives_recboles_bert4rec_with_the_sparse_loss():
    model, _ = build()
    assert isinstance(model, RecBoleBERT4Rec) and model.sparse_masked_loss is True


def test_sparse_loss_equals_recboles_loss_and_gradients():
    model, batch = build()
    masked = batch[model.MASK_INDEX]
    assert 0 < int((masked > 0).sum()) < masked.numel()  # some slots count, some are padding
    ours, our_grads = loss_and_grads(model, type(model).calculate_loss, batch)
    theirs, their_grads = loss_and_grads(model, RecBoleBERT4Rec.calculate_loss, batch)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert our_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        assert torch.allclose(our_grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("extra", [{"sparse_masked_loss": False}, {"loss_type": "BPR"}])
def test_off_or_another_loss_type_trains_with_recboles_own_loss(extra):
    model, batch = build(**extra)
    assert torch.equal(model.calculate_loss(batch), RecBoleBERT4Rec.calculate_loss(model, batch))
