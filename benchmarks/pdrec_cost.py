"""PDRec's costs, measured in one run: stage 2 (preferences of every user) batched vs one user at a time, the
store's memory vs a dense users x items matrix, and a stage 3 batch (BCE + HBR + NNS + DPA) vs a plain BCE
batch of the same backbone on the same batches.

    python benchmarks/pdrec_cost.py --dataset sports [--loop-users 300] [--batches 30]

Preference cost does not depend on how well TI-DiffRec is trained, so an untrained one of the authors' size
(``dims_dnn: [1000]``) is used. The one-user loop runs over the first ``--loop-users`` users only and is
reported as users/s. Peak memory is the kernel's resident-set peak over each step (Linux).
"""

import argparse
import time
from contextlib import contextmanager

import torch
from common import build, report, train_throughput

from recbole_diff import get_model
from recbole_diff.config import stage_config
from recbole_diff.data.interactions import training_interactions
from recbole_diff.data.pdrec import TrainingItems, compute_preference_store


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


@contextmanager
def peak_rss(out, key):
    """``out[key]``: how far the process's resident memory peaked above where it stood on entry (MB), measured
    by the kernel: the peak mark is reset on entry (``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_mb("VmRSS")
    except OSError:  # not Linux: no kernel peak to read
        yield
        return
    out[key.replace("_mb", "") + "_start_mb"] = before
    yield
    out[key] = _status_mb("VmHWM") - before


def stage2(tidiffrec, training, users, batch_size, args):
    sub = TrainingItems(
        users, training.n_items, training.offsets[: users + 1], training.items[: int(training.offsets[users])]
    )
    start = time.perf_counter()
    store = compute_preference_store(tidiffrec.preferences, sub, args.m, 0.5, batch_size=batch_size)
    seconds = time.perf_counter() - start
    # the chunk's transient tensors: scores, masked scores (float32), argsort (int64), mask (bool)
    working = batch_size * training.n_items * (4 + 4 + 8 + 1)
    return store, {
        "users": users,
        "seconds": seconds,
        "users_per_s": users / seconds,
        "chunk_working_mb": working / 2**20,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--dims", type=int, default=1000)
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--loop-users", type=int, default=300)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    common = dict(
        backbone=args.backbone,
        MAX_ITEM_LIST_LENGTH=args.max_len,
        hidden_size=64,
        embedding_size=64,
        train_batch_size=256,
        dpa_m=args.m,
    )
    config, model, train, _, _ = build("PDRec", args.dataset, **common)
    ds = train.dataset
    sub = stage_config(config, "TIDiffRec", {"dims_dnn": [args.dims], "mask_history": True})
    torch.manual_seed(0)
    tidiffrec = get_model("TIDiffRec")(sub, ds).eval()
    users, items = training_interactions(ds)
    training = TrainingItems.from_pairs(users, items, ds.user_num, ds.item_num)
    out = {
        "dataset": args.dataset,
        "users": ds.user_num,
        "items": ds.item_num,
        "dims_dnn": args.dims,
        "m": args.m,
        "threads": torch.get_num_threads(),
    }

    with torch.no_grad():
        loop_store, out["one_user_loop"] = stage2(tidiffrec, training, args.loop_users, 1, args)
        with peak_rss(out, "batched_peak_rss_mb"):
            store, out["batched"] = stage2(tidiffrec, training, ds.user_num, args.chunk, args)
    out["batched_vs_loop"] = out["batched"]["users_per_s"] / out["one_user_loop"]["users_per_s"]
    same = torch.equal(loop_store.topm, store.topm[: args.loop_users])
    out["loop_and_batched_agree"] = bool(same)
    out["store_mb"] = store.nbytes() / 2**20
    out["dense_matrix_mb"] = ds.user_num * ds.item_num * 4 / 2**20
    out["authors_two_dense_matrices_mb"] = 2 * out["dense_matrix_mb"]
    with peak_rss(out, "dense_matrix_peak_rss_mb"):  # what keeping every user's preferences takes, measured
        dense = torch.ones(ds.user_num, ds.item_num)
        del dense

    model.set_store(store)
    plain = build("PDRec", args.dataset, use_hbr=False, use_nns=False, use_dpa=False, **common)[1]
    plain.load_state_dict(model.state_dict())
    rounds = []
    for _ in range(2):  # interleaved, so drift in machine load hits both alike
        rounds.append((train_throughput(plain, train, args.batches), train_throughput(model, train, args.batches)))
    out["stage3_rows_per_s"] = {"plain_bce": sum(r[0] for r in rounds) / 2, "pdrec_all": sum(r[1] for r in rounds) / 2}
    out["stage3_time_ratio"] = out["stage3_rows_per_s"]["plain_bce"] / out["stage3_rows_per_s"]["pdrec_all"]
    report(out, args.out)


if __name__ == "__main__":
    main()
