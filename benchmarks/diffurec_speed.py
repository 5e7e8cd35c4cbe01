"""Training and inference throughput of SASRec, DiffuRec and DiffuRecSys at the same width and length, and
the gain from trimming padding (length groups, default; one cut per batch; none), all measured in one run.

    python benchmarks/diffurec_speed.py [--dataset sports] [--hidden 64] [--length 50] [--batches 15]

``--authors`` measures instead DiffuRec's full-sort users/s at the authors' settings (width 128, length 50,
batch 512, one thread) for each ``--sample_steps``, against the authors' 58 CPU-s per 1,000 users (17.2 users/s;
the target is 5x that).
"""

import argparse
import json
import time

import torch
from common import build, report, train_throughput

MODELS = ["SASRec", "DiffuRec", "DiffuRecSys"]
AUTHORS_CPU_S_PER_1K_USERS = 58.0


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


TRIM_VARIANTS = {
    "length_groups": {"trim_padding": True, "length_buckets": 8},
    "batch_trim_only": {"trim_padding": True, "length_buckets": 1},
    "untrimmed": {"trim_padding": False, "length_buckets": 1},
}


def trim_comparison(model, train_loader, test_loader, batches, rounds=3):
    """The same batches through the same model with each padding variant, interleaved over several rounds so
    that drifting machine load hits every variant alike."""
    it = iter(train_loader)
    train_batches = [next(it) for _ in range(batches)]
    it = iter(test_loader)
    test_batches = [next(it)[0] for _ in range(max(2, batches // 3))]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds = {name: [0.0, 0.0] for name in TRIM_VARIANTS}
    for _ in range(rounds):
        for name, attrs in TRIM_VARIANTS.items():
            for key, value in attrs.items():
                setattr(model, key, value)
            model.train()
            start = time.perf_counter()
            for inter in train_batches:
                opt.zero_grad()
                model.calculate_loss(inter).backward()
                opt.step()
            seconds[name][0] += time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                for inter in test_batches:
                    model.full_sort_predict(inter)
            seconds[name][1] += time.perf_counter() - start
    n_train = rounds * sum(len(b) for b in train_batches)
    n_test = rounds * sum(len(b) for b in test_batches)
    return {
        name: {"train_seq_per_s": n_train / tr, "infer_users_per_s": n_test / te} for name, (tr, te) in seconds.items()
    }


def authors_settings(args):
    """users/s at the authors' settings for each number of reverse steps, the same batches for all."""
    settings = dict(hidden_size=128, MAX_ITEM_LIST_LENGTH=50, train_batch_size=512, eval_batch_size=512)
    _, model, _, _, test = build("DiffuRec", args.dataset, **settings)
    authors = 1000.0 / AUTHORS_CPU_S_PER_1K_USERS
    rows = {}
    for steps in args.sample_steps:
        model.sample_steps = steps
        rate = infer_rate(model, test, args.batches)
        rows[steps] = {"users_per_s": rate, "cpu_s_per_1k_users": 1000.0 / rate, "x_authors": rate / authors}
        print(steps, json.dumps(rows[steps]), flush=True)
    measured = dict(dataset=args.dataset, batches=args.batches, settings=settings)
    report(dict(measured, authors_users_per_s=authors, target_users_per_s=5 * authors, results=rows), args.out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--out", default=None)
    parser.add_argument("--authors", action="store_true", help="DiffuRec at the authors' settings (see above)")
    parser.add_argument("--sample_steps", type=int, nargs="+", default=[32, 4])
    args = parser.parse_args()
    if args.authors:
        return authors_settings(args)
    common = dict(
        MAX_ITEM_LIST_LENGTH=args.length,
        hidden_size=args.hidden,
        train_batch_size=args.batch,
        eval_batch_size=args.batch,
        n_heads=2,
    )
    rows = {}
    for model_name in MODELS:
        keys = dict(common)
        if model_name == "SASRec":
            keys.update(n_layers=2, inner_size=4 * args.hidden)
        _, model, train, _, test = build(model_name, args.dataset, **keys)
        rows[model_name] = {
            "train_seq_per_s": train_throughput(model, train, args.batches, warmup=2),
            "infer_users_per_s": infer_rate(model, test, max(2, args.batches // 3)),
        }
        print(model_name, json.dumps(rows[model_name]), flush=True)
    _, model, train, _, test = build("DiffuRec", args.dataset, **common)
    rows["DiffuRec padding variants (same batches, interleaved)"] = trim = trim_comparison(
        model, train, test, args.batches
    )
    print(json.dumps(trim), flush=True)
    base = trim["untrimmed"]
    rows["trim_gain_train"] = trim["length_groups"]["train_seq_per_s"] / base["train_seq_per_s"]
    rows["trim_gain_infer"] = trim["length_groups"]["infer_users_per_s"] / base["infer_users_per_s"]
    rows["batch_trim_only_gain_train"] = trim["batch_trim_only"]["train_seq_per_s"] / base["train_seq_per_s"]
    report(dict(vars(args), results=rows), args.out)


if __name__ == "__main__":
    main()
