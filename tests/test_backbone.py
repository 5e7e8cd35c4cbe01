"""The backbone adapter reaches each RecBole model's own states and scores."""

import pytest
import torch
from helpers import SLICE, TINY
from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed

from recbole_diff import get_model
from recbole_diff.config import Config
from recbole_diff.model.backbone import BackboneAdapter


def build(name):
    config = Config(model=name, dataset=SLICE, config_dict=dict(TINY), cmd_line=False)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train, _, test = data_preparation(config, dataset)
    model = get_model(name)(config, train._dataset).eval()
    interaction = next(iter(test))[0]
    return model, interaction


PER_POSITION = ["SASRec", "LightSANs", "GRU4Rec", "BERT4Rec", "NARM", "NextItNet"]


@pytest.mark.parametrize("name", PER_POSITION + ["CORE", "STAMP"])
@torch.no_grad()
def test_scores_equal_full_sort_predict_and_last_hidden_equals_forward(name):
    model, inter = build(name)
    adapter = BackboneAdapter(model)
    seq, seq_len = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
    last = adapter.last_hidden(inter)
    if name == "BERT4Rec":
        own = model.gather_indexes(model.forward(model.reconstruct_test_data(seq, seq_len)), seq_len - 1)
    elif name in ("NextItNet", "CORE"):
        own = model.forward(seq)
    else:
        own = model.forward(seq, seq_len)
    assert last.shape == (seq.shape[0], own.shape[1]) and torch.allclose(last, own, atol=1e-6)
    scores = adapter.item_scores(inter)
    assert scores.shape == (seq.shape[0], model.n_items)
    assert torch.allclose(scores, model.full_sort_predict(inter), atol=1e-6)
    assert adapter.item_embeddings().shape[0] == model.n_items


@pytest.mark.parametrize("name", ["SASRec", "LightSANs", "GRU4Rec", "BERT4Rec"])
@torch.no_grad()
def test_state_at_the_last_real_position_is_forwards_output(name):
    model, inter = build(name)
    adapter = BackboneAdapter(model)
    states = adapter.position_hidden(inter)
    seq_len = inter[model.ITEM_SEQ_LEN]
    assert states.shape[:2] == inter[model.ITEM_SEQ].shape
    assert torch.allclose(model.gather_indexes(states, seq_len - 1), adapter.last_hidden(inter), atol=1e-6)


@torch.no_grad()
def test_causal_states_do_not_see_later_items():
    model, inter = build("SASRec")
    adapter = BackboneAdapter(model)
    seq = inter[model.ITEM_SEQ].clone()
    before = adapter.position_hidden(inter)
    seq[:, 5:] = torch.where(seq[:, 5:] > 0, (seq[:, 5:] % (model.n_items - 1)) + 1, seq[:, 5:])
    inter.update(type(inter)({model.ITEM_SEQ: seq}))
    after = adapter.position_hidden(inter)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert adapter.causal and not BackboneAdapter(build("BERT4Rec")[0]).causal


@torch.no_grad()
def test_rnn_and_cnn_states():
    model, inter = build("NARM")
    states = BackboneAdapter(model).position_hidden(inter)
    gru_out = model.gru(model.item_embedding(inter[model.ITEM_SEQ]))[0]
    assert torch.allclose(states, gru_out, atol=1e-6)
    model, inter = build("NextItNet")
    adapter = BackboneAdapter(model)
    # RecBole's NextItNet reads its prediction off the last column.
    assert torch.allclose(adapter.position_hidden(inter)[:, -1], adapter.last_hidden(inter), atol=1e-6)


def test_models_without_position_states_or_unknown_models_are_refused():
    model, _ = build("CORE")
    with pytest.raises(ValueError, match="per-position states.*'CORE'.*SASRec"):
        BackboneAdapter(model).require_position_states("GlobalDiff")
    caser, _ = build("Caser")
    with pytest.raises(ValueError, match="cannot adapt the backbone 'Caser'.*Supported backbones: .*GRU4Rec"):
        BackboneAdapter(caser)


def test_freeze_stops_gradients():
    model, inter = build("SASRec")
    adapter = BackboneAdapter(model).freeze()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not adapter.last_hidden(inter).requires_grad


@pytest.mark.parametrize("name", ["SASRec", "BERT4Rec", "GRU4Rec"])
@torch.no_grad()
def test_scores_and_states_come_from_one_consistent_pass(name):
    model, inter = build(name)
    adapter = BackboneAdapter(model)
    scores, states = adapter.scores_and_states(inter)
    assert torch.allclose(scores, model.full_sort_predict(inter), atol=1e-6)
    seq, seq_len = inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN]
    assert torch.allclose(states, adapter.states(adapter.eval_input(seq, seq_len), seq_len), atol=1e-6)
