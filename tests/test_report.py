"""The results page (recbole_diff/report.py) built from a small fixture grid, with hand-computed figures."""

import json
import math
import os

import pytest
import yaml

from recbole_diff.report import Grids, ReportError, baseline_rows, build, claim_rows, load_spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# dataset "d", seeds 2020-2022: label -> (ndcg@10 per seed, seconds per seed, its backbone's ndcg@10 or None)
GRID = {
    "Base": ([0.20, 0.21, 0.25], [3600, 3600, 3600], None),
    "Base-tuned": ([0.22, 0.22, 0.26], [1800, 1800, 1800], None),
    "M": ([0.30, 0.32, 0.34], [7200, 7200, 7200], None),
    "P@Base": ([0.22, 0.21, 0.26], [1800, 1800, 1800], [0.20, 0.21, 0.25]),
}


def t2_p(diffs):
    """Two-sided p of a paired t-test on three pairs, from the t distribution with 2 degrees of freedom, whose
    CDF is 1/2 + t / (2 sqrt(2 + t^2))."""
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    t = abs(mean / (sd / math.sqrt(3)))
    return 1 - t / math.sqrt(2 + t * t)


def write_grid(results, name, grid, seeds=(2020, 2021, 2022), mode=None):
    """Cells as bench writes them; a label ``<method>@<model>`` without a backbone result (``CE@Base``) is the
    model trained alone, as a method's plain-model rows are labelled."""
    for label, (values, seconds, backbone) in grid.items():
        method, _, bb = label.partition("@")
        alone = bb and not backbone
        for k, seed in enumerate(seeds):
            folder = results / name / "cells" / "d" / label / f"seed{seed}"
            folder.mkdir(parents=True)
            cell = {
                "dataset": "d",
                "method": method,
                "model": bb if alone else method,
                "label": label,
                "backbone": None if alone else bb or None,
                "seed": seed,
            }
            result = {"test_result": {"ndcg@10": values[k]}, "seconds": seconds[k], "cell": cell}
            if backbone:
                result["backbone_test_result"] = {"ndcg@10": backbone[k]}
            (folder / "result.json").write_text(json.dumps(result))
            config = {"eval_args": {"mode": mode}} if mode else {}
            (folder / "cell.json").write_text(json.dumps(dict(cell, config=config)))


@pytest.fixture
def spec_path(tmp_path):
    results = tmp_path / "results"
    write_grid(results, "g", GRID)
    write_grid(
        results,
        "g2",
        {"M": ([0.3, 0.4], [60, 60], None), "Base": ([0.2, 0.2], [60, 60], None)},
        seeds=(2020, 2021),
        mode="uni100",
    )
    (results / "tune").mkdir()
    (results / "tune" / "summary.json").write_text(json.dumps({"wall_seconds": 1800.0}))
    spec = {
        "results_dir": "results",
        "datasets": ["d", "e"],
        "claims": [
            {
                "method": "M",
                "paper": "P1",
                "paper_dataset": "X",
                "metric": "ndcg@10",
                "before": 1.0,
                "after": 1.5,
                "ours": {"d": {"grid": "g", "label": "M", "versus": "Base"}},
            },
            {
                "method": "P",
                "metric": "ndcg@10",
                "before": 0.5,
                "after": 0.55,
                "ours": {"d": {"grid": "g", "label": "P@Base", "versus": "backbone"}},
            },
            {
                "method": "M two seeds",
                "metric": "NDCG@10",
                "before": 1.0,
                "after": 1.1,
                "ours": {"d": {"grid": "g2", "label": "M", "versus": "Base"}, "e": {"grid": None, "note": "later"}},
            },
            {
                "method": "M no figure",
                "metric": "ndcg@10",
                "ours": {"d": {"grid": "g", "label": "M", "versus": "Base"}},
            },
        ],
        "baselines": {
            "grid": "g",
            "dataset": "d",
            "metric": "ndcg@10",
            "versus": ["Base", "Base-tuned"],
            "cost_reference": "Base",
            "tuning": {"Base-tuned": {"summary": "tune/summary.json", "cpus": 2}},
            "notes": {"M": "a caveat"},
            "pending": {"Other-tuned": "its search ran out of time"},
        },
        "superseded": {"g-old": "why"},
    }
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def rows_by(spec_path):
    spec = load_spec(spec_path)
    return {(r["method"], r["dataset"]): r for r in claim_rows(spec, Grids(spec["results_dir"]))}, spec


def test_claim_rows_match_hand_computed_lifts_p_values_costs_and_verdicts(spec_path):
    rows, _ = rows_by(spec_path)
    m = rows["M", "d"]
    assert m["claimed"] == pytest.approx(50.0)
    assert m["lift"] == pytest.approx(100 * (0.32 - 0.22) / 0.22)
    assert m["p"] == pytest.approx(t2_p([0.10, 0.11, 0.09]), rel=1e-6)
    assert m["mean"] == pytest.approx((0.32, 0.02)) and m["ref_mean"][0] == pytest.approx(0.22)
    assert m["cpu_hours"] == pytest.approx(6.0) and m["relative"] == pytest.approx(2.0) and m["cost_label"] == "Base"
    assert m["protocol"] == "full" and m["verdict"] == "reproduced"  # +45% >= half of +50%, p 0.003

    p = rows["P", "d"]  # against the backbone of the same runs: +4.5%, p 0.23
    assert p["lift"] == pytest.approx(100 * (0.23 - 0.22) / 0.22)
    assert p["p"] == pytest.approx(t2_p([0.02, 0.00, 0.01]), rel=1e-6)
    assert p["relative"] == pytest.approx(0.5) and p["cost_label"] == "Base"  # the grid's Base row, alone
    assert p["verdict"] == "not reproduced"

    two = rows["M two seeds", "d"]
    assert two["pairs"] == 2 and two["protocol"] == "uni100" and two["verdict"] == "too few seeds (2 of 3)"
    assert rows["M two seeds", "e"]["verdict"] == "not yet measured" and rows["M two seeds", "e"]["note"] == "later"
    assert rows["M", "e"]["verdict"] == "not yet measured" and rows["M", "e"]["grid"] is None
    assert rows["M no figure", "d"]["verdict"] == "no claimed figure"


def test_verdict_rule_needs_the_claims_sign_half_its_size_and_significance(spec_path):
    from recbole_diff.report import verdict

    rule = {"min_seeds": 3, "alpha": 0.05, "min_fraction": 0.5}
    assert verdict(10.0, 5.0, 0.01, 3, rule) == "reproduced"
    assert verdict(10.0, 4.9, 0.01, 3, rule) == "not reproduced"
    assert verdict(10.0, -10.0, 0.01, 3, rule) == "not reproduced"
    assert verdict(10.0, 12.0, 0.06, 3, rule) == "not reproduced"
    assert verdict(10.0, 12.0, None, 3, rule) == "not reproduced"
    assert verdict(-10.0, -6.0, 0.01, 3, rule) == "reproduced"
    assert verdict(10.0, 12.0, 0.01, 2, rule) == "too few seeds (2 of 3)"
    assert verdict(None, 12.0, None, 1, rule) == "too few seeds (1 of 3)"
    assert verdict(10.0, None, None, 0, rule) == "not yet measured"


def test_baseline_rows_compare_with_default_and_tuned_and_add_the_search_cost(spec_path):
    spec = load_spec(spec_path)
    rows = {r["label"]: r for r in baseline_rows(spec, Grids(spec["results_dir"]))}
    assert list(rows)[:2] == ["Base", "Base-tuned"]  # the baselines first
    lift, p, pairs = rows["M"]["versus"]["Base-tuned"]
    assert lift == pytest.approx(100 * (0.32 - 0.2333333) / 0.2333333, rel=1e-5) and pairs == 3
    assert p == pytest.approx(t2_p([0.08, 0.10, 0.08]), rel=1e-6)
    assert rows["Base"]["versus"]["Base"] is None and rows["Base"]["relative"] == pytest.approx(1.0)
    assert rows["Base-tuned"]["tuning_hours"] == pytest.approx(1800 * 2 / 3600)
    assert rows["Base-tuned"]["cpu_hours"] == pytest.approx(1.5)
    assert rows["P@Base"]["cost_label"] == "Base" and rows["M"]["note"] == "a caveat"


def test_the_page_shows_the_figures(spec_path, tmp_path):
    out = tmp_path / "docs" / "results.md"
    text = build(spec_path, str(out))
    assert out.read_text() == text
    row = next(line for line in text.splitlines() if line.startswith("| M | d |"))
    assert "1.0000 -> 1.5000 ndcg@10 on X (**+50.0%**; P1)" in row
    assert f"+45.5% (p {t2_p([0.10, 0.11, 0.09]):.3f})" in row and "| 6.00 | 2.0x Base | reproduced |" in row
    assert "| not yet measured: later |" in text
    tuned = next(line for line in text.splitlines() if line.startswith("| Base-tuned |"))
    assert "1.50 + 1.00 tuning" in tuned and "0.5x Base" in tuned
    assert "[g-old](../benchmarks/results/g-old/results.md): why" in text
    pending = next(line for line in text.splitlines() if line.startswith("| Other-tuned |"))
    assert pending.endswith("| not yet measured: its search ran out of time |")
    assert pending.count("|") == tuned.count("|")  # as many columns as a measured row


def test_a_plugin_row_is_costed_against_its_backbone_trained_alone_under_a_method_label(tmp_path):
    results = tmp_path / "results"
    # the backbone alone is the row CE@Base (model Base, no plugin), as in the PDRec grids
    write_grid(results, "g", {"CE@Base": GRID["Base"], "P@Base": GRID["P@Base"], "Base-tuned": GRID["Base-tuned"]})
    spec = {
        "results_dir": "results",
        "datasets": ["d"],
        "claims": [
            {"method": "P", "metric": "ndcg@10", "ours": {"d": {"grid": "g", "label": "P@Base", "versus": "backbone"}}}
        ],
        "baselines": {
            "grid": "g",
            "dataset": "d",
            "metric": "ndcg@10",
            "versus": ["Base-tuned"],
            "cost_reference": "Base-tuned",
        },
    }
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump(spec))
    spec = load_spec(str(path))
    grids = Grids(spec["results_dir"])
    (p,) = claim_rows(spec, grids)
    assert p["cost_label"] == "CE@Base" and p["relative"] == pytest.approx(0.5)
    rows = {r["label"]: r for r in baseline_rows(spec, grids)}
    assert rows["P@Base"]["cost_label"] == "CE@Base" and rows["P@Base"]["relative"] == pytest.approx(0.5)
    assert rows["CE@Base"]["cost_label"] == "Base-tuned" and rows["CE@Base"]["relative"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s["claims"][0]["ours"]["d"].update(label="Nope"), "no row 'Nope' on d; its rows: Base, Base-tuned"),
        (lambda s: s["claims"][0]["ours"]["d"].update(grid="missing"), "Grid 'missing' has no finished cell"),
        (lambda s: s["claims"][0].pop("after"), "needs both 'before' and 'after'"),
        (lambda s: s["claims"][0]["ours"].update(z={"grid": "g"}), "dataset 'z', which is not in 'datasets'"),
        (lambda s: s["claims"][0]["ours"]["d"].update(versus="backbone"), "has no backbone result"),
        (lambda s: s["baselines"]["tuning"]["Base-tuned"].update(summary="nope.json"), "nope.json' does not exist"),
        (
            lambda s: s["baselines"]["pending"].update({"Base-tuned": "x"}),
            "'Base-tuned' is pending but g has its cells",
        ),
    ],
)
def test_bad_report_files_are_refused_naming_the_fix(spec_path, change, match):
    spec = yaml.safe_load(open(spec_path))
    change(spec)
    with open(spec_path, "w") as f:
        yaml.safe_dump(spec, f)
    with pytest.raises(ReportError, match=match):
        build(spec_path, os.path.join(os.path.dirname(spec_path), "out.md"))


def test_the_committed_page_is_the_one_the_committed_grids_give(tmp_path):
    out = tmp_path / "results.md"
    build(os.path.join(REPO, "benchmarks", "report.yaml"), str(out))
    assert out.read_text() == open(os.path.join(REPO, "docs", "results.md")).read(), (
        "docs/results.md is stale: run `recbole-diff bench --report` and commit it"
    )
