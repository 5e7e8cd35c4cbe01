"""Every mistake a user makes is caught before compute is spent, and nothing a run writes collides with another
run's: one test per probe of the new-user trial (misspelled keys, exit status, late failures, data errors,
collisions)."""

import json
import logging
import os
import subprocess
import sys
import types
import warnings

import pytest
from helpers import DATA_PATH, SLICE, TINY
from test_benchmark import write_grid

import recbole_diff
from recbole_diff import get_model, get_trainer
from recbole_diff.benchmark import BenchmarkError, run_grid
from recbole_diff.cli import main
from recbole_diff.config import Config, UnknownKeyError, UnknownKeyWarning
from recbole_diff.quick_start import build_config, prepare_data
from recbole_diff.runtime import parse_key_values

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SASREC_KEYS = {k: v for k, v in TINY.items() if k != "embedding_size"}  # SASRec reads no embedding_size


def make(model="SASRec", **overrides):
    return Config(model=model, dataset=SLICE, config_dict=dict(SASREC_KEYS, **overrides), cmd_line=False)


# ---- 1. known keys -------------------------------------------------------------------------------------------
def test_a_misspelled_key_on_the_command_line_is_an_error_naming_the_likely_key(monkeypatch):
    import recbole_diff.quick_start as quick_start

    monkeypatch.setattr(quick_start, "prepare_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    words = [f"--{k}={v}" for k, v in SASREC_KEYS.items()]
    with pytest.raises(UnknownKeyError, match="'gama' for GlobalDiff: did you mean 'gamma'"):
        main(["--model=GlobalDiff", f"--dataset={SLICE}", "--gama=0.3"] + words)
    with pytest.raises(UnknownKeyError, match="did you mean 'diffusion_steps'"):
        make("GlobalDiff", diffusion_step=5)


def test_unknown_keys_warn_strict_keys_refuses_them_and_every_yaml_key_passes():
    with pytest.warns(UnknownKeyWarning, match="'my_note' are not read by SASRec"):
        make(my_note="x")
    with pytest.raises(UnknownKeyError, match="'my_note'.*strict_keys"):
        make(my_note="x", strict_keys=True)
    with pytest.raises(UnknownKeyError, match="'n_layers'.*not read by GlobalDiff with backbone GRU4Rec"):
        Config(
            model="GlobalDiff",
            dataset=SLICE,
            backbone="GRU4Rec",
            cmd_line=False,
            config_dict=dict(SASREC_KEYS, strict_keys=True),
        )
    # keys of RecBole's yamls (overall, dataset, model), ours and the backbone's, read from the yamls themselves
    legit = dict(
        SASREC_KEYS,
        strict_keys=True,
        load_col={"inter": ["user_id", "item_id", "timestamp"]},
        benchmark_filename=None,
        USER_ID_FIELD="user_id",
        stopping_step=3,
        weight_decay=0.0,
        hidden_dropout_prob=0.2,
        gamma=0.4,
        diffusion_steps=5,
        sample_steps=5,
        stage_cache=None,
        resume_dir=None,
        extra_test_modes=[],
        seed=3,
        nproc=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownKeyWarning)
        config = Config(model="GlobalDiff", dataset=SLICE, config_dict=legit, cmd_line=False)
    assert config["gamma"] == 0.4 and config["diffusion_steps"] == 5


def test_a_misspelled_key_in_a_bench_preset_stops_the_grid_before_any_cell(tmp_path):
    grid = write_grid(tmp_path, config=dict(SASREC_KEYS, epoch=1, data_path=DATA_PATH))
    with pytest.raises(BenchmarkError, match="SASRec on .*'epoch'.*did you mean 'epochs'"):
        run_grid(grid, str(tmp_path / "out"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "out" / "cells")
    with pytest.raises(BenchmarkError, match="unknown key 'baselin'; did you mean 'baseline'"):
        run_grid(write_grid(tmp_path, baselin="SASRec"), str(tmp_path / "out"), log=lambda *_: None)
    with pytest.raises(BenchmarkError, match="unknown key 'backbone'; did you mean 'backbones'"):
        run_grid(
            write_grid(tmp_path, methods=[{"model": "GlobalDiff", "backbone": "GRU4Rec"}]),
            str(tmp_path / "out"),
            log=lambda *_: None,
        )


def test_a_misspelled_key_in_a_tune_space_fails_before_ray_starts(tmp_path):
    from recbole_diff.tune import SearchSpaceError, run_tune

    space = tmp_path / "space.yaml"
    space.write_text("gama: {uniform: [0.2, 0.8]}\n")
    with pytest.raises(SearchSpaceError, match="'gama' for GlobalDiff: did you mean 'gamma'"):
        run_tune("GlobalDiff", SLICE, str(space), samples=1, config_dict=dict(SASREC_KEYS))
    space.write_text("sample_steps: {choice: [abc]}\n")
    with pytest.raises(SearchSpaceError, match="'sample_steps' must be of type int"):
        run_tune("GlobalDiff", SLICE, str(space), samples=1, config_dict=dict(SASREC_KEYS))


# ---- 2. the command line -------------------------------------------------------------------------------------
def _command(*args, script=False):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + sys.path), OMP_NUM_THREADS="1")
    head = (
        [os.path.join(os.path.dirname(sys.executable), "recbole-diff")]
        if script
        else [sys.executable, "-m", "recbole_diff"]
    )
    return subprocess.run(head + list(args), capture_output=True, text=True, env=env, timeout=600)


def test_the_console_script_exits_0_on_success_and_prints_results_on_stdout(tmp_path):
    words = [f"--{k}={v}" for k, v in SASREC_KEYS.items()]
    done = _command(
        "--model=SASRec", f"--dataset={SLICE}", *words, "--epochs=1", f"--checkpoint_dir={tmp_path}", script=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ndcg@10" in done.stdout and "best_valid_score" not in done.stderr
    assert "FutureWarning" not in done.stderr  # RecBole's pandas and torch warnings, hidden by the entry point
    failed = _command("--model=GlobalDiff", f"--dataset={SLICE}", "--gama=0.3", *words)
    assert failed.returncode != 0 and "did you mean 'gamma'" in failed.stderr


def test_help_lists_the_subcommands_each_has_its_own_and_version_prints(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(name in top for name in ("run", "demo", "doctor", "bench", "tune"))
    for command, words in (
        ("demo", "bundled ml-100k"),
        ("doctor", "known-broken"),
        ("run", "--config_files"),
        ("bench", "--config"),
        ("tune", "--space"),
    ):
        with pytest.raises(SystemExit) as code:
            main([command, "--help"])
        assert code.value.code == 0
        out = capsys.readouterr().out
        assert f"recbole-diff {command}" in out and words in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"recbole-diff {recbole_diff.__version__}"
    done = _command("--version")  # python -m recbole_diff
    assert done.returncode == 0 and recbole_diff.__version__ in done.stdout


def test_recboles_future_warnings_are_hidden_in_our_entry_points_only():
    from recbole_diff.cli import recbole_warnings_hidden

    # importing the package installs no filter: a user's own code keeps RecBole's warnings
    assert not [f for f in warnings.filters if f[2] is FutureWarning and f[3] is not None and "recbole" in f[3].pattern]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with recbole_warnings_hidden():
            warnings.warn_explicit("pandas says", FutureWarning, "dataset.py", 1, module="recbole.data.dataset")
            warnings.warn_explicit("user code says", FutureWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in caught] == ["user code says"]


# ---- 3. tune's best.yaml: see tests/test_tune.py (it starts Ray) -----------------------------------------------


# ---- 4. validate before compute ------------------------------------------------------------------------------
def test_keys_with_a_tilde_default_are_type_checked_at_config_time():
    with pytest.raises(TypeError, match="'sample_steps' must be of type int"):
        make("GlobalDiff", **parse_key_values(["--sample_steps=abc"]))
    with pytest.raises(TypeError, match="'resume_dir' must be of type str"):
        make(resume_dir=3)
    assert make("GlobalDiff", sample_steps=5)["sample_steps"] == 5


@pytest.mark.parametrize("key", ["checkpoint_dir", "resume_dir", "stage_cache", "augmented_data_path"])
def test_every_output_folder_is_checked_writable_before_training(tmp_path, key):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=f"{key} '.*a_file/sub' cannot be created"):
        Config(
            model="DiffuASR",
            dataset=SLICE,
            cmd_line=False,
            config_dict=dict(SASREC_KEYS, **{key: str(blocker / "sub")}),
        )


def test_an_unwritable_bench_out_is_refused_before_any_cell(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(BenchmarkError, match="--out"):
        run_grid(write_grid(tmp_path), str(blocker / "out"), log=lambda *_: None)


# ---- 5. data errors name the file and the fix ----------------------------------------------------------------
def _dataset(tmp_path, text, name="bad"):
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.inter").write_text(text)
    return {"data_path": str(tmp_path)}


@pytest.mark.parametrize(
    "text,match",
    [
        ("", r"bad\.inter' is empty.*name:type"),
        (
            "user_id\titem_id\ttimestamp\n1\t2\t3\n",
            r"bad\.inter': header column\(s\) 'user_id', 'item_id', "
            r"'timestamp' have no ':type'",
        ),
        ("user_id:token\titem_id:token\ttimestamp:float\n", r"bad\.inter' has a header but no interactions"),
    ],
)
def test_broken_atomic_files_are_named_with_the_fix(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        Config(model="SASRec", dataset="bad", config_dict=_dataset(tmp_path, text), cmd_line=False)


def test_an_empty_config_file_is_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.yaml' is empty"):
        Config(
            model="SASRec", dataset=SLICE, config_file_list=[str(empty)], config_dict=dict(SASREC_KEYS), cmd_line=False
        )


@pytest.mark.parametrize("model", ["TIDiffRec", "PDRec"])
def test_models_that_need_time_are_refused_a_file_without_it_before_loading(tmp_path, model):
    text = "user_id:token\titem_id:token\n" + "".join(f"{u}\t{i}\n" for u in range(3) for i in range(4))
    config = dict(
        _dataset(tmp_path, text),
        load_col={"inter": ["user_id", "item_id"]},
        eval_args={"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": "user", "mode": "full"},
    )
    with pytest.raises(ValueError, match=rf"bad\.inter' has no 'timestamp' column.*{model} orders"):
        Config(model=model, dataset="bad", config_dict=config, cmd_line=False)


# ---- 6. no collisions ----------------------------------------------------------------------------------------
def _trainer(tmp_path, **overrides):
    config = build_config(
        "SASRec",
        SLICE,
        config_dict=dict(
            SASREC_KEYS, checkpoint_dir=str(tmp_path / "saved"), resume_dir=str(tmp_path / "resume"), **overrides
        ),
        cmd_line=False,
    )
    train = prepare_data(config)[1]
    return get_trainer(config["MODEL_TYPE"], "SASRec")(config, get_model("SASRec")(config, train.dataset))


def test_runs_sharing_a_resume_dir_keep_points_of_their_own(tmp_path):
    first = _trainer(tmp_path)._resume_point().path
    assert _trainer(tmp_path)._resume_point().path == first  # the same run finds its point again
    others = {
        _trainer(tmp_path, seed=7)._resume_point().path,
        _trainer(tmp_path, learning_rate=0.01)._resume_point().path,
    }
    assert first not in others and len(others) == 2
    assert os.path.basename(first).startswith(f"Trainer-SASRec-{SLICE}-seed2020-")


def test_identical_runs_started_in_the_same_second_log_to_files_of_their_own(tmp_path, monkeypatch):
    from recbole.utils import logger as recbole_logger

    from recbole_diff.runtime import init_logger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recbole_logger, "get_local_time", lambda: "Jan-01-2026_00-00-00")
    config = make()
    root = logging.getLogger()
    saved = root.handlers[:]
    paths = []
    try:
        for _ in range(2):  # two processes: each starts with a logger of its own
            root.handlers = []
            paths.append(init_logger(config))
            for handler in root.handlers:
                handler.close()
    finally:
        root.handlers = saved
    assert paths[0] != paths[1] and all(os.path.isfile(p) for p in paths)


# ---- 7. smaller ----------------------------------------------------------------------------------------------
def test_backbone_errors():
    with pytest.raises(ValueError, match="SASRec is not a plugin model"):
        Config(model="SASRec", dataset=SLICE, backbone="GRU4Rec", config_dict=dict(SASREC_KEYS), cmd_line=False)
    with pytest.raises(ValueError) as err:
        Config(model="GlobalDiff", dataset=SLICE, backbone="SASRecc", config_dict=dict(SASREC_KEYS), cmd_line=False)
    message = str(err.value)
    assert "Unknown backbone 'SASRecc': did you mean SASRec" in message
    assert "GRU4Rec" in message and "BPR" not in message and "LightGCN" not in message


def test_bench_says_when_a_cell_starts_and_a_restart_rewrites_the_summary_first(tmp_path, monkeypatch):
    import recbole_diff.benchmark as bench

    grid, out = write_grid(tmp_path), str(tmp_path / "out")
    done = os.path.join(out, "cells", SLICE, "SASRec", "seed1")
    os.makedirs(done)
    with open(os.path.join(done, "result.json"), "w") as f:
        json.dump(
            {
                "cell": {
                    "dataset": SLICE,
                    "method": "SASRec",
                    "model": "SASRec",
                    "label": "SASRec",
                    "backbone": None,
                    "seed": 1,
                },
                "seconds": 3.0,
                "test_result": {"hit@10": 0.5, "ndcg@10": 0.25},
                "test_result_uni100": {"hit@10": 0.75},
            },
            f,
        )
    seen = {}

    class Child:  # the cell's process, finished at once
        pid = os.getpid()

        def wait(self, timeout=None):
            seen["summary"] = open(os.path.join(out, "results.md")).read()
            return 0

    fake = types.SimpleNamespace(
        Popen=lambda *a, **k: Child(), STDOUT=subprocess.STDOUT, TimeoutExpired=subprocess.TimeoutExpired
    )
    monkeypatch.setattr(bench, "subprocess", fake)
    messages = []
    run_grid(grid, out, log=messages.append)
    assert "| SASRec | 1 | 0.5000" in seen["summary"]  # written before the second cell ran
    assert any(m.startswith(f"[bench] starting {SLICE} SASRec (seed 2)") for m in messages)


def test_the_readme_snippet_does_not_read_the_scripts_command_line():
    readme = open(os.path.join(REPO, "README.md")).read()
    snippet = readme.split("```python", 1)[1].split("```", 1)[0]
    call = snippet[snippet.index("run_recbole_diff(") :].split("\n", 1)[0]
    assert "cmd_line=False" in call


def test_diffuasr_follows_its_backbones_width_unless_the_size_is_set(tmp_path):
    from test_diffuasr import ASR

    settings = {k: v for k, v in ASR.items() if k != "diffusion_embedding_size"}
    config = build_config("DiffuASR", SLICE, config_dict=dict(settings, checkpoint_dir=str(tmp_path)), cmd_line=False)
    train = prepare_data(config)[1]
    assert get_model("DiffuASR")(config, train.dataset).d == 16  # hidden_size 16, not the former default 64
    config = build_config(
        "DiffuASR",
        SLICE,
        cmd_line=False,
        config_dict=dict(settings, checkpoint_dir=str(tmp_path), diffusion_embedding_size=64),
    )
    with pytest.raises(ValueError, match="diffusion_embedding_size = the backbone's item embedding size \\(16\\)"):
        get_model("DiffuASR")(config, train.dataset)
