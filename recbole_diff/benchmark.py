"""Benchmark grids: methods x backbones x datasets x seeds from one yaml, each cell its own process.

    recbole-diff bench --config properties/bench/diffurec_ml-100k.yaml --out runs/diffurec [--jobs 2]
    recbole-diff bench --report [benchmarks/report.yaml] [--out docs/results.md]    # the results page

A preset yaml::

    name: diffurec-ml-100k
    datasets: [ml-100k]                 # names; per-dataset keys under dataset_config
    seeds: [2020, 2021, 2022]
    config: {epochs: 20, ...}           # keys for every cell
    dataset_config: {sports: {data_path: ../shared/data}}   # relative paths are relative to the yaml
    baseline: SASRec                    # lift and paired t-test of every method against this one
    metrics: [hit@10, ndcg@10]          # reported columns (default: all test metrics); full:ndcg@10 for an
                                        # extra_test_modes mode, group:6-20:ndcg@10 for a long-tail user group
    methods:
      - {name: SASRec, model: SASRec}
      - {name: DiffuRecSys-V1, model: DiffuRecSys, config: {offset_noise_mode: none},
         versus: [DiffuRec]}            # lifts against these methods too, besides the baseline
      - {name: GlobalDiff, model: GlobalDiff, backbones: [SASRec, GRU4Rec]}
      - {name: CE, backbones: [SASRec, GRU4Rec]}    # no model: each backbone trained alone, as RecBole
                                        # trains it (CE@SASRec, ...); a plugin's versus: [CE] pairs by backbone

A finished cell (its ``result.json`` exists) is skipped when the grid is run again, and a cell that another
live ``bench`` process is running (its ``running.lock``) is left to it, so two invocations can share a grid. Each
cell keeps its log, its config and its result under ``<out>/cells/<dataset>/<method>[@<backbone>]/seed<seed>/``.
The summary is ``results.csv`` (one row per cell), ``results.md`` (mean +- std, lift over the baseline and over a
plugin's own backbone, paired t-test p-values across seeds) and PNG plots.

A cell that was killed (the machine or the session ended) is resumed when the grid runs again: each cell keeps
its trainings' resume points in ``resume/`` (``resume_dir``) and goes on from the last epoch it began; its log
continues in the same ``log.txt`` and its minutes add up over the attempts.

Plugin cells of one seed that would train the same first stage (GlobalDiff's or DiffuASR's backbone, PDRec's
TI-DiffRec) share it through ``<out>/stages`` (``stage_cache``; ``stage_cache: ~`` in the preset's config
trains it in every cell): a grid costs one backbone per seed, and every method of a seed builds on the same one.
"""

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from recbole_diff.io import atomic_write, claim_lock, read_yaml

# The rest of recbole-diff (and RecBole, numpy, matplotlib) is imported by the functions that need it: the bench
# process only spawns and summarises cells, each a process of its own, and stays light.


PATH_KEYS = ("data_path", "checkpoint_dir", "backbone_checkpoint", "tidiffrec_checkpoint")


PRESET_KEYS = ("name", "datasets", "seeds", "config", "dataset_config", "baseline", "metrics", "methods")
METHOD_KEYS = ("name", "model", "config", "backbones", "versus")


class BenchmarkError(ValueError):
    pass


def _check_names(keys, allowed, where):
    import difflib

    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise BenchmarkError(f"{where}: unknown key '{key}'; {hint}known keys: {', '.join(allowed)}.")


# ---- the grid ----------------------------------------------------------------------------------------
def load_grid(path):
    spec = read_yaml(path, "Benchmark file", BenchmarkError, BenchmarkError)
    if not isinstance(spec, dict):
        raise BenchmarkError(f"Benchmark file '{path}' must be a mapping with 'datasets', 'seeds', 'methods'.")
    _check_names(spec, PRESET_KEYS, f"Benchmark file '{path}'")
    for key in ("datasets", "seeds", "methods"):
        if not spec.get(key):
            raise BenchmarkError(f"Benchmark file '{path}' needs a non-empty '{key}' list.")
    base = os.path.dirname(os.path.abspath(path))
    spec["config"] = _resolve_paths(spec.get("config") or {}, base)
    spec["dataset_config"] = {d: _resolve_paths(c or {}, base) for d, c in (spec.get("dataset_config") or {}).items()}
    _check_methods(spec["methods"], path)
    names = [m["name"] for m in spec["methods"]]
    if spec.get("baseline") and spec["baseline"] not in names:
        raise BenchmarkError(f"{path}: baseline '{spec['baseline']}' is not one of the methods ({', '.join(names)}).")
    _check_versus(spec["methods"], names, path)
    return spec


def _check_versus(methods, names, path):
    backbones = {m["name"]: m.get("backbones") or [] for m in methods}
    for m in methods:
        versus = m.setdefault("versus", [])
        if isinstance(versus, str):
            versus = m["versus"] = [versus]
        if not isinstance(versus, list):
            raise BenchmarkError(f"{path}: method '{m['name']}' has versus {versus!r}; give a list of method names.")
        for other in versus:
            if other not in names or other == m["name"]:
                raise BenchmarkError(
                    f"{path}: method '{m['name']}' has versus '{other}', which is not another "
                    f"method of this grid ({', '.join(names)})."
                )
            # a method with backbones is compared on the same backbone: each of this one's needs a cell
            missing = [b for b in backbones[m["name"]] or ["(none)"] if backbones[other] and b not in backbones[other]]
            if missing:
                raise BenchmarkError(
                    f"{path}: method '{m['name']}' has versus '{other}', which has no cell on backbone "
                    f"{missing[0]}; give '{other}' that backbone or compare with another method."
                )


def _resolve_paths(config, base):
    out = dict(config)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and not os.path.isabs(out[key]):
            out[key] = os.path.normpath(os.path.join(base, out[key]))
    return out


def _check_methods(methods, path):
    from recbole_diff.model.registry import get_model

    names = set()
    for m in methods:
        if not isinstance(m, dict) or not ("model" in m or ("name" in m and m.get("backbones"))):
            raise BenchmarkError(
                f"{path}: every method needs 'model' (and optionally name, config, backbones), or 'name' and "
                f"'backbones' for the backbones trained alone: {m!r}"
            )
        _check_names(m, METHOD_KEYS, f"{path}: method {m.get('name', m.get('model'))}")
        if "model" in m:
            get_model(m["model"])  # unknown names fail here, with the list of known ones
        for b in m.get("backbones") or []:
            get_model(b)
        name = m.setdefault("name", m.get("model"))
        if "@" in name:
            raise BenchmarkError(f"{path}: method name '{name}' has an '@', which joins a method to its backbone.")
        if name in names:
            raise BenchmarkError(f"{path}: method name '{name}' appears twice; give each a distinct 'name'.")
        names.add(name)


def cells(spec):
    """Every (dataset, method, backbone, seed) of the grid, with its full config dict."""
    out = []
    # seed-major, so that an interrupted grid has every method for its first seeds
    for dataset, seed, method in itertools.product(spec["datasets"], spec["seeds"], spec["methods"]):
        for backbone in method.get("backbones") or [None]:
            config = dict(spec["config"], **spec["dataset_config"].get(dataset, {}), **(method.get("config") or {}))
            config["seed"] = int(seed)
            label = method["name"] + (f"@{backbone}" if backbone else "")
            model, plugged = method.get("model"), backbone
            if model is None:  # the backbone alone, as RecBole trains it; labelled <name>@<backbone> to pair
                model, plugged = backbone, None
            out.append(
                {
                    "dataset": dataset,
                    "method": method["name"],
                    "model": model,
                    "label": label,
                    "backbone": plugged,
                    "seed": int(seed),
                    "config": config,
                }
            )
    return out


def select(grid_cells, methods=None, seeds=None):
    """The cells of the named methods (``name`` or ``name@backbone``) and seeds; None keeps all."""
    if methods:
        known = {c["method"] for c in grid_cells} | {c["label"] for c in grid_cells}
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise BenchmarkError(
                f"--methods: '{unknown[0]}' is not in this grid; choose from {', '.join(sorted(known))}."
            )
        grid_cells = [c for c in grid_cells if c["method"] in methods or c["label"] in methods]
    if seeds:
        known = {c["seed"] for c in grid_cells}
        unknown = [s for s in seeds if int(s) not in known]
        if unknown:
            raise BenchmarkError(f"--seeds: {unknown[0]} is not in this grid; choose from {sorted(known)}.")
        grid_cells = [c for c in grid_cells if c["seed"] in {int(s) for s in seeds}]
    return grid_cells


def check_cells(grid_cells, out_dir):
    """Every distinct cell config through a run's own checks (known keys, types, data files, writable folders)
    before the first cell starts. Returns the warnings, each once."""
    from recbole_diff.config import Config, UnknownKeyWarning

    seen, notes = set(), {}
    for cell in grid_cells:
        settings = {k: v for k, v in cell["config"].items() if k != "seed"}
        key = json.dumps([cell["model"], cell["backbone"], cell["dataset"], settings], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UnknownKeyWarning)
            try:
                Config(
                    model=cell["model"],
                    dataset=cell["dataset"],
                    backbone=cell["backbone"],
                    cmd_line=False,
                    config_dict=dict(cell["config"], checkpoint_dir=os.path.join(out_dir, "cells")),
                )
            except (KeyError, TypeError, ValueError, OSError) as e:
                raise BenchmarkError(f"method {cell['label']} on {cell['dataset']}: {e}") from e
        for w in caught:
            if issubclass(w.category, UnknownKeyWarning):
                notes.setdefault(f"{cell['label']}: {w.message}")
    return list(notes)


def cell_dir(out_dir, cell):
    return os.path.join(out_dir, "cells", cell["dataset"], cell["label"], f"seed{cell['seed']}")


# Folders are resolved to absolute paths, which differ between machines and checkouts without changing what a
# cell runs; a given checkpoint file is known by its name.
_PLACE_KEYS = ("stage_cache", "data_path", "checkpoint_dir")


def _what_runs(cell):
    config = {k: v for k, v in cell["config"].items() if k not in _PLACE_KEYS}
    for key in PATH_KEYS:
        if isinstance(config.get(key), str):
            config[key] = os.path.basename(config[key])
    return {"model": cell["model"], "backbone": cell["backbone"], "config": config}


def stale_cells(grid_cells, out_dir, finished_only=False):
    """Cells of ``out_dir`` that were started (finished or not; only finished with ``finished_only``) with another
    model, backbone or config than the grid now gives them: ``[(directory, differing keys)]``. A rerun would
    count their results as the grid's, or resume their training points under the new settings."""
    stale = []
    for cell in grid_cells:
        directory = cell_dir(out_dir, cell)
        path = os.path.join(directory, "cell.json")
        if not os.path.isfile(path) or (finished_only and not os.path.isfile(os.path.join(directory, "result.json"))):
            continue
        try:
            with open(path) as f:
                old = _what_runs(json.load(f))
        except (ValueError, KeyError, TypeError) as e:
            stale.append((directory, [f"cell.json unreadable ({type(e).__name__})"]))
            continue
        new = _what_runs(cell)
        if old != new:
            flat_old = dict(old["config"], model=old["model"], backbone=old["backbone"])
            flat_new = dict(new["config"], model=new["model"], backbone=new["backbone"])
            keys = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k))
            stale.append((directory, keys))
    return stale


def describe_stale(stale, limit=5):
    lines = [f"  {d}: {', '.join(keys)}" for d, keys in stale[:limit]]
    if len(stale) > limit:
        lines.append(f"  ... and {len(stale) - limit} more")
    return "\n".join(lines)


# ---- running -----------------------------------------------------------------------------------------
def run_cell(cell, directory):
    """Run one cell in this process (called by ``python -m recbole_diff.benchmark --cell ...``)."""
    from recbole_diff.quick_start import run_recbole_diff

    config = dict(cell["config"], checkpoint_dir=os.path.join(directory, "saved"), show_progress=False)
    if config.get("resume_dir", "") is not None:  # a preset turns it off with resume_dir: ~, never shares one
        config["resume_dir"] = os.path.join(directory, "resume")
    start = time.time()
    earlier = _earlier_seconds(directory)
    result = run_recbole_diff(
        model=cell["model"], dataset=cell["dataset"], backbone=cell["backbone"], config_dict=config, cmd_line=False
    )
    # results, scores and a plugin's scalar facts (stage timings, store sizes); not the model objects
    keep = {
        k: v
        for k, v in result.items()
        if "_result" in k or k.endswith("_score") or isinstance(v, (int, float, bool, str, type(None)))
    }
    keep = json.loads(json.dumps(keep, default=float))
    keep.update(
        cell={k: cell[k] for k in ("dataset", "method", "model", "label", "backbone", "seed")},
        seconds=sum(earlier) + time.time() - start,
        attempts=len(earlier) + 1,
    )
    _write_atomically(os.path.join(directory, "result.json"), json.dumps(keep, indent=1))  # whole or absent
    from recbole_diff.trainer.resume import clear

    clear(config["resume_dir"])  # the cell's own points, which served this cell only


# the bench process notes a running cell's time this often, so a killed attempt's time is known to the next one
HEARTBEAT_SECONDS = 60


def _earlier_seconds(directory):
    """Seconds of the cell's earlier, killed attempts (the last heartbeat of each)."""
    path = os.path.join(directory, "attempts.json")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["seconds"][:-1]  # the last entry is the attempt running now


def _write_atomically(path, text):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _note_attempt(directory, seconds, new=False):
    path = os.path.join(directory, "attempts.json")
    done = []
    if os.path.isfile(path):
        with open(path) as f:
            done = json.load(f)["seconds"]
    done = done + [seconds] if new or not done else done[:-1] + [seconds]
    _write_atomically(path, json.dumps({"seconds": done}))


def _launch(cell, directory, threads, log=print):
    os.makedirs(directory, exist_ok=True)
    lock = os.path.join(directory, "running.lock")
    if not claim_lock(lock):
        return cell, "skipped, another bench process is running it", 0.0
    if os.path.isfile(os.path.join(directory, "result.json")):
        # another bench process sharing the grid finished it after this one listed its work: its log and
        # result stay as they are
        os.remove(lock)
        return cell, "skipped, another bench process finished it", 0.0
    # atomically: another bench process sharing the grid reads every cell.json when it starts
    _write_atomically(os.path.join(directory, "cell.json"), json.dumps(cell, indent=1))
    log(f"[bench] starting {cell['dataset']} {cell['label']} (seed {cell['seed']}); log: {directory}/log.txt")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # an attempt that started and left no result was killed (or failed): this one goes on from its points
    resumed = os.path.isfile(os.path.join(directory, "attempts.json"))
    start = time.time()
    try:
        with open(os.path.join(directory, "log.txt"), "a" if resumed else "w") as log:
            if resumed:
                log.write(
                    f"\n[bench] {time.strftime('%Y-%m-%d %H:%M:%S')}: an earlier attempt did not finish; resuming\n"
                )
                log.flush()
            _note_attempt(directory, 0.0, new=True)
            child = subprocess.Popen(
                [sys.executable, "-m", "recbole_diff.benchmark", "--cell", directory],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=directory,
            )
            # the cell's process holds the cell: if this bench process dies, no other one starts it twice
            _write_atomically(lock, str(child.pid))
            try:
                while True:
                    try:
                        code = child.wait(timeout=HEARTBEAT_SECONDS)
                        break
                    except subprocess.TimeoutExpired:
                        _note_attempt(directory, time.time() - start)
            finally:
                if os.path.isfile(os.path.join(directory, "result.json")):
                    os.remove(os.path.join(directory, "attempts.json"))  # the result holds them now
                else:
                    _note_attempt(directory, time.time() - start)
    finally:
        os.remove(lock)
    return cell, ("resumed" if resumed else None, code), time.time() - start


def run_grid(spec_path, out_dir, jobs=1, threads=1, log=print, methods=None, seeds=None):
    """Run the grid's unfinished cells (only those of ``methods``/``seeds`` if given) and summarise every
    finished cell in ``out_dir``."""
    spec = load_grid(spec_path)
    chosen = select(cells(spec), methods, seeds)
    out_dir = os.path.abspath(out_dir)  # cells run with their own folder as working directory
    from recbole_diff.config import check_writable

    try:
        check_writable(out_dir, "--out")
    except OSError as e:
        raise BenchmarkError(str(e)) from e
    os.makedirs(out_dir, exist_ok=True)
    stale = stale_cells(cells(spec), out_dir)
    if stale:
        raise BenchmarkError(
            f"{len(stale)} cell(s) in {out_dir} ran with other settings than {spec_path} gives them now "
            f"(the keys that differ after each):\n{describe_stale(stale)}\nUse another --out for the new settings, "
            "or remove those cell folders to run them again."
        )
    todo, done = [], 0
    for cell in chosen:
        # cells that would train the same first stage (a plugin's backbone, TI-DiffRec) share one
        cell["config"].setdefault("stage_cache", os.path.join(out_dir, "stages"))
        directory = cell_dir(out_dir, cell)
        if os.path.isfile(os.path.join(directory, "result.json")):
            done += 1
        else:
            todo.append((cell, directory))
    notes = check_cells([cell for cell, _ in todo], out_dir)
    log(
        f"[bench] {spec.get('name', spec_path)}: {len(todo) + done} cells, {done} already finished, "
        f"{len(todo)} to run with {jobs} job(s)"
    )
    for note in notes:
        log(f"[bench] warning: {note}")
    if done:
        summarise(spec, out_dir)  # a restarted grid shows what it finished before, not after its next cell
    start, failed = time.time(), []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(_launch, cell, d, threads, log) for cell, d in todo]
        for k, future in enumerate(futures, 1):
            cell, code, seconds = future.result()
            if isinstance(code, str):  # not run here: why
                log(f"[bench] {k}/{len(todo)} {cell['dataset']} {cell['label']} seed {cell['seed']}: {code}")
                continue
            how, code = code
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {cell_dir(out_dir, cell)}/log.txt)"
            status = f"{status} ({how})" if how else status
            if code:
                failed.append(cell)
            else:
                # the tables hold every finished cell at any moment, so a grid cut short (a session's end, a
                # machine that is replaced) leaves its summary with what it finished
                summarise(spec, out_dir)
            log(
                f"[bench] {k}/{len(todo)} {cell['dataset']} {cell['label']} seed {cell['seed']}: "
                f"{status} in {seconds:.0f}s"
            )
    wall = time.time() - start
    summary = summarise(spec, out_dir)
    with open(os.path.join(out_dir, "wall_time.txt"), "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ran {len(todo)} cells with --jobs {jobs}: {wall:.0f}s\n")
    log(f"[bench] wall time {wall:.0f}s; summary in {out_dir}/results.md")
    return summary, failed


# ---- summarising -------------------------------------------------------------------------------------
def load_results(spec, out_dir):
    rows = []
    for cell in cells(spec):
        path = os.path.join(cell_dir(out_dir, cell), "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                rows.append(json.load(f))
    return rows


def _metric_names(spec, rows):
    if spec.get("metrics"):
        return [m.lower() for m in spec["metrics"]]
    return list(rows[0]["test_result"].keys()) if rows else []


def metric_value(result, metric, key="test_result"):
    """A metric of a cell's result: ``ndcg@10`` from ``test_result``, ``full:ndcg@10`` from the extra test of
    another evaluation mode (``test_result_full``, see ``extra_test_modes``), ``group:6-20:ndcg@10`` from a
    user group of the long-tail report (``long_tail_result``; the backbone's ``backbone_long_tail_result``).
    None if the result lacks it (or the group has no user)."""
    if metric.startswith("group:"):
        _, group, metric = metric.split(":", 2)
        groups = result.get(key.replace("test_result", "long_tail_result")) or {}
        value = (groups.get(group) or {}).get(metric)
        return None if value is None else float(value)
    if ":" in metric:
        mode, metric = metric.split(":", 1)
        key = f"{key}_{mode}"
    value = (result.get(key) or {}).get(metric)
    return None if value is None else float(value)


def _mean_std(values):
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _paired_p(a, b):
    """Two-sided paired t-test p-value across seeds; None with fewer than two pairs, and None when every seed
    shows the same non-zero difference: the metrics are rounded (RecBole's 4 decimals), so the t of infinity
    that scipy's p = 0 stands for is an artefact of the rounding, not a certain difference."""
    from scipy import stats

    if len(a) < 2 or len(a) != len(b):
        return None
    diffs = {round(x - y, 9) for x, y in zip(a, b)}
    if len(diffs) == 1:
        return 1.0 if diffs == {0.0} else None
    return float(stats.ttest_rel(a, b).pvalue)


def summarise(spec, out_dir):
    rows = load_results(spec, out_dir)
    metrics = _metric_names(spec, rows)
    _write_csv(rows, metrics, os.path.join(out_dir, "results.csv"))
    table = _aggregate(spec, rows, metrics)
    _write_atomically(os.path.join(out_dir, "results.md"), _markdown(spec, table, metrics))
    _plots(table, metrics, out_dir)
    return table


def _write_csv(rows, metrics, path):
    # atomically: two bench processes sharing a grid both rewrite it as their cells finish
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["dataset", "method", "backbone", "seed", "seconds"]
            + [f"test_{m}" for m in metrics]
            + [f"backbone_test_{m}" for m in metrics]
        )
        for r in rows:
            c = r["cell"]
            writer.writerow(
                [c["dataset"], c["method"], c["label"].partition("@")[2], c["seed"], f"{r['seconds']:.1f}"]
                + [_blank(metric_value(r, m)) for m in metrics]
                + [_blank(metric_value(r, m, "backbone_test_result")) for m in metrics]
            )


def _blank(value):
    return "" if value is None else value


# A plugin's first stage tested in the same runs, one model per seed shared by the seed's cells: a row of its own
# (PDRec's TI-DiffRec alone, without training it again in a cell of its own). Result key -> (row label, the
# prefix of the config keys that set the stage: cells that set them differently get a row each).
STAGE_ROWS = {"tidiffrec_test_result": ("TIDiffRec (PDRec's stage 1)", "tidiffrec")}


def _aggregate(spec, rows, metrics):
    """{(dataset, label): {'seeds': [...], metric: [values], 'backbone': {metric: [values]}, 'seconds': [...]}}"""
    table = {}
    for r in sorted(rows, key=lambda r: r["cell"]["seed"]):
        c = r["cell"]
        entry = table.setdefault(
            (c["dataset"], c["label"]), {"seeds": [], "seconds": [], "backbone": {}, "method": c["method"]}
        )
        entry["seeds"].append(c["seed"])
        entry["seconds"].append(r["seconds"])
        for m in metrics:
            value = metric_value(r, m)
            if value is None:
                raise BenchmarkError(
                    f"Cell {c['label']} seed {c['seed']} has no '{m}' in its result; list metrics "
                    "the runs compute (and the extra_test_modes they name)."
                )
            entry.setdefault(m, []).append(value)
            backbone = metric_value(r, m, "backbone_test_result")
            if backbone is not None:
                entry["backbone"].setdefault(m, []).append(backbone)
    _add_stage_rows(table, rows, metrics)
    return table


def _add_stage_rows(table, rows, metrics):
    """STAGE_ROWS entries, once per seed; a metric the stage was not tested on (another mode) is None."""
    for key, (label, prefix) in STAGE_ROWS.items():
        settings = {
            id(r): json.dumps(
                {k: v for k, v in r["cell"].get("config", {}).items() if k.startswith(prefix)},
                sort_keys=True,
                default=str,
            )
            for r in rows
            if r.get(key)
        }
        for r in sorted((r for r in rows if r.get(key)), key=lambda r: r["cell"]["seed"]):
            c = r["cell"]
            name = label if len(set(settings.values())) == 1 else f"{label} {settings[id(r)]}"
            entry = table.setdefault((c["dataset"], name), {"seeds": [], "seconds": [], "backbone": {}, "method": name})
            if c["seed"] not in entry["seeds"]:
                entry["seeds"].append(c["seed"])
                for m in metrics:
                    entry.setdefault(m, []).append(metric_value(r, m, key))


def _paired(entry, other, m):
    """Values of two entries on the seeds they share, in the same order."""
    shared = [s for s in entry["seeds"] if s in other["seeds"]]
    pairs = [(entry[m][entry["seeds"].index(s)], other[m][other["seeds"].index(s)]) for s in shared]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]  # a stage row lacks the extra modes
    return [a for a, _ in pairs], [b for _, b in pairs]


def _markdown(spec, table, metrics):
    baseline = spec.get("baseline")
    versus = {m["name"]: m.get("versus") or [] for m in spec.get("methods", [])}
    lines = [f"# {spec.get('name', 'benchmark')}", ""]
    for dataset in spec["datasets"]:
        entries = [(label, e) for (d, label), e in table.items() if d == dataset]
        if not entries:
            continue
        lines += [
            f"## {dataset}",
            "",
            "Test metrics, mean +- std over seeds; lift in % of the mean with the paired t-test p-value across seeds.",
            "",
        ]
        header = ["method", "seeds"] + metrics + ["minutes/run"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, e in entries:
            cells_ = [label, str(len(e["seeds"]))]
            for m in metrics:
                mean, std = _mean_std(e[m]) if None not in e[m] else (None, None)
                cells_.append("n/a" if mean is None else f"{mean:.4f} +- {std:.4f}")
            cells_.append(f"{_mean_std(e['seconds'])[0] / 60:.1f}" if e["seconds"] else "")
            lines.append("| " + " | ".join(cells_) + " |")
            if e["backbone"]:
                own = {"seeds": e["seeds"], **e["backbone"]}
                row = [f"{label} (its backbone, same run)", str(len(e["seeds"]))]
                row += [f"{_mean_std(own[m])[0]:.4f} +- {_mean_std(own[m])[1]:.4f}" for m in metrics] + [""]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lift_rows = _lifts(table, dataset, baseline, metrics, versus)
        if lift_rows:
            lines += [
                "Lift:",
                "",
                "| method | versus | " + " | ".join(metrics) + " |",
                "|---|---|" + "---|" * len(metrics),
            ]
            lines += lift_rows + [""]
    return "\n".join(lines) + "\n"


def _lifts(table, dataset, baseline, metrics, versus=None):
    """Each method against its own backbone (a plugin's same-run result), against the baseline method and
    against the methods its ``versus`` names: each on the same backbone (``<other>@<backbone>``) when the grid
    has it, else ``<other>``."""
    out = []
    for (d, label), e in table.items():
        if d != dataset:
            continue
        comparisons = []
        if e["backbone"]:
            comparisons.append(("its backbone", {"seeds": e["seeds"], **e["backbone"]}))
        others = ([baseline] if baseline else []) + list((versus or {}).get(label.split("@", 1)[0], []))
        for other_name in dict.fromkeys(others):
            other_label = other_name
            if "@" in label and (dataset, f"{other_name}@{label.split('@', 1)[1]}") in table:
                other_label = f"{other_name}@{label.split('@', 1)[1]}"
            other = table.get((dataset, other_label))
            if other is not None and label != other_label:
                comparisons.append((other_label, other))
        for name, other in comparisons:
            parts = []
            for m in metrics:
                lift, p, pairs = lift_and_p(e, other, m)
                if not pairs:
                    parts.append("n/a")
                    continue
                parts.append(f"{lift:+.1f}%" + (f" (p={p:.3f})" if p is not None else ""))
            out.append(f"| {label} | {name} | " + " | ".join(parts) + " |")
    return out


def lift_and_p(entry, other, m):
    """Lift of ``entry`` over ``other`` in % of the other's mean on the seeds both have, the paired p-value,
    and the number of pairs (lift and p are None without pairs)."""
    a, b = _paired(entry, other, m)
    if not a:
        return None, None, 0
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    lift = 100.0 * (mean_a - mean_b) / mean_b if mean_b else float("nan")
    return lift, _paired_p(a, b), len(a)


def _plots(table, metrics, out_dir):
    if not table:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for d, _ in table})
    for dataset in datasets:
        entries = [(label, e) for (d, label), e in table.items() if d == dataset]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            labels = [label for label, _ in entries]
            means = [_mean_std(e[m])[0] for _, e in entries]
            stds = [_mean_std(e[m])[1] for _, e in entries]
            ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="tab:blue")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{dataset}: {m}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"metrics_{dataset}.png"), dpi=110)
        plt.close(fig)
    plugin = [(d, label, e) for (d, label), e in table.items() if e["backbone"]]
    if plugin:
        m = metrics[0] if "ndcg@10" not in metrics else "ndcg@10"
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = [f"{label}\n{d}" for d, label, _ in plugin]
        lifts = []
        for _, _, e in plugin:
            a, b = e[m], e["backbone"][m]
            lifts.append(100.0 * (sum(a) / len(a) - sum(b) / len(b)) / (sum(b) / len(b)))
        ax.bar(range(len(names)), lifts, color=["tab:green" if v >= 0 else "tab:red" for v in lifts])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=7)
        ax.set_ylabel(f"lift over backbone, {m} (%)")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "lift_per_backbone.png"), dpi=110)
        plt.close(fig)


# ---- entry points ------------------------------------------------------------------------------------
def bench_command(argv):
    parser = argparse.ArgumentParser(prog="recbole-diff bench", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="benchmark preset yaml (see properties/bench/)")
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/runs/<name>)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    parser.add_argument("--summarise-only", action="store_true", help="rebuild the tables from finished cells")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="run only these methods (name or name@backbone); the table covers every finished cell",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="run only these seeds")
    args = parser.parse_args(argv)
    try:
        spec = load_grid(args.config)
        select(cells(spec), args.methods, args.seeds)
    except BenchmarkError as e:
        raise SystemExit(f"recbole-diff bench: {e}") from e
    out = args.out or os.path.join("benchmarks", "runs", spec.get("name", "bench"))
    if args.summarise_only:
        stale = stale_cells(cells(spec), out, finished_only=True)
        if stale:
            print(
                f"recbole-diff bench: warning: {len(stale)} finished cell(s) ran with other settings than "
                f"{args.config} gives them now; the tables show them as they ran:\n{describe_stale(stale)}",
                file=sys.stderr,
            )
        summarise(spec, out)
        print(open(os.path.join(out, "results.md")).read())
        return
    try:
        _, failed = run_grid(
            args.config,
            out,
            jobs=args.jobs,
            threads=args.threads,
            methods=args.methods,
            seeds=args.seeds,
            log=lambda line: print(line, flush=True),
        )
    except BenchmarkError as e:
        raise SystemExit(f"recbole-diff bench: {e}") from e
    print(open(os.path.join(out, "results.md")).read())
    if failed:
        raise SystemExit(f"{len(failed)} cell(s) failed; their logs are under {out}/cells/.")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--cell":
        from recbole_diff.runtime import recbole_warnings_hidden

        with open(os.path.join(sys.argv[2], "cell.json")) as f, recbole_warnings_hidden():
            run_cell(json.load(f), sys.argv[2])
    else:
        bench_command(sys.argv[1:])
