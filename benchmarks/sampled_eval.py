"""Sampled evaluation (uni100) with ``fast_sampled_eval`` on and off, on the same batches in one run: users/s
and the largest score difference. RecBole scores each of a user's 101 candidate rows with ``predict``, each row
carrying the whole sequence; the fast path encodes the sequence once (see recbole_diff/trainer/trainer.py).

With ``--loader`` it times the data loaders alone over the whole validation and test: RecBole's
``NegSampleEvalDataLoader`` against ``CandidateEvalDataLoader`` (recbole_diff/data/loaders.py), from the same
numpy seed, and checks that they give the same batches and leave the same random state.

With ``--whole`` it times whole evaluations instead (``trainer.evaluate`` over every validation user, Hit, NDCG
and GAUC), the fast path with the metrics collected from the full ``[users x items]`` matrix as RecBole does and
from each user's candidates only (see ``compact_candidates``), and the data loader alone.

    python benchmarks/sampled_eval.py [--dataset sports] [--model SASRec] [--batches 100] [--whole | --loader]
"""

import argparse
import time

import numpy as np
import torch
from common import build, report

UNI100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}


@torch.no_grad()
def rate(trainer, batches, fast):
    """Users/s of the trainer's batch scoring over ``batches``, and the score matrices it gave."""
    trainer.config["fast_sampled_eval"] = fast
    users, seconds, scores = 0, 0.0, []
    for batch in batches:
        start = time.perf_counter()
        _, matrix, positive_u, _ = trainer._neg_sample_batch_eval(batch)
        seconds += time.perf_counter() - start
        users += int(positive_u[-1]) + 1
        scores.append(matrix)
    return users / seconds, scores


def whole(trainer, valid, compact):
    """Seconds and metrics of one whole evaluation, its metrics collected from the candidates or not."""
    trainer._collector_takes_compact = lambda: compact and type(trainer)._collector_takes_compact(trainer)
    start = time.perf_counter()
    result = trainer.evaluate(valid, load_best_model=False)
    return time.perf_counter() - start, dict(result)


def whole_evaluations(args, trainer, valid):
    start = time.perf_counter()
    for _ in valid:
        pass
    loader = time.perf_counter() - start
    full_s, full = whole(trainer, valid, False)
    compact_s, compact = whole(trainer, valid, True)
    return {
        "dataset": args.dataset,
        "model": args.model,
        "users": valid._dataset.user_num - 1,
        "metrics": {k: float(v) for k, v in compact.items()},
        "same_metrics": full == compact,
        "loader_only_s": round(loader, 1),
        "evaluate_full_matrix_s": round(full_s, 1),
        "evaluate_candidates_s": round(compact_s, 1),
        "speedup": round(full_s / compact_s, 2),
    }


def _seconds(loader, seed=2020):
    np.random.seed(seed)
    start = time.perf_counter()
    for _ in loader:  # batches not kept: keeping thousands of them slows whichever pass runs later
        pass
    return time.perf_counter() - start


def _pass(loader, seed=2020):
    np.random.seed(seed)
    return list(loader), np.random.get_state()[1].copy()


def _same(ours, theirs):
    return len(ours) == len(theirs) and all(
        set(a[0].columns) == set(b[0].columns)
        and all(torch.equal(a[0][f], b[0][f]) for f in b[0].columns)
        and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
        for a, b in zip(ours, theirs)
    )


def loader_timings(args, config, loaders):
    from recbole_diff.data.loaders import CandidateEvalDataLoader

    out = {"dataset": args.dataset, "model": args.model, "users": loaders[0]._dataset.user_num - 1, "phases": {}}
    for loader in loaders:
        ours = CandidateEvalDataLoader(config, loader._dataset, loader._sampler, shuffle=False)
        recbole_s, ours_s = _seconds(loader), _seconds(ours)
        (theirs, their_state), (mine, state) = _pass(loader), _pass(ours)
        out["phases"][loader._sampler.phase] = {
            "recbole_s": round(recbole_s, 1),
            "at_once_s": round(ours_s, 1),
            "speedup": round(recbole_s / ours_s, 1),
            "same_batches": _same(mine, theirs),
            "same_random_state": bool((state == their_state).all()),
        }
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--model", default="SASRec")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--batches", type=int, default=100, help="validation batches timed (~10 users each)")
    parser.add_argument("--whole", action="store_true", help="time whole evaluations (see above)")
    parser.add_argument("--loader", action="store_true", help="time the data loaders alone (see above)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from recbole_diff import get_trainer

    config, model, _, valid, test = build(
        args.model,
        args.dataset,
        eval_args=UNI100,
        hidden_size=args.hidden,
        MAX_ITEM_LIST_LENGTH=args.length,
        eval_batch_size=1024,
        metrics=["Hit", "NDCG", "GAUC"],
        topk=[1, 5, 10],
        train_neg_sample_args=None,
        checkpoint_dir="benchmarks/saved",
    )
    trainer = get_trainer(config["MODEL_TYPE"], args.model)(config, model)
    model.eval()
    if args.loader:
        report(loader_timings(args, config, (valid, test)), args.out)
        return
    if args.whole:
        report(whole_evaluations(args, trainer, valid), args.out)
        return
    trainer.tot_item_num = valid._dataset.item_num
    trainer.start_sampled_eval(valid)
    batches = [b for _, b in zip(range(args.batches), valid)]
    fast, fast_scores = rate(trainer, batches, True)
    slow, slow_scores = rate(trainer, batches, False)
    finite = [torch.isfinite(s) for s in slow_scores]
    gap = max(float((f[m] - s[m]).abs().max()) for f, s, m in zip(fast_scores, slow_scores, finite))
    same_candidates = all(torch.equal(torch.isfinite(f), m) for f, m in zip(fast_scores, finite))
    report(
        {
            "dataset": args.dataset,
            "model": args.model,
            "hidden_size": args.hidden,
            "length": args.length,
            "users": sum(int(b[2][-1]) + 1 for b in batches),
            "of_users": valid._dataset.user_num - 1,
            "predict_users_per_s": round(slow, 1),
            "fast_users_per_s": round(fast, 1),
            "speedup": round(fast / slow, 1),
            "checked_against_predict": bool(trainer._full_sort_agrees),
            "max_score_difference": gap,
            "same_candidates": same_candidates,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
