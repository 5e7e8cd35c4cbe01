"""End to end through the CLI path: train, save, reload, same scores; checkpoints never collide."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import SLICE
from recbole.utils import ModelType

from recbole_diff import get_model, get_trainer
from recbole_diff.cli import main, run_command
from recbole_diff.doctor import check_versions
from recbole_diff.quick_start import build_config, load_data_and_model, run_recbole_diff
from recbole_diff.runtime import parse_key_values
from recbole_diff.trainer import Trainer


def test_cli_trains_saves_and_the_reloaded_model_scores_the_same(tiny, capsys):
    args = [f"--{k}={v}" for k, v in tiny.items()]
    result = run_command(["--model=SASRec", f"--dataset={SLICE}", "--epochs=3"] + args)
    out = capsys.readouterr().out
    assert "SASRec" in out and "ndcg@10" in out
    assert result["model"] == "SASRec" and set(result) >= {
        "best_valid_score",
        "valid_score_bigger",
        "best_valid_result",
        "test_result",
    }
    path = result["saved_model_file"]
    assert os.path.isfile(path) and path.startswith(tiny["checkpoint_dir"])

    config, model, _, _, _, test_data = load_data_and_model(path)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    reloaded = trainer.evaluate(test_data, load_best_model=False)
    assert dict(reloaded) == pytest.approx(dict(result["test_result"]), abs=1e-4)

    # ... and in a new process, which has built no Config (RecBole's metrics need its numpy aliases)
    code = (
        "import json, sys\n"
        "from recbole_diff.quick_start import load_data_and_model\n"
        "from recbole_diff import get_trainer\n"
        "config, model, _, _, _, test = load_data_and_model(sys.argv[1])\n"
        "trainer = get_trainer(config['MODEL_TYPE'], config['model'])(config, model)\n"
        "print(json.dumps(dict(trainer.evaluate(test, load_best_model=False))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    assert fresh == pytest.approx(dict(result["test_result"]), abs=1e-4)


def test_a_trained_sasrec_beats_random_ranking(tiny):
    result = run_recbole_diff(
        "SASRec", SLICE, config_dict=dict(tiny, epochs=15, learning_rate=0.005, stopping_step=15), cmd_line=False
    )
    n_items = 915
    # Random ranking hits the target among the top 20 with probability 20 / n_items.
    assert result["test_result"]["hit@20"] > 3 * 20 / n_items


def test_checkpoint_names_never_collide(tiny):
    config = build_config("SASRec", SLICE, config_dict=tiny, cmd_line=False)
    from recbole.data import create_dataset, data_preparation

    train, _, _ = data_preparation(config, create_dataset(config))
    model = get_model("SASRec")(config, train._dataset)
    names = {Trainer(config, model).saved_model_file for _ in range(20)}
    assert len(names) == 20
    assert all(os.path.basename(n).startswith(f"SASRec-{SLICE}-seed2020-") for n in names)


def test_resume_and_a_mismatched_checkpoint(tiny, tmp_path):
    from recbole.data import create_dataset, data_preparation

    config = build_config("SASRec", SLICE, config_dict=dict(tiny, epochs=1), cmd_line=False)
    train, valid, _ = data_preparation(config, create_dataset(config))
    model = get_model("SASRec")(config, train._dataset)
    trainer = get_trainer(ModelType.SEQUENTIAL, "SASRec")(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    resumed = get_trainer(ModelType.SEQUENTIAL, "SASRec")(config, get_model("SASRec")(config, train._dataset))
    resumed.resume_checkpoint(trainer.saved_model_file)
    assert resumed.start_epoch == 1
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)

    state = torch.load(trainer.saved_model_file, weights_only=False)
    state["config"]["dataset"] = "other-data"
    other = tmp_path / "other.pth"
    torch.save(state, other)
    with pytest.raises(ValueError, match="dataset 'other-data'.*same dataset"):
        resumed.load_model_file(str(other))


def test_threads_default_to_one_and_are_overridable(tiny):
    build_config("SASRec", SLICE, config_dict=tiny, cmd_line=False)
    assert torch.get_num_threads() == 1
    build_config("SASRec", SLICE, config_dict=dict(tiny, threads=2), cmd_line=False)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_cli_words_are_converted_like_recbole_and_bad_words_refused():
    assert parse_key_values(["--epochs=3", "--topk=[5,10]", "--show_progress=false", "--data_path=a/b"]) == {
        "epochs": 3,
        "topk": [5, 10],
        "show_progress": False,
        "data_path": "a/b",
    }
    with pytest.raises(SystemExit, match="--key=value"):
        parse_key_values(["epochs", "3"])


def test_doctor_flags_known_broken_versions():
    assert (
        check_versions(
            {
                "recbole": "1.2.1",
                "numpy": "1.26.4",
                "pandas": "2.3.3",
                "pyarrow": "25.0.1",
                "setuptools": "80.10.2",
                "ray": "2.6.3",
            }
        )
        == []
    )
    bad = check_versions(
        {"numpy": "2.1.0", "pandas": "3.0.1", "pyarrow": "26.0.0", "setuptools": "81.0.0", "recbole": "1.2.0"}
    )
    assert {p[0] for p in bad} == {"numpy", "pandas", "pyarrow", "setuptools", "recbole"}
    assert all(p[3].startswith("pip install") for p in bad)


def test_importing_the_package_does_not_import_ray():
    import subprocess
    import sys

    code = (
        "import sys, recbole_diff, recbole_diff.quick_start, recbole_diff.cli, recbole_diff.model.backbone, "
        "recbole_diff.diffusion; print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_recboles_anomaly_detection_is_switched_off(tiny):
    # RecBole's sine.py turns it on at import; it makes every backward pass much slower.
    config = build_config("SASRec", SLICE, config_dict=tiny, cmd_line=False)
    get_model("SINE")
    assert config["model"] == "SASRec" and not torch.is_anomaly_enabled()


def test_extra_test_modes_report_another_protocol_from_the_same_model(tiny):
    result = run_recbole_diff(
        "SASRec",
        SLICE,
        cmd_line=False,
        config_dict=dict(tiny, epochs=1, metrics=["Hit", "NDCG", "GAUC"], extra_test_modes=["full", "uni100"]),
    )
    assert result["test_result_full"] == result["test_result"]  # the run's own mode, evaluated again
    uni = result["test_result_uni100"]
    assert uni["hit@10"] > result["test_result"]["hit@10"] and 0 < uni["gauc"] < 1


def test_source_rows_follow_recboles_sampled_layout():
    from recbole_diff.trainer.trainer import source_rows

    # user 0 has one positive, user 1 two; each block is its positives repeated 3 times (2 negatives each)
    row_idx = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert source_rows(row_idx, torch.tensor([0, 1, 1])).tolist() == [0, 0, 0, 3, 4, 3, 4, 3, 4]
    assert source_rows(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1])) is None  # 3 rows, 2 positives


def test_compact_candidates_are_recboles_matrix_without_its_unscored_columns():
    from recbole_diff.trainer.trainer import compact_candidates

    n_items = 50
    # user 0: positive 7, negatives 3, 9, 3 (repeated); user 1: positives 2, 40, negatives 11, 30
    row_idx = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    items = torch.tensor([7, 3, 9, 3, 2, 40, 11, 30])
    scores = torch.tensor([0.5, 0.1, float("-inf"), 0.1, 0.2, 0.9, 0.3, 0.3])
    positive_u, positive_i = torch.tensor([0, 1, 1]), torch.tensor([7, 2, 40])
    full = torch.full((2, n_items), float("-inf"))
    full[row_idx, items] = scores
    matrix, columns = compact_candidates(row_idx, items, scores, positive_u, positive_i, n_items)
    # each row: the user's distinct candidates in item order (3, 7, 9 and 2, 11, 30, 40), then -inf
    inf = float("-inf")
    assert torch.equal(matrix, torch.tensor([[0.1, 0.5, inf, inf, inf], [0.2, 0.3, 0.3, 0.9, inf]]))
    assert columns.tolist() == [1, 0, 3]
    assert torch.equal(matrix[positive_u, columns], full[positive_u, positive_i])
    for row in range(2):  # the full row less its -inf columns, same order
        finite = full[row][torch.isfinite(full[row])]
        assert torch.equal(matrix[row][torch.isfinite(matrix[row])], finite)
    # a positive that is not among its user's rows: no compact form
    assert compact_candidates(row_idx, items, scores, positive_u, torch.tensor([7, 2, 41]), n_items) is None


def _sampled_eval_setup(tiny):
    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    result = run_recbole_diff(
        "SASRec",
        SLICE,
        cmd_line=False,
        config_dict=dict(tiny, epochs=1, eval_args=uni100, metrics=["Hit", "NDCG", "GAUC"]),
    )
    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    rows = []
    predict = model.predict
    model.predict = lambda interaction: rows.append(len(interaction)) or predict(interaction)
    return config, model, test_data, rows


def test_fast_sampled_eval_gives_predicts_metrics_from_one_encoder_pass_per_user(tiny):
    config, model, test_data, rows = _sampled_eval_setup(tiny)
    config["fast_sampled_eval"] = False
    slow = Trainer(config, model).evaluate(test_data, load_best_model=False)
    slow_rows = sum(rows)
    assert slow_rows == 101 * test_data._dataset.user_num - 101  # every candidate row of every user but padding

    rows.clear()
    config["fast_sampled_eval"] = True
    trainer = Trainer(config, model)
    fast = trainer.evaluate(test_data, load_best_model=False)
    # GAUC reads every candidate's rank: a wrong score anywhere would move it
    assert dict(fast) == pytest.approx(dict(slow), abs=1e-6)
    assert trainer._full_sort_agrees and len(rows) == 1 and sum(rows) < slow_rows / 4  # only the check batch


@pytest.mark.parametrize(
    "metrics, compact", [(["Hit", "NDCG", "MRR", "GAUC"], True), (["Hit", "ShannonEntropy"], False)]
)
def test_sampled_metrics_are_collected_from_the_candidates_only_where_ranks_are_all_they_read(tiny, metrics, compact):
    config, model, test_data, _ = _sampled_eval_setup(tiny)
    config["metrics"] = metrics
    config["fast_sampled_eval"] = False
    slow = Trainer(config, model).evaluate(test_data, load_best_model=False)
    config["fast_sampled_eval"] = True
    trainer = Trainer(config, model)
    widths, collect = [], trainer.eval_collector.eval_batch_collect
    trainer.eval_collector.eval_batch_collect = lambda scores, *a: widths.append(scores.shape[1]) or collect(scores, *a)
    fast = trainer.evaluate(test_data, load_best_model=False)
    assert dict(fast) == pytest.approx(dict(slow), abs=1e-6)
    n_items = test_data._dataset.item_num
    # compact: at most 101 candidates and one -inf column a user; item ids (coverage) need the whole matrix
    assert (max(widths) <= 102) if compact else (set(widths) == {n_items})


def test_a_model_whose_full_sort_differs_from_predict_is_evaluated_with_predict(tiny, caplog):
    config, model, test_data, rows = _sampled_eval_setup(tiny)
    config["fast_sampled_eval"] = False
    slow = Trainer(config, model).evaluate(test_data, load_best_model=False)
    full_sort = model.full_sort_predict
    model.full_sort_predict = lambda interaction: full_sort(interaction) * -1.0
    config["fast_sampled_eval"] = True
    trainer = Trainer(config, model)
    with caplog.at_level("WARNING"):
        fast = trainer.evaluate(test_data, load_best_model=False)
    assert dict(fast) == pytest.approx(dict(slow), abs=1e-6)
    assert trainer._full_sort_agrees is False and "does not give its predict scores" in caplog.text


def test_masked_items_do_not_hide_a_full_sort_that_differs_from_predict(tiny):
    config, model, test_data, _ = _sampled_eval_setup(tiny)
    predict, full_sort = model.predict, model.full_sort_predict

    def masked_predict(interaction):  # a model that masks items, as TI-DiffRec masks the history
        return predict(interaction).masked_fill(interaction["item_id"] % 2 == 0, float("-inf"))

    def wrong_full_sort(interaction):  # masks the same items, scores the rest otherwise
        scores = -full_sort(interaction)
        scores[:, ::2] = float("-inf")
        return scores

    model.predict, model.full_sort_predict = masked_predict, wrong_full_sort
    trainer = Trainer(config, model)
    trainer.evaluate(test_data, load_best_model=False)
    assert trainer._full_sort_agrees is False


@pytest.mark.parametrize(
    "name, extra", [("DiffuRec", {"n_blocks": 2}), ("GlobalDiff", {"approx_hidden": 16, "filter_history": True})]
)
def test_fast_sampled_eval_serves_models_that_draw_noise_or_score_by_rank(tiny, name, extra):
    from recbole.utils import init_seed

    from recbole_diff.quick_start import prepare_data

    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    config = build_config(
        name,
        SLICE,
        config_dict=dict(tiny, eval_args=uni100, eval_batch_size=2020, **extra),
        cmd_line=False,
        backbone="SASRec" if name == "GlobalDiff" else None,
    )
    init_seed(config["seed"], True)
    _, train, _, test = prepare_data(config)
    model = get_model(name)(config, train._dataset).eval()
    config["fast_sampled_eval"] = False
    slow = Trainer(config, model).evaluate(test, load_best_model=False)
    config["fast_sampled_eval"] = True
    trainer = Trainer(config, model)
    fast = trainer.evaluate(test, load_best_model=False)
    # DiffuRec's noise is drawn row by row and GlobalDiff's predict reads places, not Borda scores: both must
    # still pass the check against predict and give its metrics
    assert trainer._full_sort_agrees and dict(fast) == pytest.approx(dict(slow), abs=1e-9)


def test_sampled_evaluation_draws_the_same_candidates_and_leaves_trainings_random_stream(tiny):
    import numpy as np

    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    result = run_recbole_diff(
        "SASRec",
        SLICE,
        cmd_line=False,
        config_dict=dict(tiny, epochs=1, eval_args=uni100, metrics=["Hit", "NDCG", "GAUC"]),
    )
    config, model, _, _, _, test_data = load_data_and_model(result["saved_model_file"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    first = trainer.evaluate(test_data, load_best_model=False)
    assert np.array_equal(np.random.get_state()[1], before)  # training's stream resumes where it was
    second = trainer.evaluate(test_data, load_best_model=False)
    # GAUC reads every candidate's rank, so other candidates would move it
    assert dict(first) == dict(second) == pytest.approx(dict(result["test_result"]), abs=1e-6)


def test_no_arguments_run_the_globaldiff_demo_and_print_backbone_ensemble_and_diffusion_side_by_side(
    monkeypatch, capsys
):
    import yaml

    import recbole_diff.quick_start as quick_start

    seen = {}
    metrics = {"hit@10": 0.1, "ndcg@10": 0.05}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {
            "model": "GlobalDiff",
            "backbone": "SASRec",
            "test_result": dict(metrics, **{"hit@10": 0.2}),
            "backbone_test_result": metrics,
            "diffusion_only_test_result": dict(metrics, **{"hit@10": 0.3}),
        }

    monkeypatch.setattr(quick_start, "run_recbole_diff", fake_run)
    assert main([]) == 0
    (demo,) = seen["config_file_list"]
    settings = yaml.safe_load(open(demo))
    assert (settings["model"], settings["backbone"], settings["dataset"]) == ("GlobalDiff", "SASRec", "ml-100k")
    assert settings["report_diffusion_only"] is True
    header, first = [line.split() for line in capsys.readouterr().out.strip().splitlines()[:2]]
    assert "(backbone)" in header and header.index("GlobalDiff") < header.index("diffusion")
    assert first == ["hit@10", "0.1000", "0.2000", "0.3000"]  # backbone, ensemble, diffusion alone
