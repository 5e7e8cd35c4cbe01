"""Training and inference throughput of SASRec, DiffuRec and DiffuRecSys at the same width and length, and
the gain from trimming padding (length groups, default; one cut per batch; none), all measured in one run.

    python benchmarks/diffurec_speed.py [--dataset sports] [--hidden 64] [--length 50] [--batches 15]
"""
import argparse
import json
import time

import torch

from common import build

MODELS = ["SASRec", "DiffuRec", "DiffuRecSys"]


def train_rate(model, loader, batches):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    seqs, seconds = 0, 0.0
    for i, inter in enumerate(loader):
        if i >= batches + 2:
            break
        start = time.perf_counter()
        opt.zero_grad()
        model.calculate_loss(inter).backward()
        opt.step()
        if i >= 2:  # warm-up batches are not counted
            seconds += time.perf_counter() - start
            seqs += len(inter)
    return seqs / seconds


@torch.no_grad()
def infer_rate(model, loader, batches):
    model.eval()
    users, seconds = 0, 0.0
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        inter = batch[0]
        start = time.perf_counter()
        model.full_sort_predict(inter)
        seconds += time.perf_counter() - start
        users += len(inter)
    return users / seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    common = dict(MAX_ITEM_LIST_LENGTH=args.length, hidden_size=args.hidden, train_batch_size=args.batch,
                  eval_batch_size=args.batch, n_heads=2)
    rows = {}
    runs = [(m, m, {}) for m in MODELS] + [
        ("DiffuRec-batch-trim-only", "DiffuRec", {"length_buckets": 1}),
        ("DiffuRec-untrimmed", "DiffuRec", {"trim_padding": False}),
    ]
    for label, model_name, extra in runs:
        keys = dict(common, **extra)
        if model_name == "SASRec":
            keys.update(n_layers=2, inner_size=4 * args.hidden)
        _, model, train, _, test = build(model_name, args.dataset, **keys)
        rows[label] = {"train_seq_per_s": train_rate(model, train, args.batches),
                       "infer_users_per_s": infer_rate(model, test, max(2, args.batches // 3))}
        print(label, json.dumps(rows[label]), flush=True)
    rows["batch_trim_only_gain_train"] = (rows["DiffuRec-batch-trim-only"]["train_seq_per_s"]
                                          / rows["DiffuRec-untrimmed"]["train_seq_per_s"])
    rows["trim_gain_train"] = rows["DiffuRec"]["train_seq_per_s"] / rows["DiffuRec-untrimmed"]["train_seq_per_s"]
    rows["trim_gain_infer"] = rows["DiffuRec"]["infer_users_per_s"] / rows["DiffuRec-untrimmed"]["infer_users_per_s"]
    print(json.dumps(rows, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(vars(args), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
