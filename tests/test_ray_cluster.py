"""`recbole-diff tune --address` against a real Ray cluster: a head started with `ray start --head` as its own
process, the way a user starts one (marked `tune`: needs the [tune] extra)."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml
from helpers import DATA_PATH, SLICE, TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the venv's ray, beside its python


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head():
    """A one-node Ray cluster on the loopback address; yields (port, its temp dir). Stopped whatever happens:
    `ray start --block` stops its daemons on SIGTERM, and the process group it leads (its own session, so only
    the processes it started) is killed after it. `ray stop` is not used: it stops every Ray on the machine."""
    pytest.importorskip("ray")
    assert os.path.isfile(RAY), f"no ray binary beside {sys.executable}; install the [tune] extra"
    port, client, dashboard, agent, agent_grpc, metrics = free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    # the cluster's workers import recbole_diff as on a node where the package is installed
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1"
    )
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--port",
            str(port),
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "2",
            "--ray-client-server-port",
            str(client),
            "--include-dashboard",
            "false",
            "--dashboard-port",
            str(dashboard),
            "--dashboard-agent-listen-port",
            str(agent),
            "--dashboard-agent-grpc-port",
            str(agent_grpc),
            "--metrics-export-port",
            str(metrics),
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            "--block",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 60
        while "Ray runtime started" not in open(log.name).read():
            assert head.poll() is None, f"ray start exited with {head.returncode}:\n{open(log.name).read()}"
            assert time.time() < deadline, f"the Ray head did not start in 60 s:\n{open(log.name).read()}"
            time.sleep(0.5)
        yield port, temp_dir
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # any daemon or worker that outlived the head's own shutdown
        except ProcessLookupError:
            pass
        head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.tune
def test_tune_runs_its_trials_in_a_ray_cluster_started_with_ray_start(ray_head, tmp_path):
    port, temp_dir = ray_head
    space = tmp_path / "space.yaml"
    space.write_text("learning_rate: {grid: [0.001, 0.01]}\n")
    keys = [f"--{k}={v}" for k, v in dict(TINY, epochs=1, data_path=DATA_PATH).items()]
    out = tmp_path / "runs"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "recbole_diff.cli",
            "tune",
            "--model",
            "SASRec",
            "--dataset",
            SLICE,
            "--space",
            str(space),
            "--samples",
            "1",
            "--address",
            f"127.0.0.1:{port}",
            "--out",
            str(out),
        ]
        + keys,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    trials = sorted(glob.glob(str(out / "*" / "trainable_*" / "result.json")))
    assert len(trials) == 2
    # every trial ran in a worker of this cluster: its process wrote its logs into the head's session folder
    workers = {
        int(p.rsplit("-", 1)[1].split(".")[0])
        for p in glob.glob(os.path.join(temp_dir, "session_*", "logs", "worker-*.out"))
    }
    for path in trials:
        reports = [json.loads(line) for line in open(path) if line.strip()]
        assert reports and reports[-1]["pid"] in workers, (reports[-1]["pid"], sorted(workers))
    best_yaml = glob.glob(str(out / "*" / "best.yaml"))
    assert len(best_yaml) == 1
    best = yaml.safe_load(open(best_yaml[0]))
    assert best["model"] == "SASRec" and best["learning_rate"] in (0.001, 0.01)
