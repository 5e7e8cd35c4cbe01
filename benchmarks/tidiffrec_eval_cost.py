"""TI-DiffRec's sampled validation (PDRec's stage 1), scored a loader batch at a time against in windows of users
(``EVAL_WINDOW``): RecBole's uni100 loader holds eval_batch_size / 101 users a batch, and a user costs ten
passes over the [items x d] weights whatever the batch. Times the real trainer's evaluation of the first
``--batches`` validation batches with either setting, interleaved, and checks both give the same metrics.

    python benchmarks/tidiffrec_eval_cost.py --dataset sports --batches 60 [--out f.json]
"""

import argparse
import itertools
import time

import torch
from common import build, report

import recbole_diff.model.plugin.tidiffrec as tidiffrec
from recbole_diff import get_model, get_trainer
from recbole_diff.config import stage_config


class FirstBatches:
    """The first ``n`` batches of an evaluation loader, as a loader (RecBole's evaluate iterates it)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n
        self._dataset = loader._dataset

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.n)

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        return getattr(self.loader, name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    config, _, train, valid, _ = build(
        "PDRec",
        args.dataset,
        backbone="SASRec",
        MAX_ITEM_LIST_LENGTH=20,
        eval_args=uni100,
        metrics=["Hit", "NDCG"],
        topk=[10],
        valid_metric="NDCG@10",
        eval_batch_size=1024,
    )
    sub = stage_config(config, "TIDiffRec", {"mask_history": True})
    torch.manual_seed(0)
    model = get_model("TIDiffRec")(sub, train.dataset)
    trainer = get_trainer(sub["MODEL_TYPE"], "TIDiffRec")(sub, model)
    part = FirstBatches(valid, args.batches)
    seconds = {"batch": [], "window": []}
    results = {}
    for _ in range(2):  # interleaved: machine load hits both alike
        for name, window in (("batch", 1), ("window", tidiffrec.EVAL_WINDOW)):
            tidiffrec.EVAL_WINDOW = window
            start = time.perf_counter()
            results[name] = trainer.evaluate(part, load_best_model=False)
            seconds[name].append(time.perf_counter() - start)
    users = sum(len(torch.unique(b[0]["user_id"])) for b in part)
    out = {
        "dataset": args.dataset,
        "eval_batch_size": 1024,
        "batches": args.batches,
        "users": users,
        "window": tidiffrec.EVAL_WINDOW,
        "seconds": {k: min(v) for k, v in seconds.items()},
        "speedup": min(seconds["batch"]) / min(seconds["window"]),
        "all_users_pass_s": {k: min(v) / users * train.dataset.user_num for k, v in seconds.items()},
        "same_metrics": results["batch"] == results["window"],
        "threads": torch.get_num_threads(),
    }
    report(out, args.out)


if __name__ == "__main__":
    main()
