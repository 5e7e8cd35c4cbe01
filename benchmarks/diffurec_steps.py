"""Validation NDCG@10 of one briefly trained DiffuRec (or DiffuRecSys) against the number of reverse steps at
inference, for the ancestral and DDIM samplers, and each setting's users/s; the same users and model throughout.

    python benchmarks/diffurec_steps.py [--dataset ml-100k] [--model DiffuRec] [--epochs 2] [--max_users 0]
        [--steps 32 16 8 4 2 1] [--out benchmarks/results/diffurec_steps_ml-100k.json] [--key value ...]

Training uses the model's yaml defaults (plus ``--set key=value`` overrides) for ``--epochs`` epochs without
validation; each evaluation ranks every item for each validation user, as RecBole's full sort does.
"""

import argparse
import math
import time

import torch
from common import build, report


@torch.no_grad()
def validate(model, loader, max_users=0):
    """NDCG@10 and HR@10 over the loader's users (leave-one-out: one target each), and users/s."""
    model.eval()
    ndcg, hits, users, seconds = 0.0, 0, 0, 0.0
    for inter, history, _, positive_i in loader:
        start = time.perf_counter()
        scores = model.full_sort_predict(inter).view(len(inter), -1)
        seconds += time.perf_counter() - start
        if history is not None:  # RecBole masks no history in sequential evaluation
            scores[history[0], history[1]] = -float("inf")
        scores[:, 0] = -float("inf")
        target = scores[torch.arange(len(inter)), positive_i]
        rank = (scores > target[:, None]).sum(1)
        ndcg += float((1.0 / torch.log2(rank[rank < 10].double() + 2)).sum())
        hits += int((rank < 10).sum())
        users += len(inter)
        if max_users and users >= max_users:
            break
    return {"NDCG@10": ndcg / users, "HR@10": hits / users, "users": users, "users_per_s": users / seconds}


def parse_sets(pairs):
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="DiffuRec")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max_batches", type=int, default=0, help="cap on training batches per epoch (0: all)")
    parser.add_argument("--max_users", type=int, default=0, help="validation users evaluated (0: all)")
    parser.add_argument("--steps", type=int, nargs="+", default=[32, 16, 8, 4, 2, 1])
    parser.add_argument("--samplers", nargs="+", default=["ancestral", "ddim"])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config, model, train, valid, _ = build(args.model, args.dataset, **parse_sets(args.set))
    opt = torch.optim.Adam(model.parameters(), lr=config["learning_rate"], weight_decay=config["weight_decay"])
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for i, inter in enumerate(train):
            if args.max_batches and i >= args.max_batches:
                break
            opt.zero_grad()
            model.calculate_loss(inter).backward()
            opt.step()
        print(f"epoch {epoch} done at {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    full = config["diffusion_steps"]
    for sampler in args.samplers:
        for steps in args.steps:
            model.sampler, model.sample_steps = sampler, steps
            row = dict(sampler=sampler, steps=steps, **validate(model, valid, args.max_users))
            rows.append(row)
            print(row, flush=True)
    reference = next(r for r in rows if r["sampler"] == "ancestral" and r["steps"] == full)
    within = [r["steps"] for r in rows if r["sampler"] == "ancestral" and r["NDCG@10"] >= 0.99 * reference["NDCG@10"]]
    out = dict(
        vars(args),
        config={
            k: config[k]
            for k in ("hidden_size", "n_blocks", "MAX_ITEM_LIST_LENGTH", "train_batch_size", "diffusion_steps", "seed")
        },
        training_seconds=time.perf_counter() - start,
        rows=rows,
        fewest_ancestral_steps_within_1pct=min(within) if within else None,
        ndcg_standard_error_full=math.sqrt(
            max(reference["NDCG@10"] * (1 - reference["NDCG@10"]), 0) / reference["users"]
        ),
    )
    report(out, args.out)


if __name__ == "__main__":
    main()
