"""stage_cache: a plugin's first stage trained once, loaded by every later run that would train the same."""

import glob
import logging
import os
import threading
import time

import pytest
import torch
from helpers import SLICE
from test_diffuasr import ASR
from test_globaldiff import FAST
from test_pdrec import PD

from recbole_diff.config import Config
from recbole_diff.io import load_checkpoint
from recbole_diff.quick_start import run_recbole_diff
from recbole_diff.trainer.stage_cache import Stage, stage_key


def _config(model="GlobalDiff", **overrides):
    return Config(
        model=model,
        dataset=SLICE,
        backbone="SASRec" if model == "GlobalDiff" else None,
        config_dict=dict(FAST, **overrides),
        cmd_line=False,
    )


def test_the_stage_key_holds_the_backbones_keys_only():
    base = stage_key(_config(), "SASRec")
    # keys only the plugin reads, and bookkeeping, leave the stage as it is
    assert (
        stage_key(_config(gamma=0.1, guidance="none", checkpoint_dir="elsewhere", eval_batch_size=7), "SASRec") == base
    )
    # anything the backbone's training reads makes another stage
    # (long_term_eval holds interactions out of training)
    for key, value in [
        ("hidden_size", 32),
        ("learning_rate", 0.01),
        ("seed", 1),
        ("MAX_ITEM_LIST_LENGTH", 5),
        ("long_term_eval", True),
    ]:
        assert stage_key(_config(**{key: value}), "SASRec") != base, key
    assert set(base["data_files"]) >= {os.path.basename(SLICE) + ".inter"}


def test_data_files_count_by_content_not_by_time(tmp_path):
    from recbole_diff.trainer.settings import data_files

    folder = tmp_path / "d"
    folder.mkdir()
    data = folder / "d.inter"
    data.write_text("user_id:token\titem_id:token\n1\t2\n")
    before = data_files({"data_path": str(folder)})
    os.utime(data, (1, 1))  # provisioned again: same bytes, another time
    assert data_files({"data_path": str(folder)}) == before
    # same size, other content, written as datasets are provisioned (a new file moved in): a new inode, so the
    # test does not depend on the file system's time resolution
    (folder / "new").write_text("user_id:token\titem_id:token\n1\t3\n")
    os.replace(folder / "new", data)
    after = data_files({"data_path": str(folder)})
    assert after != before and after["d.inter"][0] == before["d.inter"][0]


def test_globaldiff_runs_share_the_backbone_and_give_the_same_results(tmp_path):
    cfg = dict(FAST, checkpoint_dir=str(tmp_path / "saved"), stage_cache=str(tmp_path / "stages"))
    first = run_recbole_diff("GlobalDiff", SLICE, backbone="SASRec", config_dict=cfg, cmd_line=False)
    stored = glob.glob(str(tmp_path / "stages" / "SASRec-backbone-*.pth"))
    assert len(stored) == 1 and not glob.glob(str(tmp_path / "stages" / "*.lock"))
    assert first["backbone_checkpoint"] != stored[0]  # the first run trained its own
    # the stored copy keeps the weights and leaves out the optimiser's state, which no later run reads
    kept, trained = (torch.load(p, weights_only=False) for p in (stored[0], first["backbone_checkpoint"]))
    assert (
        "optimizer" in trained
        and "optimizer" not in kept
        and os.path.getsize(stored[0]) < os.path.getsize(first["backbone_checkpoint"])
    )
    assert all(torch.equal(kept["state_dict"][k], v) for k, v in trained["state_dict"].items())

    second = run_recbole_diff("GlobalDiff", SLICE, backbone="SASRec", config_dict=cfg, cmd_line=False)
    assert second["backbone_checkpoint"] == stored[0]
    # loading the stage instead of training it changes nothing downstream
    for key in ("test_result", "backbone_test_result", "backbone_best_valid_result", "best_valid_result"):
        assert dict(second[key]) == pytest.approx(dict(first[key]), abs=1e-6), key

    other = run_recbole_diff(
        "GlobalDiff",
        SLICE,
        backbone="SASRec",
        cmd_line=False,
        config_dict=dict(cfg, gamma=0.2, hidden_dropout_prob=0.3),
    )
    assert other["backbone_checkpoint"] not in stored  # a backbone key changed: its own stage
    assert len(glob.glob(str(tmp_path / "stages" / "SASRec-backbone-*.pth"))) == 2


def test_pdrec_runs_share_tidiffrec_and_give_the_same_results(tmp_path):
    cfg = dict(PD, checkpoint_dir=str(tmp_path / "saved"), stage_cache=str(tmp_path / "stages"), epochs=1)
    first = run_recbole_diff("PDRec", SLICE, config_dict=cfg, cmd_line=False)
    stored = glob.glob(str(tmp_path / "stages" / "TIDiffRec-*.pth"))
    assert len(stored) == 1
    second = run_recbole_diff("PDRec", SLICE, config_dict=cfg, cmd_line=False)
    assert second["tidiffrec_checkpoint"] == stored[0]
    assert dict(second["test_result"]) == pytest.approx(dict(first["test_result"]), abs=1e-6)
    # another HBR setting is another plugin run on the same stage
    third = run_recbole_diff("PDRec", SLICE, config_dict=dict(cfg, use_hbr=False), cmd_line=False)
    assert third["tidiffrec_checkpoint"] == stored[0]
    # ... and so is its preference store, computed once beside the shared stage
    assert first["preference_store_reused"] is False
    assert second["preference_store_reused"] is True and third["preference_store_reused"] is True
    assert first["preference_store"] == second["preference_store"] == third["preference_store"]
    assert os.path.dirname(first["preference_store"]) == str(tmp_path / "stages")
    assert not glob.glob(str(tmp_path / "stages" / "*.lock"))


def test_diffuasr_runs_that_differ_in_sampling_only_share_the_augmenter(tmp_path):
    def run(cache, **overrides):
        cfg = dict(
            ASR,
            epochs=1,
            checkpoint_dir=str(tmp_path / "saved"),
            **dict(dict(guide="cg", guidance_scale=1.0), **overrides),
        )
        if cache:
            cfg["stage_cache"] = str(tmp_path / "stages")
        return run_recbole_diff("DiffuASR", SLICE, config_dict=cfg, cmd_line=False)

    def stored():
        return glob.glob(str(tmp_path / "stages" / "DiffuASR-augmenter-*.pth"))

    first = run(True, sample_steps=5)
    assert len(stored()) == 1 and "augmenter_stage" not in first
    # stored small enough to carry: the frozen item table is the backbone's, and a stage needs no optimiser state
    assert "embedding.weight" not in load_checkpoint(stored()[0]) and "null" in load_checkpoint(stored()[0])
    backbone_stage = glob.glob(str(tmp_path / "stages" / "SASRec-backbone-*.pth"))
    assert len(backbone_stage) == 1 and "optimizer" not in load_checkpoint(backbone_stage[0])
    second = run(True, sample_steps=3, guidance_scale=10.0)  # another sampler setting: the same augmenter, loaded
    assert second["augmenter_stage"] == stored()[0]
    assert second["augmenter_final_loss"] == first["augmenter_final_loss"]
    assert second["augmenter_seconds"] == 0 and second["augmenter_trained_seconds"] == first["augmenter_seconds"]
    # loading it gives what training it in the run gives
    alone = run(False, sample_steps=3, guidance_scale=10.0, augmented_data_path=str(tmp_path / "alone"))
    assert "augmenter_stage" not in alone
    for key in ("test_result", "best_valid_result"):
        assert dict(second[key]) == pytest.approx(dict(alone[key]), abs=1e-6), key
    assert run(True, guide="none", sample_steps=3)["augmenter_stage"] == stored()[0]  # unguided: the same network
    # rounding with or without the user's own items: the same augmenter
    for exclude in (True, False):
        assert run(True, exclude_history=exclude, sample_steps=4)["augmenter_stage"] == stored()[0]
    # condition dropout is training: classifier-free guidance gets its own augmenter
    cf = run(True, guide="cf", sample_steps=3)
    assert "augmenter_stage" not in cf and len(stored()) == 2
    assert not glob.glob(str(tmp_path / "stages" / "*.lock"))


def test_a_run_waits_for_the_one_training_the_stage(tmp_path):
    config = _config()
    trainer_side = Stage(str(tmp_path), "SASRec-backbone", config, "SASRec").acquire(logging.getLogger())
    assert not trainer_side.hit
    checkpoint = tmp_path / "trained.pth"
    checkpoint.write_bytes(b"weights")

    def finish():
        time.sleep(0.5)
        trainer_side.store(str(checkpoint), valid_result={"ndcg@10": 0.5})
        trainer_side.release()

    threading.Thread(target=finish).start()
    start = time.time()
    waiter = Stage(str(tmp_path), "SASRec-backbone", config, "SASRec").acquire(logging.getLogger(), poll=0.05)
    assert waiter.hit and time.time() - start >= 0.4
    assert waiter.meta == {"valid_result": {"ndcg@10": 0.5}}
    assert open(waiter.path, "rb").read() == b"weights"
