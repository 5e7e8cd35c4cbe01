"""GlobalDiff's costs, measured in one run: similarity build time and peak memory (sparse vs dense vs
cluster), ensemble evaluation time relative to backbone-only evaluation (U-Net at all T steps, U-Net with a
step subset or a single step, MLP likewise), and diffusion training samples/s; the Borda count's share of
the ensemble's time is reported on its own.

    python benchmarks/globaldiff_cost.py --dataset sports [--batches 20]
"""

import argparse
import json
import time
import tracemalloc

import torch
from common import build, report, train_throughput

from recbole_diff.data.globaldiff import ItemSimilarity, training_pairs
from recbole_diff.model.plugin.globaldiff import borda_fuse


def similarity_cost(model, train, kind, **kwargs):
    ds = train.dataset
    users, items = training_pairs(ds, model.USER_ID, model.ITEM_ID, model.ITEM_SEQ, model.ITEM_SEQ_LEN)
    tracemalloc.start()
    start = time.perf_counter()
    sim = ItemSimilarity(users, items, ds.user_num, ds.item_num, kind=kind, **kwargs)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_mb": peak / 2**20, "stored_mb": sim.nbytes() / 2**20}


@torch.no_grad()
def eval_seconds(model, loader, batches, mode):
    model.eval()
    seconds, users = 0.0, 0
    with model.evaluating(mode):
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            start = time.perf_counter()
            model.full_sort_predict(batch[0])
            seconds += time.perf_counter() - start
            users += len(batch[0])
    return seconds, users


def borda_seconds(batch, n_items, repeats=3):
    """The Borda count of one batch (two rankings) with our ranks vs torch's stable sort."""
    gen = torch.Generator().manual_seed(0)
    y, x = (torch.softmax(torch.randn(batch, n_items, generator=gen, dtype=torch.float64) * 3, -1) for _ in range(2))

    def timed(fn):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    return {
        "ours": timed(lambda: borda_fuse(y, x, 0.5)),
        "two_torch_stable_sorts": timed(
            lambda: [torch.argsort(v, dim=1, descending=True, stable=True) for v in (y, x)]
        ),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--eval_batch", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = {"dataset": args.dataset}
    keys = dict(eval_batch_size=args.eval_batch, hidden_dropout_prob=0.2, attn_dropout_prob=0.2)
    config, model, train, valid, test = build("GlobalDiff", args.dataset, **keys)
    out["n_items"] = int(model.n_items)
    out["similarity"] = {
        "sparse": similarity_cost(model, train, "sparse"),
        "sparse_top100": similarity_cost(model, train, "sparse", topk=100),
        "dense": similarity_cost(model, train, "dense", dense_limit_gb=8.0),
        "cluster_K256": similarity_cost(model, train, "cluster", n_clusters=256),
    }
    print(json.dumps(out["similarity"], indent=1), flush=True)

    loader = model.build_training_data(train)
    out["diffusion_train_samples_per_s"] = {}
    out["eval"] = {}
    base, users = eval_seconds(model, test, args.batches, "backbone")
    out["eval"]["backbone_users_per_s"] = users / base
    out["eval"]["borda_seconds_per_batch"] = borda_seconds(args.eval_batch, model.n_items)
    out["eval"]["backbone_seconds_per_batch"] = base / args.batches
    for label, approximator, steps in [
        ("unet_T20", "unet", None),
        ("unet_5_steps", "unet", 5),
        ("unet_1_step", "unet", 1),
        ("mlp_T20", "mlp", None),
        ("mlp_5_steps", "mlp", 5),
        ("mlp_2_steps", "mlp", 2),
    ]:
        _, model, train, _, test = build(
            "GlobalDiff", args.dataset, approximator=approximator, sample_steps=steps, **keys
        )
        model.build_training_data(train)
        ensemble, _ = eval_seconds(model, test, args.batches, "ensemble")
        out["eval"][label] = {"ensemble_over_backbone": ensemble / base, "users_per_s": users / ensemble}
        if steps is None:
            model.freeze_backbone()
            out["diffusion_train_samples_per_s"][approximator] = train_throughput(
                model, loader, args.batches, model.diffusion_parameters(), optimizer=torch.optim.AdamW
            )
        print(label, json.dumps(out["eval"][label]), flush=True)
    report(out, args.out)


if __name__ == "__main__":
    main()
