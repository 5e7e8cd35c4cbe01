"""The results page: ``recbole-diff bench --report [benchmarks/report.yaml] [--out docs/results.md]``.

Builds one markdown page from the committed grids under ``benchmarks/results/<grid>/cells/`` (each cell's
``result.json``) and a hand-kept yaml that says which grid is current for each claim (a grid is never guessed
from its name: superseded grids stay on disk beside their reruns)::

    results_dir: results                # folder of the grids, relative to this yaml
    verdict: {min_seeds: 3, alpha: 0.05, min_fraction: 0.5}
    datasets: [ml-100k, sports]         # every claim gets a row per dataset; no grid: "not yet measured"
    claims:
      - method: GlobalDiff on SASRec
        paper: GlobalDiff, Table 2 (specs/GLOBALDIFF.md)
        paper_dataset: ML-1M            # the paper's dataset
        metric: ndcg@10
        before: 0.0506                  # the paper's reference (here: SASRec alone) ...
        after: 0.0617                   # ... and the method; omit both when the spec gives no figure
        ours:
          ml-100k: {grid: globaldiff-ml-100k, label: GlobalDiff@SASRec, versus: backbone}
          sports: {grid: ~, note: why not yet}   # no grid: "not yet measured"
    baselines:                          # one grid's every row against default and tuned baselines
      grid: all-ml-100k
      dataset: ml-100k
      metric: ndcg@10
      versus: [SASRec, SASRec-tuned]
      cost_reference: SASRec            # relative CPU-hours of rows that have no backbone
      tuning: {SASRec-tuned: {summary: tune-baselines-ml-100k/summary_SASRec.json, cpus: 1}}
      notes: {DiffuRec: a caveat printed beside the row}
      pending: {GRU4Rec-tuned: why}     # baselines without cells yet: a "not yet measured" row
    superseded: {diffurec-ml-100k: why}

A dataset's entry under ``ours`` may quote another of the paper's figures (``paper_dataset``, ``before``,
``after``: the paper's dataset closest to ours). ``versus: backbone`` compares with the plugin's backbone
tested in the same runs; any other value is a row label of the same grid. Lifts and paired p-values are
those of the grid's own ``results.md`` (``benchmark.lift_and_p``); CPU-hours are the cells' recorded seconds
(one thread per cell) summed over seeds.
"""

import argparse
import glob
import json
import os

from recbole_diff.benchmark import _aggregate, _mean_std, _paired, lift_and_p
from recbole_diff.io import read_yaml

DEFAULT_SPEC = os.path.join("benchmarks", "report.yaml")
DEFAULT_OUT = os.path.join("docs", "results.md")
VERDICT_RULE = {"min_seeds": 3, "alpha": 0.05, "min_fraction": 0.5}


class ReportError(ValueError):
    pass


# ---- reading ------------------------------------------------------------------------------------------
def load_spec(path):
    spec = read_yaml(path, "Report file", ReportError, ReportError)
    if not isinstance(spec, dict) or not spec.get("claims") or not spec.get("datasets"):
        raise ReportError(f"Report file '{path}' needs 'datasets' and a non-empty 'claims' list.")
    spec["results_dir"] = os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(path)), spec.get("results_dir", "results"))
    )
    spec["verdict"] = dict(VERDICT_RULE, **(spec.get("verdict") or {}))
    for claim in spec["claims"]:
        for key in ("method", "metric", "ours"):
            if key not in claim:
                raise ReportError(f"{path}: claim {claim.get('method', claim)!r} needs '{key}'.")
        if ("before" in claim) != ("after" in claim):
            raise ReportError(f"{path}: claim '{claim['method']}' needs both 'before' and 'after' (or neither).")
        for dataset, ours in claim["ours"].items():
            if dataset not in spec["datasets"]:
                raise ReportError(
                    f"{path}: claim '{claim['method']}' names dataset '{dataset}', which is not in "
                    f"'datasets' ({', '.join(spec['datasets'])})."
                )
            if ours.get("grid") and not ("label" in ours and "versus" in ours):
                raise ReportError(
                    f"{path}: claim '{claim['method']}' on {dataset} needs 'label' and 'versus' beside 'grid'."
                )
    return spec


def grid_results(results_dir, grid):
    """Every finished cell of a committed grid: its ``result.json`` with the cell's config (from ``cell.json``)."""
    folder = os.path.join(results_dir, grid)
    paths = sorted(glob.glob(os.path.join(folder, "cells", "*", "*", "seed*", "result.json")))
    if not paths:
        raise ReportError(
            f"Grid '{grid}' has no finished cell under {folder}/cells/; name a grid of "
            f"{results_dir} or set grid: ~ with a note."
        )
    rows = []
    for path in paths:
        with open(path) as f:
            row = json.load(f)
        cell_json = os.path.join(os.path.dirname(path), "cell.json")
        if os.path.isfile(cell_json):
            with open(cell_json) as f:
                row["cell"]["config"] = json.load(f).get("config", {})
        rows.append(row)
    return rows


class Grids:
    """Committed grids, read once each and aggregated like ``bench`` does."""

    def __init__(self, results_dir):
        self.results_dir = results_dir
        self._rows, self._tables = {}, {}

    def rows(self, grid):
        if grid not in self._rows:
            self._rows[grid] = grid_results(self.results_dir, grid)
        return self._rows[grid]

    def table(self, grid, metric):
        if (grid, metric) not in self._tables:
            self._tables[grid, metric] = _aggregate({}, self.rows(grid), [metric])
        return self._tables[grid, metric]

    def entry(self, grid, dataset, label, metric):
        table = self.table(grid, metric)
        if (dataset, label) not in table:
            known = sorted(lbl for d, lbl in table if d == dataset)
            raise ReportError(f"Grid '{grid}' has no row '{label}' on {dataset}; its rows: {', '.join(known)}.")
        return table[dataset, label]

    def _cells(self, grid, dataset):
        return [r["cell"] for r in self.rows(grid) if r["cell"]["dataset"] == dataset]

    def backbone(self, grid, dataset, label):
        """A plugin row's backbone, as its cells record it; None for a model trained alone."""
        return next((c.get("backbone") for c in self._cells(grid, dataset) if c["label"] == label), None)

    def alone(self, grid, dataset, model):
        """The label of the grid's row that trains ``model`` alone on ``dataset``: the row named after it, else
        the one row of cells with that model and no backbone (bench labels it ``<method>@<model>``, as
        ``CE@SASRec``); None when there is no such row or several."""
        cells = self._cells(grid, dataset)
        if model is None or any(c["label"] == model for c in cells):
            return model
        alone = {c["label"] for c in cells if c["model"] == model and not c.get("backbone")}
        return alone.pop() if len(alone) == 1 else None

    def protocol(self, grid, metric):
        """The ranking protocol of a grid's metric: ``mode:metric`` names it, else the cells' eval mode
        (full ranking unless a cell's config sets ``eval_args.mode``, as in properties/overall.yaml)."""
        if ":" in metric:
            return metric.split(":", 1)[0]
        config = self.rows(grid)[0]["cell"].get("config") or {}
        return (config.get("eval_args") or {}).get("mode", "full")


def reference(grids, grid, dataset, label, versus, metric):
    """The entry a row is compared with, and the row (and its label) whose CPU-hours it is set against: None
    when the grid has no such row (a plugin's backbone trained only inside its own cells)."""
    entry = grids.entry(grid, dataset, label, metric)
    if versus != "backbone":
        other = grids.entry(grid, dataset, versus, metric)
        return other, other, versus
    if not entry["backbone"]:
        raise ReportError(f"Grid '{grid}': '{label}' has no backbone result; versus: backbone needs a plugin row.")
    backbone = grids.alone(grid, dataset, grids.backbone(grid, dataset, label))
    cost = grids.table(grid, metric).get((dataset, backbone)) if backbone else None
    return {"seeds": entry["seeds"], **entry["backbone"]}, cost, backbone if cost else None


# ---- figures ------------------------------------------------------------------------------------------
def cpu_hours(entry):
    return sum(entry["seconds"]) / 3600.0 if entry and entry["seconds"] else None


def relative_cost(entry, other):
    """Mean seconds per seed of a row over its reference's (seeds each has; one thread per cell)."""
    if not entry or not other or not entry["seconds"] or not other["seconds"]:
        return None
    return _mean_std(entry["seconds"])[0] / _mean_std(other["seconds"])[0]


def claimed_lift(claim):
    if "before" not in claim:
        return None
    return 100.0 * (claim["after"] - claim["before"]) / claim["before"]


def verdict(claimed, lift, p, pairs, rule):
    """reproduced: at least ``min_seeds`` paired seeds, our lift has the claim's sign, is at least
    ``min_fraction`` of its size and has paired p < ``alpha``; else not reproduced. No grid: not yet measured;
    fewer seeds: too few seeds, saying how many (a measured lift is not reported as unmeasured)."""
    if lift is None:
        return "not yet measured"
    if pairs < rule["min_seeds"]:
        return f"too few seeds ({pairs} of {rule['min_seeds']})"
    if claimed is None:
        return "no claimed figure"
    if lift * claimed > 0 and abs(lift) >= rule["min_fraction"] * abs(claimed) and p is not None and p < rule["alpha"]:
        return "reproduced"
    return "not reproduced"


def claim_rows(spec, grids):
    """One dict per claim and dataset with every figure of the claims table."""
    out = []
    for claim in spec["claims"]:
        metric = claim["metric"].lower()
        for dataset in spec["datasets"]:
            ours = claim["ours"].get(dataset) or {}
            # a dataset's row may quote the paper's figures on its closest dataset
            figures = dict(claim, **{k: ours[k] for k in ("paper_dataset", "before", "after") if k in ours})
            claimed = claimed_lift(figures)
            row = {
                "method": claim["method"],
                "dataset": dataset,
                "claim": figures,
                "claimed": claimed,
                "grid": ours.get("grid"),
                "note": ours.get("note", ""),
                "lift": None,
                "p": None,
                "pairs": 0,
            }
            if ours.get("grid"):
                grid = ours["grid"]
                entry = grids.entry(grid, dataset, ours["label"], metric)
                other, cost_other, cost_label = reference(grids, grid, dataset, ours["label"], ours["versus"], metric)
                lift, p, pairs = lift_and_p(entry, other, metric)
                mine, theirs = _paired(entry, other, metric)
                row.update(
                    label=ours["label"],
                    versus=ours["versus"],
                    lift=lift,
                    p=p,
                    pairs=pairs,
                    mean=_mean_std(mine),
                    ref_mean=_mean_std(theirs),
                    protocol=grids.protocol(grid, metric),
                    cpu_hours=cpu_hours(entry),
                    relative=relative_cost(entry, cost_other),
                    cost_label=cost_label,
                )
            row["verdict"] = verdict(claimed, row["lift"], row["p"], row["pairs"], spec["verdict"])
            out.append(row)
    return out


def baseline_rows(spec, grids):
    """Every row of the baselines grid against each default and tuned baseline it has."""
    b = spec["baselines"]
    grid, dataset, metric = b["grid"], b["dataset"], b["metric"].lower()
    table = grids.table(grid, metric)
    labels = [label for d, label in table if d == dataset]
    labels = [v for v in b["versus"] if v in labels] + [label for label in labels if label not in b["versus"]]
    for name in b["versus"] + [b["cost_reference"]]:
        grids.entry(grid, dataset, name, metric)  # a missing baseline fails here, naming the grid's rows
    tuning = {label: _tuning_seconds(grids.results_dir, t) for label, t in (b.get("tuning") or {}).items()}
    out = []
    for label in labels:
        entry = table[dataset, label]
        if not entry["seconds"]:
            continue  # a stage row (another method's first stage) costs nothing of its own
        backbone = grids.backbone(grid, dataset, label)
        cost_label = (grids.alone(grid, dataset, backbone) or backbone) if backbone else b["cost_reference"]
        cost_other = table.get((dataset, cost_label))
        versus = {}
        for name in b["versus"]:
            versus[name] = lift_and_p(entry, table[dataset, name], metric) if name != label else None
        out.append(
            {
                "label": label,
                "mean": _mean_std(entry[metric]),
                "seeds": len(entry["seeds"]),
                "versus": versus,
                "cpu_hours": cpu_hours(entry),
                "tuning_hours": tuning.get(label),
                "relative": relative_cost(entry, cost_other),
                "cost_label": cost_label,
                "note": (b.get("notes") or {}).get(label, ""),
            }
        )
    return out


def _tuning_seconds(results_dir, tuning):
    path = os.path.join(results_dir, tuning["summary"])
    if not os.path.isfile(path):
        raise ReportError(f"Tuning summary '{path}' does not exist; commit the search's summary.json there.")
    with open(path) as f:
        summary = json.load(f)
    return summary["wall_seconds"] * int(tuning.get("cpus", 1)) / 3600.0


# ---- writing ------------------------------------------------------------------------------------------
def _lift_text(lift, p):
    if lift is None:
        return "n/a"
    return f"{lift:+.1f}%" + (f" (p {p:.3f})" if p is not None else " (p n/a)")


def _hours(hours):
    return "" if hours is None else f"{hours:.2f}"


def _times(ratio, label):
    return "" if ratio is None else f"{ratio:.1f}x {label}"


def markdown(spec, grids, source=DEFAULT_SPEC):
    rule = spec["verdict"]
    lines = [
        "# Results",
        "",
        f"Generated by `recbole-diff bench --report` from `{source}` (which grid is current for each claim) and "
        "the committed grids under `benchmarks/results/`; rebuild it rather than editing it.",
        "",
        "- **Lift**: the method over its reference on the seeds both have, in % of the reference's mean, with "
        "the paired t-test p-value across seeds (the grids' own `results.md` figures).",
        f"- **Verdict**: *reproduced* when at least {rule['min_seeds']} seeds were paired, our lift has the "
        f"paper's sign, is at least {rule['min_fraction']:.0%} of the paper's lift and has p < {rule['alpha']}; "
        "*not reproduced* otherwise; *too few seeds* with fewer paired seeds; *not yet measured* without a "
        "current grid. The papers' datasets are not ours: a claim is tested as the same comparison (method vs "
        "the paper's reference, the paper's metric and ranking protocol where the grid used it) on our data.",
        "- **CPU-hours**: the recorded wall seconds of the row's cells (one process with one thread each) "
        "summed over seeds; *x ref* is the mean per seed over that of the reference row in the same grid "
        "(a plugin's backbone trained alone; blank when the grid has no such row). A cell that loaded a "
        "shared first stage from the grid's stage cache did not pay for it.",
        "",
    ]
    lines += [
        "## The papers' claims",
        "",
        "| method | dataset | paper's claim | our grid (protocol) | ours: reference -> method | lift | seeds | "
        "CPU-h | x ref | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in claim_rows(spec, grids):
        c = r["claim"]
        metric = c["metric"]
        claim_text = (
            f"{c['before']:.4f} -> {c['after']:.4f} {metric} on {c.get('paper_dataset', '?')} "
            f"(**{r['claimed']:+.1f}%**; {c.get('paper', '')})"
            if r["claimed"] is not None
            else f"no figure in {c.get('paper', 'the specs')}"
        )
        if r["grid"]:
            ours = f"{r['ref_mean'][0]:.4f} -> {r['mean'][0]:.4f} +- {r['mean'][1]:.4f} ({r['label']} vs {r['versus']})"
            grid = f"[{r['grid']}](../benchmarks/results/{r['grid']}/results.md) ({r['protocol']})"
            cost = [_hours(r["cpu_hours"]), _times(r["relative"], r["cost_label"] or "")]
            lift = "**" + _lift_text(r["lift"], r["p"]) + "**"
        else:
            ours, grid, cost, lift = "", "", ["", ""], ""
        verdict_text = r["verdict"] + (f": {r['note']}" if r["note"] else "")
        lines.append(
            f"| {r['method']} | {r['dataset']} | {claim_text} | {grid} | {ours} | {lift} | "
            f"{r['pairs'] or ''} | {cost[0]} | {cost[1]} | {verdict_text} |"
        )
    lines.append("")
    if spec.get("baselines"):
        lines += _baselines_markdown(spec, grids)
    if spec.get("superseded"):
        lines += ["## Superseded grids", "", "Kept for their history; the tables above do not read them.", ""]
        lines += [f"- [{g}](../benchmarks/results/{g}/results.md): {why}" for g, why in spec["superseded"].items()]
        lines.append("")
    return "\n".join(lines)


def _baselines_markdown(spec, grids):
    b = spec["baselines"]
    metric = b["metric"].lower()
    lines = [
        f"## Against default and tuned baselines ({b['dataset']}, one protocol)",
        "",
        f"Every row of [{b['grid']}](../benchmarks/results/{b['grid']}/results.md) ({b.get('about', '')}), "
        f"test {metric}, mean +- std over seeds, lift over each baseline with its paired p. The tuned rows "
        "use the best configuration of a Ray Tune search (ASHA) at these settings; their CPU-hours add "
        "the search's.",
        "",
        "| method | seeds | "
        + metric
        + " | "
        + " | ".join(f"vs {v}" for v in b["versus"])
        + " | CPU-h | x ref | note |",
        "|---|---|---|" + "---|" * len(b["versus"]) + "---|---|---|",
    ]
    for label, why in (b.get("pending") or {}).items():
        if (b["dataset"], label) in grids.table(b["grid"], metric):
            raise ReportError(
                f"baselines: '{label}' is pending but {b['grid']} has its cells now; move it to "
                "'versus' (and 'tuning') and rebuild."
            )
        lines.append("| " + " | ".join([label] + [""] * (len(b["versus"]) + 4) + [f"not yet measured: {why}"]) + " |")
    for r in baseline_rows(spec, grids):
        vs = [("" if r["versus"][v] is None else _lift_text(*r["versus"][v][:2])) for v in b["versus"]]
        hours = _hours(r["cpu_hours"]) + (f" + {r['tuning_hours']:.2f} tuning" if r["tuning_hours"] else "")
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['mean'][0]:.4f} +- {r['mean'][1]:.4f} | "
            + " | ".join(vs)
            + f" | {hours} | {_times(r['relative'], r['cost_label'])} | {r['note']} |"
        )
    return lines + [""]


def build(spec_path=DEFAULT_SPEC, out=DEFAULT_OUT):
    spec = load_spec(spec_path)
    folder, name = os.path.split(os.path.abspath(spec_path))
    text = markdown(spec, Grids(spec["results_dir"]), source=f"{os.path.basename(folder)}/{name}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    return text


def report_command(argv):
    parser = argparse.ArgumentParser(
        prog="recbole-diff bench --report", description="Build the results page from the committed grids."
    )
    parser.add_argument(
        "--report",
        nargs="?",
        const=DEFAULT_SPEC,
        default=DEFAULT_SPEC,
        help=f"which grid is current for each claim (default {DEFAULT_SPEC})",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the page (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        build(args.report, args.out)
    except ReportError as e:
        raise SystemExit(f"recbole-diff bench --report: {e}") from e
    print(f"[report] wrote {args.out}")
