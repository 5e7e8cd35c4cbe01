"""Sampled evaluation batches built at once (``CandidateEvalDataLoader``) are RecBole's, draw for draw."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATA_PATH, SLICE, TINY
from recbole.data import create_dataset, data_preparation
from recbole.data.dataloader import NegSampleEvalDataLoader
from recbole.sampler import RepeatableSampler, Sampler

from recbole_diff.config import Config
from recbole_diff.data.loaders import CandidateEvalDataLoader
from recbole_diff.quick_start import prepare_data

LS = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
# a ratio split gives users several validation and test rows, each with its own candidates
RS = {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "TO", "group_by": "user", "mode": "pop20"}


def loaders(model, eval_args, dataset=SLICE, **extra):
    config = Config(model=model, dataset=dataset, cmd_line=False, config_dict=dict(TINY, eval_args=eval_args, **extra))
    _, valid, test = data_preparation(config, create_dataset(config))
    return config, valid, test


def batches(loader, seed):
    np.random.seed(seed)
    random.seed(seed)  # BERT4Rec's masking draws from Python's random
    out = list(loader)
    return out, np.random.get_state()[1].copy()


def assert_same_batches(ours, recboles):
    assert len(ours) == len(recboles)
    for (data, *rest), (their_data, *their_rest) in zip(ours, recboles):
        assert set(data.columns) == set(their_data.columns)
        for field in their_data.columns:
            assert data[field].dtype == their_data[field].dtype and torch.equal(data[field], their_data[field]), field
        for mine, theirs in zip(rest, their_rest):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)


@pytest.mark.parametrize("eval_args", [LS, RS], ids=["LS-uni100", "RS-pop20"])
@pytest.mark.parametrize(
    "model, sampler", [("SASRec", RepeatableSampler), ("BPR", Sampler)], ids=["each-row-its-own", "user-history"]
)
def test_batches_and_the_random_stream_are_recboles(model, sampler, eval_args):
    # RepeatableSampler excludes each row's own item only, Sampler the user's items (repeatable: False)
    config, valid, test = loaders(model, eval_args, repeatable=sampler is RepeatableSampler)
    assert type(valid._sampler) is sampler
    for loader in (valid, test):
        ours = CandidateEvalDataLoader(config, loader._dataset, loader._sampler, shuffle=False)
        assert ours._at_once()  # the batches below are built at once, not by RecBole's code
        draws, sampling = [], loader._sampler.sampling
        loader._sampler.sampling = lambda n, d=draws, draw=sampling: d.append(n) or draw(n)
        mine, state = batches(ours, 11)
        del loader._sampler.sampling
        users = sum(int(u[-1]) + 1 for _, _, u, _ in mine)
        assert len(draws) > users  # some draws hit a used item and were drawn again, as RecBole's are
        theirs, their_state = batches(loader, 11)
        assert_same_batches(mine, theirs)
        assert (state == their_state).all()  # every later draw is the same too
        if eval_args is RS:
            assert any(len(p) > int(u[-1]) + 1 for _, _, u, p in mine)  # users with several rows were covered


def test_batches_it_cannot_build_at_once_are_built_by_recbole():
    config, valid, _ = loaders("BERT4Rec", LS)  # its eval batches go through the masking transform
    ours = CandidateEvalDataLoader(config, valid._dataset, valid._sampler, shuffle=False)
    assert not ours._at_once()
    assert_same_batches(batches(ours, 3)[0], batches(valid, 3)[0])


@pytest.mark.parametrize("fast", [True, False])
def test_runs_get_it_with_fast_sampled_eval(fast):
    config = Config(
        model="SASRec", dataset=SLICE, cmd_line=False, config_dict=dict(TINY, eval_args=LS, fast_sampled_eval=fast)
    )
    _, _, valid, test = prepare_data(config)
    kind = CandidateEvalDataLoader if fast else NegSampleEvalDataLoader
    assert type(valid) is kind and type(test) is kind


def test_a_run_gives_the_same_results_as_with_recboles_loader(tiny, monkeypatch):
    import recbole_diff.quick_start as quick_start

    config = dict(tiny, eval_args=LS, metrics=["Hit", "NDCG", "GAUC"], epochs=3)
    ours = quick_start.run_recbole_diff("SASRec", SLICE, config_dict=config, cmd_line=False)
    monkeypatch.setattr(quick_start, "fast_eval_loaders", lambda config, *loaders: loaders)
    theirs = quick_start.run_recbole_diff("SASRec", SLICE, config_dict=config, cmd_line=False)
    assert ours["best_valid_result"] == theirs["best_valid_result"] and ours["test_result"] == theirs["test_result"]


def test_user_and_item_features_are_joined_as_recbole_joins_them(tmp_path):
    # the slice with a user table and an item table (a sequence and a float per item, some items without a row)
    folder = tmp_path / "featured"
    folder.mkdir()
    inter = (Path(DATA_PATH) / SLICE / f"{SLICE}.inter").read_text()
    (folder / "featured.inter").write_text(inter)
    rows = [line.split("\t") for line in inter.splitlines()[1:]]
    users, items = sorted({r[0] for r in rows}), sorted({r[1] for r in rows})
    (folder / "featured.user").write_text(
        "user_id:token\tage:float\n" + "".join(f"{u}\t{int(u) % 50}\n" for u in users)
    )
    (folder / "featured.item").write_text(
        "item_id:token\tgenres:token_seq\tprice:float\n"
        + "".join(f"{i}\tg{int(i) % 5} g{int(i) % 7}\t{int(i) / 10}\n" for i in items[::2])
    )
    load = {
        "inter": ["user_id", "item_id", "timestamp"],
        "user": ["user_id", "age"],
        "item": ["item_id", "genres", "price"],
    }
    config, valid, _ = loaders("SASRec", RS, dataset="featured", data_path=str(tmp_path), load_col=load)
    assert valid._dataset.item_feat is not None and valid._dataset.user_feat is not None
    ours = CandidateEvalDataLoader(config, valid._dataset, valid._sampler, shuffle=False)
    assert ours._at_once()
    mine, theirs = batches(ours, 5)[0], batches(valid, 5)[0]
    assert {"genres", "price", "age"} <= set(mine[0][0].columns)
    assert_same_batches(mine, theirs)
