"""Shared helpers for the benchmark scripts: one thread, a quiet config, RecBole data for a dataset."""

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.abspath(os.path.join(REPO, "..", "shared", "data"))
sys.path.insert(0, REPO)
torch.set_num_threads(1)

from recbole_diff.runtime import autograd_anomaly_off  # noqa: E402  (the repository is on the path from here)

autograd_anomaly_off()  # RecBole switches it on when its models are imported; the scripts here time training


def dataset_kwargs(dataset):
    """Config keys that locate ``dataset``: RecBole's bundled ml-100k, or the shared folder for the rest."""
    if dataset == "ml-100k":
        return {}
    return {"data_path": SHARED_DATA}


def build(model, dataset, **overrides):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_diff import get_model
    from recbole_diff.config import Config

    config = Config(
        model=model,
        dataset=dataset,
        cmd_line=False,
        config_dict=dict(dataset_kwargs(dataset), show_progress=False, state="ERROR", **overrides),
    )
    init_seed(config["seed"], config["reproducibility"])
    data = create_dataset(config)
    train, valid, test = data_preparation(config, data)
    net = get_model(model)(config, train._dataset).to(config["device"])
    return config, net, train, valid, test


def train_throughput(model, loader, batches, params=None, warmup=1, optimizer=torch.optim.Adam):
    """Training rows per second over ``batches`` optimiser steps, after ``warmup`` steps that are not counted."""
    import time

    opt = optimizer(list(params) if params is not None else model.parameters(), lr=1e-3)
    model.train()
    rows, seconds = 0, 0.0
    for i, inter in enumerate(loader):
        if i >= batches + warmup:
            break
        start = time.perf_counter()
        opt.zero_grad()
        model.calculate_loss(inter).backward()
        opt.step()
        if i >= warmup:
            seconds += time.perf_counter() - start
            rows += len(inter)
    return rows / seconds


def report(out, path=None):
    """Print the figures and, with ``path``, write them as JSON."""
    import json

    text = json.dumps(out, indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
