"""resume_dir: a killed run started again goes on from its last epoch and ends as an unbroken run would."""

import glob
import json
import os
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import yaml
from helpers import DATA_PATH, SLICE, TINY
from recbole.trainer import Trainer as RecBoleTrainer
from test_diffuasr import ASR
from test_globaldiff import FAST
from test_pdrec import PD

from recbole_diff.quick_start import run_recbole_diff
from recbole_diff.trainer import resume


class Killed(Exception):
    """Stands in for the process being killed."""


@contextmanager
def killed_after_point(monkeypatch, name_part, epoch):
    """Raise :class:`Killed` right after the resume point of ``name_part`` for ``epoch`` is written, as a
    process killed during that epoch would leave things."""
    save = resume.ResumePoint.save

    def save_then_die(self, **state):
        save(self, **state)
        if name_part in self.name and state.get("epoch") == epoch and not state.get("done"):
            raise Killed(self.name)

    monkeypatch.setattr(resume.ResumePoint, "save", save_then_die)
    try:
        with pytest.raises(Killed):
            yield
    finally:
        monkeypatch.setattr(resume.ResumePoint, "save", save)


@contextmanager
def counting_epochs(monkeypatch):
    epochs = []
    train_epoch = RecBoleTrainer._train_epoch

    def counted(self, train_data, epoch_idx, *args, **kwargs):
        epochs.append((type(self.model).__name__, epoch_idx))
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(RecBoleTrainer, "_train_epoch", counted)
    try:
        yield epochs
    finally:
        monkeypatch.setattr(RecBoleTrainer, "_train_epoch", train_epoch)


def run(model, cfg, **kwargs):
    return run_recbole_diff(model, SLICE, config_dict=cfg, cmd_line=False, **kwargs)


def same_results(a, b, keys=("best_valid_result", "test_result")):
    for key in keys:
        assert dict(a[key]) == dict(b[key]), key  # exactly: the same epochs with the same random numbers


def test_a_killed_training_goes_on_where_it_stopped_and_ends_as_an_unbroken_one(tmp_path, monkeypatch):
    # at this rate the validation peaks at epoch 1 and early stopping ends the training after epoch 4
    cfg = dict(TINY, epochs=12, stopping_step=2, learning_rate=0.03, checkpoint_dir=str(tmp_path / "saved"))
    with counting_epochs(monkeypatch) as epochs:
        unbroken = run("SASRec", dict(cfg, resume_dir=str(tmp_path / "unbroken")))
    assert [e for _, e in epochs] == [0, 1, 2, 3, 4]

    cfg["resume_dir"] = str(tmp_path / "resume")
    with killed_after_point(monkeypatch, "SASRec", epoch=3):  # after the best epoch, before the stop
        run("SASRec", cfg)
    with counting_epochs(monkeypatch) as epochs:
        again = run("SASRec", cfg)
    # only the epochs the killed run had not finished, and early stopping counts on from where it was
    assert epochs == [("SASRec", 3), ("SASRec", 4)]
    same_results(unbroken, again)  # the test result is read from the best (epoch 1) checkpoint of the killed run
    assert os.path.isfile(again["saved_model_file"])

    # a finished training is loaded, not trained again (a run killed while testing)
    with counting_epochs(monkeypatch) as epochs:
        done = run("SASRec", cfg)
    assert epochs == []
    same_results(unbroken, done)


def test_no_resume_points_without_checkpoints_or_for_trainers_they_do_not_cover(tmp_path):
    from recbole.trainer import RecVAETrainer

    from recbole_diff.config import Config
    from recbole_diff.quick_start import prepare_data
    from recbole_diff.trainer.trainer import compat_trainer

    cfg = dict(TINY, epochs=2, checkpoint_dir=str(tmp_path / "saved"), resume_dir=str(tmp_path / "resume"))
    run_recbole_diff("SASRec", SLICE, config_dict=cfg, cmd_line=False, saved=False)
    assert not os.path.isdir(tmp_path / "resume")  # the best weights would be lost: nothing to resume to

    config = Config(model="RecVAE", dataset=SLICE, config_dict=cfg, cmd_line=False)
    _, train, _, _ = prepare_data(config)
    from recbole_diff import get_model

    trainer = compat_trainer(RecVAETrainer)(config, get_model("RecVAE")(config, train.dataset))
    assert trainer._resume_point() is None  # two optimisers swapped per epoch: not in a point


def test_a_resume_point_of_other_settings_is_refused(tmp_path, monkeypatch):
    cfg = dict(TINY, epochs=3, checkpoint_dir=str(tmp_path / "saved"), resume_dir=str(tmp_path / "resume"))
    with killed_after_point(monkeypatch, "SASRec", epoch=1):
        run("SASRec", cfg)
    point = glob.glob(str(tmp_path / "resume" / "*.pth"))[0]
    # a point whose name matches but whose settings differ (a default changed since) is refused
    state = resume.load_checkpoint(point)
    state["settings"]["learning_rate"] = 0.01
    resume.torch.save(state, point)
    with pytest.raises(ValueError, match=r"other settings \('learning_rate'.*Delete it"):
        run("SASRec", cfg)
    # keys that cannot change the training may differ, and a key the point does not know (a newer default)
    state = resume.load_checkpoint(point)
    assert state["settings"].pop("learning_rate") == 0.01
    resume.torch.save(state, point)
    with counting_epochs(monkeypatch) as epochs:
        run("SASRec", dict(cfg, eval_batch_size=64, checkpoint_dir=str(tmp_path / "elsewhere")))
    assert epochs == [("SASRec", 1), ("SASRec", 2)]

    # a point of an older version kept the files' time: a new copy of the data (another time) is still resumed
    state = resume.load_checkpoint(point)
    files = state["settings"]["data_files"]
    state["settings"]["data_files"] = {name: [size, 12345] for name, (size, _) in files.items()}
    resume.torch.save(state, point)
    assert (
        resume.ResumePoint(
            os.path.dirname(point), os.path.basename(point)[:-4], dict(state["settings"], data_files=files)
        ).load()
        is not None
    )

    # other data is another training
    old = {name: [size, 12345] for name, (size, _) in files.items()}
    state["settings"]["data_files"] = dict(old, **{SLICE + ".inter": [files[SLICE + ".inter"][0] + 1, 12345]})
    resume.torch.save(state, point)
    with pytest.raises(ValueError, match="'data_files'"):
        run("SASRec", cfg)
    state["settings"]["data_files"] = dict(files, **{SLICE + ".inter": [files[SLICE + ".inter"][0], "0" * 16]})
    resume.torch.save(state, point)
    with pytest.raises(ValueError, match="'data_files'"):
        run("SASRec", cfg)


def test_globaldiff_resumes_its_backbone_stage_beside_the_stage_and_its_diffusion_stage_in_the_run(
    tmp_path, monkeypatch
):
    base = dict(FAST, epochs=3, diffusion_epochs=3, stopping_step=10, diffusion_stopping_step=10)
    unbroken = run(
        "GlobalDiff",
        dict(
            base, checkpoint_dir=str(tmp_path / "a"), stage_cache=str(tmp_path / "sa"), resume_dir=str(tmp_path / "ra")
        ),
        backbone="SASRec",
    )

    cfg = dict(
        base, checkpoint_dir=str(tmp_path / "b"), stage_cache=str(tmp_path / "sb"), resume_dir=str(tmp_path / "rb")
    )
    with killed_after_point(monkeypatch, "SASRec", epoch=2):
        run("GlobalDiff", cfg, backbone="SASRec")
    # the stage's point is beside the stage, where any run that claims the stage next finds it
    assert glob.glob(str(tmp_path / "sb" / "SASRec-backbone-*.resume" / "*.pth"))
    with killed_after_point(monkeypatch, "GlobalDiff", epoch=1):
        with counting_epochs(monkeypatch) as epochs:
            run("GlobalDiff", cfg, backbone="SASRec")
    assert epochs == [("SASRec", 2), ("GlobalDiff", 0)]  # another run claiming the stage would go on the same
    assert not glob.glob(str(tmp_path / "sb" / "*.resume"))  # stored: its point is dropped
    with counting_epochs(monkeypatch) as epochs:
        again = run("GlobalDiff", cfg, backbone="SASRec")
    assert epochs == [("GlobalDiff", 1), ("GlobalDiff", 2)]
    same_results(unbroken, again, ("best_valid_result", "test_result", "backbone_test_result"))


def test_pdrec_resumes_tidiffrec_with_its_importance_sampling_history(tmp_path, monkeypatch):
    # with 2 steps DiffRec's importance sampling (10 losses per step) is on from the first batch
    base = dict(PD, epochs=2, tidiffrec_epochs=7, tidiffrec={"dims_dnn": [32], "steps": 2})
    unbroken = run("PDRec", dict(base, checkpoint_dir=str(tmp_path / "a"), resume_dir=str(tmp_path / "ra")))

    cfg = dict(base, checkpoint_dir=str(tmp_path / "b"), resume_dir=str(tmp_path / "rb"))
    with killed_after_point(monkeypatch, "TIDiffRec", epoch=6):
        run("PDRec", cfg)
    (point,) = glob.glob(os.path.join(cfg["resume_dir"], f"*-TIDiffRec-{SLICE}-seed*.pth"))
    state = resume.load_checkpoint(point)
    assert int(state["other_parameter"]["Lt_count"].min()) >= 10
    with killed_after_point(monkeypatch, "PDRec", epoch=1):  # stage 3 (BCE + HBR + NNS + DPA)
        with counting_epochs(monkeypatch) as epochs:
            run("PDRec", cfg)
    assert epochs == [("TIDiffRec", 6), ("PDRec", 0)]
    with counting_epochs(monkeypatch) as epochs:
        again = run("PDRec", cfg)
    assert epochs == [("PDRec", 1)]
    same_results(unbroken, again, ("best_valid_result", "test_result", "tidiffrec_test_result"))


def test_diffuasr_resumes_its_augmenter_and_reuses_the_dataset_it_wrote(tmp_path, monkeypatch):
    base = dict(ASR, guide="cf", guidance_scale=1.0, augmenter_epochs=3, epochs=3, stopping_step=10)
    unbroken = run("DiffuASR", dict(base, checkpoint_dir=str(tmp_path / "a"), resume_dir=str(tmp_path / "ra")))

    cfg = dict(base, checkpoint_dir=str(tmp_path / "b"), resume_dir=str(tmp_path / "rb"))
    with killed_after_point(monkeypatch, "augmenter", epoch=2):
        run("DiffuASR", cfg)
    assert not glob.glob(str(tmp_path / "b" / "augmented" / "*"))
    with counting_epochs(monkeypatch) as epochs:
        with killed_after_point(monkeypatch, "SASRec-" + SLICE + "-", epoch=2):  # the backbone on the written data
            run("DiffuASR", cfg)
    assert epochs[0] == ("DiffuASR", 2)  # the augmenter went on at the epoch it was killed in
    assert ("DiffuASR", 0) not in epochs and ("SASRec", 0) in epochs
    written = glob.glob(str(tmp_path / "b" / "augmented" / "*"))
    assert len(written) == 1
    with counting_epochs(monkeypatch) as epochs:
        again = run("DiffuASR", cfg)  # no FileExistsError: the dataset is this run's own
    assert epochs == [("SASRec", 2)]
    assert again["augmented_dataset"] == written[0]
    same_results(unbroken, again, ("best_valid_result", "test_result", "backbone_test_result"))
    assert again["augmenter_final_loss"] == unbroken["augmenter_final_loss"]


def _cell_processes(directory):
    """Pids of processes running the bench cell in ``directory`` (Linux /proc)."""
    pids = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"--cell" in args and directory.encode() in args:
            pids.append(int(cmdline.split("/")[2]))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the cell's process through /proc")
def test_a_bench_cell_killed_midway_is_resumed_by_the_next_run_of_the_grid(tmp_path):
    from recbole_diff.benchmark import cell_dir, cells, load_grid, run_grid

    def grid(name):
        spec = {
            "name": name,
            "datasets": [SLICE],
            "seeds": [1],
            "config": dict(
                {k: v for k, v in TINY.items() if k != "data_path"}, epochs=10, stopping_step=10, state="INFO"
            ),
            "dataset_config": {SLICE: {"data_path": DATA_PATH}},
            "methods": [{"name": "SASRec", "model": "SASRec"}],
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)

    run_grid(grid("unbroken"), str(tmp_path / "unbroken"), log=lambda m: None)
    out = str(tmp_path / "out")
    path = grid("killed")
    directory = cell_dir(out, cells(load_grid(path))[0])
    runner = threading.Thread(target=run_grid, args=(path, out), kwargs={"log": lambda m: None})
    runner.start()
    deadline = time.time() + 120
    while not glob.glob(os.path.join(directory, "resume", "*.pth")) and time.time() < deadline:
        time.sleep(0.05)
    for pid in _cell_processes(directory):
        os.kill(pid, signal.SIGKILL)
    runner.join()
    assert not os.path.isfile(os.path.join(directory, "result.json"))

    messages = []
    run_grid(path, out, log=messages.append)
    assert any("ok (resumed)" in m for m in messages)
    log = open(os.path.join(directory, "log.txt")).read()
    assert "an earlier attempt did not finish" in log and "goes on at epoch" in log
    with open(os.path.join(directory, "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(cell_dir(str(tmp_path / "unbroken"), cells(load_grid(path))[0]), "result.json")) as f:
        unbroken = json.load(f)
    assert result["attempts"] == 2 and result["test_result"] == unbroken["test_result"]
    assert not os.path.isdir(os.path.join(directory, "resume"))  # the finished cell needs its points no more
