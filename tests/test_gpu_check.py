"""benchmarks/gpu_check.py runs end to end on the CPU on the test slice and writes its JSON."""

import json
import os
import subprocess
import sys

from helpers import DATA_PATH, SLICE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_writes_figures_for_every_model_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    models = ["SASRec", "DiffuRec", "GlobalDiff", "PDRec", "DiffuASR"]
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "gpu_check.py"),
        "--device",
        "cpu",
        "--cpu_threads",
        "1",
        "--dataset",
        SLICE,
        "--data_path",
        DATA_PATH,
        "--small",
        "--train_batches",
        "2",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--models",
        *models,
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["results"]["cpu"]
    assert set(rows) == set(models)
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["train_rows_per_s"] > 0 and row["users_per_s"] > 0, (name, row)
        assert row["eval_users"] == 120  # every user of the slice, once
    assert result["device_over_cpu"] == {}  # a CPU-only run has nothing to compare with


def test_gpu_check_refuses_an_unknown_model(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "gpu_check.py"),
            "--device",
            "cpu",
            "--models",
            "SASRec",
            "Caser2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert done.returncode != 0 and "unknown models" in done.stderr
