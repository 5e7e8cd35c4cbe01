"""Ray Tune search on the test slice (marked `tune`: starts a local Ray; runs in CI)."""

import json
import os

import pytest
import yaml
from helpers import SLICE, TINY

from recbole_diff.config import Config
from recbole_diff.tune import SearchSpaceError, load_space


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text,match",
    [
        ("learning_rate: {normal: [0, 1]}\n", "unknown distribution 'normal'"),
        ("learning_rate: [0.1, 0.2]\n", "exactly one distribution"),
        ("learning_rate: {uniform: [0.2, 0.1]}\n", "low < high"),
        ("learning_rate: {loguniform: [0, 0.1]}\n", "positive lower bound"),
        ("- a\n- b\n", "must map config keys"),
    ],
)
def test_bad_search_spaces_are_refused(tmp_path, text, match):
    with pytest.raises(SearchSpaceError, match=match):
        load_space(write(tmp_path, text))


def test_missing_space_file(tmp_path):
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_space(str(tmp_path / "nope.yaml"))


def test_every_shipped_space_is_valid():
    import glob
    import os

    from helpers import SLICE, TINY

    from recbole_diff import properties_dir
    from recbole_diff.quick_start import build_config

    files = glob.glob(os.path.join(properties_dir(), "tune", "*.yaml"))
    assert len(files) >= 5
    for path in files:
        space = load_space(path)
        model = os.path.splitext(os.path.basename(path))[0]
        known = build_config(model, SLICE, config_dict=dict(TINY), cmd_line=False).final_config_dict
        assert space and set(space) <= set(known), (model, set(space) - set(known))


@pytest.mark.tune
def test_two_trials_on_local_ray_write_a_loadable_best_config(tmp_path):
    ray = pytest.importorskip("ray")
    from recbole_diff.trainer.resume import plain_settings
    from recbole_diff.tune import run_tune

    space = write(tmp_path, "learning_rate: {grid: [0.001, 0.01]}\n")
    # the model's size in a config file, the rest as overrides: best.yaml must keep both
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text("hidden_size: 8\ninner_size: 16\nweight_decay: 1e-6\n")
    fixed = dict({k: v for k, v in TINY.items() if k not in ("hidden_size", "inner_size", "embedding_size")}, epochs=2)
    try:
        best, best_yaml, _ = run_tune(
            "SASRec",
            SLICE,
            space,
            samples=1,
            config_dict=fixed,
            config_files=[str(sizes)],
            cpus=2,
            out_dir=str(tmp_path / "runs"),
            log=lambda *_: None,
        )
    finally:
        ray.shutdown()
    assert best["learning_rate"] in (0.001, 0.01)
    written = yaml.safe_load(open(best_yaml))
    assert written["model"] == "SASRec" and written["learning_rate"] == best["learning_rate"]
    config = Config(config_file_list=[best_yaml], cmd_line=False)
    assert config["model"] == "SASRec" and config["learning_rate"] == best["learning_rate"]
    # the config the best trial had, built the way its trainable built it
    trial = Config("SASRec", SLICE, config_file_list=[str(sizes)], config_dict=dict(fixed, **best), cmd_line=False)
    assert (config["hidden_size"], config["inner_size"], config["weight_decay"]) == (8, 16, 1e-6)
    assert plain_settings(config) == plain_settings(trial)
    summary = json.load(open(os.path.join(os.path.dirname(best_yaml), "summary.json")))
    assert summary["trials"] == 2 and summary["wall_seconds"] > 0 and summary["search_seed"] == config["seed"]
    assert all(t["error"] is None and 1 <= t["validations"] <= 2 for t in summary["per_trial"])
    assert sum(t["finished"] for t in summary["per_trial"]) + summary["stopped_early"] == 2
    # the reported best is the best validation any trial reached, the value the selection used
    assert summary["best"][summary["metric"]] == max(t["best"] for t in summary["per_trial"])
    assert all(t["best"] >= t["last"] for t in summary["per_trial"])
    assert summary["best"]["config"] == best


def test_unknown_model_fails_before_any_trial(tmp_path):
    from recbole_diff.tune import run_tune

    space = write(tmp_path, "learning_rate: {choice: [0.001]}\n")
    with pytest.raises(ValueError, match="Unknown model 'Nope'"):
        run_tune("Nope", SLICE, space, samples=1, config_dict=dict(TINY))
