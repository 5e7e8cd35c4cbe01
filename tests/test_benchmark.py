"""A 2-cell benchmark on the test slice: tables, plots, resumption, bad input."""

import csv
import os

import pytest
import yaml
from helpers import DATA_PATH, SLICE, TINY

from recbole_diff.benchmark import BenchmarkError, load_grid, run_grid


def write_grid(tmp_path, **extra):
    spec = {
        "name": "tiny",
        "datasets": [SLICE],
        "seeds": [1, 2],
        "config": dict({k: v for k, v in TINY.items() if k != "data_path"}, epochs=1, extra_test_modes=["uni100"]),
        "dataset_config": {SLICE: {"data_path": os.path.relpath(DATA_PATH, tmp_path)}},
        "baseline": "SASRec",
        "metrics": ["hit@10", "ndcg@10", "uni100:hit@10"],
        "methods": [{"name": "SASRec", "model": "SASRec"}],
    }
    spec.update(extra)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_two_cells_give_csv_markdown_plots_and_resume(tmp_path):
    grid, out = write_grid(tmp_path), os.path.relpath(tmp_path / "out")  # a relative --out must work too
    messages, rows_when_told = [], []

    def log(message):
        messages.append(message)
        if " seed " in message:  # a cell's outcome: the table already holds it
            with open(os.path.join(out, "results.csv")) as f:
                rows_when_told.append(len(list(csv.DictReader(f))))

    table, failed = run_grid(grid, out, jobs=2, log=log)
    assert not failed and "2 cells, 0 already finished, 2 to run" in messages[0]
    assert len(rows_when_told) == 2 and rows_when_told[0] >= 1 and rows_when_told[1] == 2
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["seed"] for r in rows} == {"1", "2"}
    assert all(0 <= float(r["test_ndcg@10"]) <= 1 for r in rows)
    # the same model ranked against 100 sampled items instead of all 915 hits more often
    assert all(float(r["test_uni100:hit@10"]) > float(r["test_hit@10"]) for r in rows)
    md = open(os.path.join(out, "results.md")).read()
    assert "| SASRec | 2 |" in md and "+-" in md
    assert os.path.getsize(os.path.join(out, f"metrics_{SLICE}.png")) > 1000
    for seed in (1, 2):
        assert os.path.isfile(os.path.join(out, "cells", SLICE, "SASRec", f"seed{seed}", "log.txt"))

    messages.clear()
    run_grid(grid, out, jobs=1, log=messages.append)
    assert "2 cells, 2 already finished, 0 to run" in messages[0]


def test_plugin_cells_of_a_seed_share_one_backbone_even_when_run_together(tmp_path):
    from test_globaldiff import FAST

    plugin = {k: v for k, v in FAST.items() if k not in TINY or k == "epochs"}
    grid = write_grid(
        tmp_path,
        seeds=[1],
        baseline=None,
        metrics=["ndcg@10"],
        methods=[
            {"name": "G5", "model": "GlobalDiff", "backbones": ["SASRec"], "config": dict(plugin, gamma=0.5)},
            {"name": "G9", "model": "GlobalDiff", "backbones": ["SASRec"], "config": dict(plugin, gamma=0.9)},
        ],
    )
    out = str(tmp_path / "out")
    _, failed = run_grid(grid, out, jobs=2, log=lambda m: None)
    assert not failed
    assert len(os.listdir(os.path.join(out, "stages"))) == 2  # one checkpoint and its json, no lock left
    rows = {}
    for name in ("G5", "G9"):
        with open(os.path.join(out, "cells", SLICE, f"{name}@SASRec", "seed1", "result.json")) as f:
            rows[name] = yaml.safe_load(f)
    assert rows["G5"]["backbone_test_result"] == rows["G9"]["backbone_test_result"]
    assert sum(r["backbone_checkpoint"].startswith(os.path.join(out, "stages")) for r in rows.values()) == 1


def test_bad_grids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown model 'NoSuchRec'"):
        load_grid(write_grid(tmp_path, methods=[{"model": "NoSuchRec"}]))
    with pytest.raises(BenchmarkError, match="'seeds'"):
        load_grid(write_grid(tmp_path, seeds=[]))
    with pytest.raises(BenchmarkError, match="appears twice"):
        load_grid(write_grid(tmp_path, methods=[{"model": "SASRec"}, {"model": "SASRec"}]))
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_grid(str(tmp_path / "missing.yaml"))
    with pytest.raises(BenchmarkError, match="versus 'DiffuRec', which is not another method"):
        load_grid(write_grid(tmp_path, methods=[{"model": "SASRec", "versus": "DiffuRec"}]))
    with pytest.raises(BenchmarkError, match="give a list of method names"):
        load_grid(write_grid(tmp_path, methods=[{"model": "SASRec", "versus": 3}]))
    with pytest.raises(BenchmarkError, match="has an '@'"):
        load_grid(write_grid(tmp_path, methods=[{"name": "A@B", "model": "SASRec"}]))
    # a lift against a method on backbones needs that method on this one's backbones, or there is no pair
    alone = {"name": "CE", "backbones": ["SASRec"]}
    with pytest.raises(BenchmarkError, match="versus 'CE', which has no cell on backbone GRU4Rec"):
        plugin = {"name": "G", "model": "GlobalDiff", "backbones": ["SASRec", "GRU4Rec"], "versus": ["CE"]}
        load_grid(write_grid(tmp_path, baseline=None, methods=[alone, plugin]))
    with pytest.raises(BenchmarkError, match=r"no cell on backbone \(none\)"):
        load_grid(write_grid(tmp_path, baseline=None, methods=[alone, {"model": "SASRec", "versus": ["CE"]}]))


def test_cells_started_with_other_settings_are_refused_before_any_run(tmp_path):
    import json

    from recbole_diff.benchmark import cell_dir, cells, stale_cells

    grid, out = write_grid(tmp_path), str(tmp_path / "out")
    first, second = cells(load_grid(grid))
    # a finished cell recorded with another epoch count and an unfinished one with another model
    records = [
        (first, dict(first, config=dict(first["config"], epochs=7)), True),
        (second, dict(second, model="GRU4Rec"), False),
    ]
    for cell, recorded, finished in records:
        os.makedirs(cell_dir(out, cell))
        with open(os.path.join(cell_dir(out, cell), "cell.json"), "w") as f:
            json.dump(recorded, f)
        if finished:
            open(os.path.join(cell_dir(out, cell), "result.json"), "w").write("{}")
    stale = stale_cells([first, second], out)
    assert [keys for _, keys in stale] == [["epochs"], ["model"]]
    with pytest.raises(BenchmarkError, match=r"(?s)2 cell\(s\).*seed1: epochs.*seed2: model.*another --out"):
        run_grid(grid, out, log=lambda m: None)
    assert not os.path.isfile(os.path.join(cell_dir(out, second), "log.txt"))  # nothing ran

    # the same cell run from another checkout: its folders resolved elsewhere
    moved = dict(first, config=dict(first["config"], stage_cache="/elsewhere/stages", data_path="/elsewhere/data"))
    with open(os.path.join(cell_dir(out, first), "cell.json"), "w") as f:
        json.dump(moved, f)
    assert stale_cells([first], out) == []
    with open(os.path.join(cell_dir(out, first), "cell.json"), "w") as f:
        f.write('{"model": "SAS')  # cut short
    assert stale_cells([first], out) == [(cell_dir(out, first), ["cell.json unreadable (JSONDecodeError)"])]


def test_cells_locked_by_a_live_process_are_left_alone_and_stale_locks_taken_over(tmp_path):
    from recbole_diff.io import claim_lock

    lock = str(tmp_path / "running.lock")
    assert claim_lock(lock)
    assert not claim_lock(lock)  # our own live pid holds it
    (tmp_path / "running.lock").write_text("999999999")  # no such process
    assert claim_lock(lock)


def _race_for(lock, start, done, won):
    from recbole_diff.io import claim_lock

    start.wait()
    won.put(claim_lock(lock))
    done.wait()  # the winner stays alive until every process has tried


def test_processes_racing_for_one_lock_give_it_to_exactly_one(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(15):
        lock, n = str(tmp_path / f"race{round_}.lock"), 6
        start, done, won = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race_for, args=(lock, start, done, won)) for _ in range(n)]
        for p in procs:
            p.start()
        wins = [won.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(60)
        assert sum(wins) == 1, f"round {round_}: {sum(wins)} processes hold the lock"
        assert os.listdir(tmp_path).count(f"race{round_}.lock") == 1  # and no temporary file is left
        assert len(os.listdir(tmp_path)) == round_ + 1


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(tmp_path):
    from recbole_diff.benchmark import _launch

    directory = tmp_path / "cell"
    directory.mkdir()
    (directory / "result.json").write_text('{"test_result": {"ndcg@10": 0.5}}')
    (directory / "log.txt").write_text("the finished run's log")
    cell, code, _ = _launch({"model": "SASRec"}, str(directory), 1)
    assert code == "skipped, another bench process finished it" and not (directory / "running.lock").exists()
    assert (directory / "log.txt").read_text() == "the finished run's log"
    assert "0.5" in (directory / "result.json").read_text()


def test_every_shipped_preset_loads():
    import glob

    from recbole_diff import properties_dir
    from recbole_diff.benchmark import cells

    files = glob.glob(os.path.join(properties_dir(), "bench", "*.yaml"))
    assert len(files) >= 4
    for path in files:
        assert cells(load_grid(path))


def test_methods_and_seeds_select_cells_and_unknown_names_are_refused():
    from recbole_diff import properties_dir
    from recbole_diff.benchmark import cells, select

    grid = cells(load_grid(os.path.join(properties_dir(), "bench", "diffuasr_ml-100k.yaml")))
    chosen = select(grid, methods=["DiffuASR-CG@SASRec", "random"], seeds=[2021])
    assert {(c["label"], c["seed"]) for c in chosen} == {
        ("DiffuASR-CG@SASRec", 2021),
        ("random@SASRec", 2021),
        ("random@BERT4Rec", 2021),
    }
    assert select(grid) == grid
    with pytest.raises(BenchmarkError, match="'DiffuASR-XX' is not in this grid"):
        select(grid, methods=["DiffuASR-XX"])
    with pytest.raises(BenchmarkError, match="--seeds: 7 is not in this grid"):
        select(grid, seeds=[7])


def test_a_plugins_first_stage_gets_a_row_of_its_own_once_per_seed():
    from recbole_diff.benchmark import _aggregate, _lifts, _markdown

    def row(method, seed, ndcg, stage=None, backbone="SASRec", epochs=1000):
        r = {
            "cell": {
                "dataset": "d",
                "label": f"{method}@{backbone}" if backbone else method,
                "method": method,
                "seed": seed,
                "backbone": backbone,
                "config": {"tidiffrec_epochs": epochs, "gamma": 1},
            },
            "seconds": 60.0,
            "test_result": {"ndcg@10": ndcg},
            "test_result_full": {"ndcg@10": ndcg / 5},
        }
        if stage is not None:
            r["tidiffrec_test_result"] = {"ndcg@10": stage}  # tested under the grid's main mode only
        return r

    rows = [row("BCE", 1, 0.30), row("HBR", 1, 0.31, 0.40), row("PDRec", 1, 0.32, 0.40), row("HBR", 2, 0.29, 0.44)]
    spec = {"name": "g", "datasets": ["d"], "baseline": "BCE"}
    metrics = ["ndcg@10", "full:ndcg@10"]
    table = _aggregate(spec, rows, metrics)
    stage = table[("d", "TIDiffRec (PDRec's stage 1)")]
    assert stage["seeds"] == [1, 2] and stage["ndcg@10"] == [0.40, 0.44] and stage["full:ndcg@10"] == [None, None]
    md = _markdown(spec, table, metrics)
    assert "| TIDiffRec (PDRec's stage 1) | 2 | 0.4200 +- 0.0283 | n/a |  |" in md
    assert "| HBR@SASRec | 2 | 0.3000 +- 0.0141 |" in md  # the plugin rows are unchanged

    # against a baseline without a backbone the stage row gets a lift, and none where it was not tested
    plain = [row("BCE", 1, 0.30, backbone=None), row("BCE", 2, 0.30, backbone=None)] + rows[1:]
    lifts = _lifts(_aggregate(spec, plain, metrics), "d", "BCE", metrics)
    assert "| TIDiffRec (PDRec's stage 1) | BCE | +40.0% (p=0.105) | n/a |" in lifts

    # a cell whose stage is set otherwise is another model: a row of its own, not mixed into the first
    other = rows + [row("PDRec-short", 1, 0.25, 0.20, epochs=60)]
    labels = {label for _, label in _aggregate(spec, other, metrics)}
    assert {
        'TIDiffRec (PDRec\'s stage 1) {"tidiffrec_epochs": 1000}',
        'TIDiffRec (PDRec\'s stage 1) {"tidiffrec_epochs": 60}',
    } <= labels


def test_versus_adds_paired_lifts_against_the_named_methods_only():
    from recbole_diff.benchmark import _aggregate, _markdown

    def row(method, seed, ndcg):
        return {
            "cell": {"dataset": "d", "label": method, "method": method, "seed": seed, "backbone": None, "config": {}},
            "seconds": 60.0,
            "test_result": {"ndcg@10": ndcg},
        }

    rows = [
        row("SASRec", 1, 0.20),
        row("SASRec", 2, 0.22),
        row("DiffuRec", 1, 0.25),
        row("DiffuRec", 2, 0.25),
        row("V1", 1, 0.30),
        row("V1", 2, 0.26),
        row("V2", 1, 0.28),
    ]
    spec = {
        "name": "g",
        "datasets": ["d"],
        "baseline": "SASRec",
        "methods": [
            {"name": "SASRec"},
            {"name": "DiffuRec"},
            {"name": "V1", "versus": ["DiffuRec"]},
            {"name": "V2", "versus": ["DiffuRec", "SASRec"]},
        ],
    }
    md = _markdown(spec, _aggregate(spec, rows, ["ndcg@10"]), ["ndcg@10"])
    lifts = [line for line in md.splitlines() if line.count("|") == 4 and "%" in line]
    # two seeds, t = 4, 2.33, 1.5 on one degree of freedom; V2 is paired on the one seed it shares (no p), and
    # the baseline in its versus is not listed twice
    assert lifts == [
        "| DiffuRec | SASRec | +19.0% (p=0.156) |",
        "| V1 | SASRec | +33.3% (p=0.258) |",
        "| V1 | DiffuRec | +12.0% (p=0.374) |",
        "| V2 | SASRec | +40.0% |",
        "| V2 | DiffuRec | +12.0% |",
    ]


def test_a_constant_difference_between_rounded_metrics_gets_no_p_value():
    from recbole_diff.benchmark import _paired_p

    # 0.0779 - 0.0781 and 0.0826 - 0.0828 differ only in float error: scipy would say p = 0
    assert _paired_p([0.0779, 0.0826], [0.0781, 0.0828]) is None
    assert _paired_p([0.05, 0.06], [0.05, 0.06]) == 1.0
    assert 0.0 < _paired_p([0.0779, 0.0826], [0.0781, 0.0822]) < 1.0


def test_long_tail_groups_are_metrics_of_the_cell_and_of_its_backbone():
    from recbole_diff.benchmark import _aggregate, _markdown, metric_value

    def row(seed, ndcg):
        return {
            "cell": {
                "dataset": "d",
                "label": "A@SASRec",
                "method": "A",
                "seed": seed,
                "backbone": "SASRec",
                "config": {},
            },
            "seconds": 60.0,
            "test_result": {"ndcg@10": ndcg},
            "backbone_test_result": {"ndcg@10": ndcg - 0.1},
            "long_tail_result": {"3-5": {"users": 0, "ndcg@10": None}, ">20": {"users": 4, "ndcg@10": ndcg / 2}},
            "backbone_long_tail_result": {">20": {"users": 4, "ndcg@10": ndcg / 4}},
        }

    assert metric_value(row(1, 0.4), "group:>20:ndcg@10") == 0.2
    assert metric_value(row(1, 0.4), "group:>20:ndcg@10", "backbone_test_result") == 0.1
    assert metric_value(row(1, 0.4), "group:3-5:ndcg@10") is None  # an empty group
    spec = {"name": "g", "datasets": ["d"]}
    metrics = ["ndcg@10", "group:>20:ndcg@10"]
    md = _markdown(spec, _aggregate(spec, [row(1, 0.4), row(2, 0.6)], metrics), metrics)
    assert "| A@SASRec | 2 | 0.5000 +- 0.1414 | 0.2500 +- 0.0707 |" in md
    assert "| A@SASRec (its backbone, same run) | 2 | 0.4000 +- 0.1414 | 0.1250 +- 0.0354 |" in md


def test_shipped_presets_load_with_distinct_grid_names():
    import glob

    from recbole_diff.benchmark import cells

    presets = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "properties", "bench", "*.yaml")))
    specs = [load_grid(p) for p in presets]
    assert len(specs) >= 10 and all(cells(s) for s in specs)
    names = [s["name"] for s in specs]
    assert len(set(names)) == len(names)  # two presets with one name would share a default --out


def test_backbones_without_a_model_are_trained_alone_and_paired_by_backbone(tmp_path):
    from recbole_diff.benchmark import _aggregate, _lifts, cells

    methods = [
        {"name": "CE", "backbones": ["SASRec", "GRU4Rec"]},
        {"name": "P", "model": "GlobalDiff", "backbones": ["SASRec"], "versus": ["CE"]},
    ]
    grid = load_grid(write_grid(tmp_path, seeds=[1], baseline=None, metrics=["ndcg@10"], methods=methods))
    alone = {c["label"]: (c["model"], c["backbone"]) for c in cells(grid) if c["method"] == "CE"}
    assert alone == {"CE@SASRec": ("SASRec", None), "CE@GRU4Rec": ("GRU4Rec", None)}
    with pytest.raises(BenchmarkError, match="or 'name' and 'backbones'"):
        load_grid(write_grid(tmp_path, methods=[{"backbones": ["SASRec"]}]))

    # the cell runs the plain RecBole model, and the csv names its backbone
    one = write_grid(tmp_path, seeds=[1], baseline=None, metrics=["ndcg@10"], methods=methods[:1])
    out = str(tmp_path / "out")
    _, failed = run_grid(one, out, jobs=1, log=lambda m: None, methods=["CE@GRU4Rec"])
    assert not failed
    with open(os.path.join(out, "cells", SLICE, "CE@GRU4Rec", "seed1", "result.json")) as f:
        result = yaml.safe_load(f)
    assert result["model"] == "GRU4Rec" and "backbone_test_result" not in result
    with open(os.path.join(out, "results.csv")) as f:
        assert [(r["method"], r["backbone"]) for r in csv.DictReader(f)] == [("CE", "GRU4Rec")]

    def row(method, backbone, model, seed, ndcg):
        label = f"{method}@{backbone}"
        plugged = None if model == backbone else backbone
        cell = {"dataset": "d", "label": label, "method": method, "seed": seed, "backbone": plugged, "config": {}}
        return {"cell": cell, "seconds": 1.0, "test_result": {"ndcg@10": ndcg}}

    rows = [row("CE", b, b, s, v) for b, s, v in [("SASRec", 1, 0.30), ("SASRec", 2, 0.32), ("GRU4Rec", 1, 0.1)]]
    rows += [row("P", "SASRec", "GlobalDiff", 1, 0.33), row("P", "SASRec", "GlobalDiff", 2, 0.32)]
    spec = {"name": "g", "datasets": ["d"], "baseline": None}
    lifts = _lifts(_aggregate(spec, rows, ["ndcg@10"]), "d", None, ["ndcg@10"], {"P": ["CE"]})
    assert lifts == ["| P@SASRec | CE@SASRec | +4.8% (p=0.500) |"]
