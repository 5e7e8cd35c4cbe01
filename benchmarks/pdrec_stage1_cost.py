"""PDRec's cost on a large dataset (sports), short: TI-DiffRec training batches and preference batches with
RecBole's DNN and per-tensor AdamW (before) against the split first layer and the fused AdamW (after), on the
same batches, interleaved; stage 2 on a few users; the store's size for every user computed from the band sizes
and training rows (they depend on the data only), beside the band as a bitmap and as an int32 item list.

    python benchmarks/pdrec_stage1_cost.py --dataset sports --batches 20 --users 800 [--out f.json] [--sizes-only]

Per-epoch and per-stage times are extrapolated from the measured batches (one core).
"""

import argparse
import time

import torch
from common import build, report
from recbole.data.dataloader import UserDataLoader
from recbole.model.general_recommender.diffrec import DNN

from recbole_diff import get_model
from recbole_diff.config import stage_config
from recbole_diff.data.interactions import training_interactions
from recbole_diff.data.pdrec import TrainingItems, compute_preference_store, nns_band, pool_sizes
from recbole_diff.model.plugin.tidiffrec import SplitInputDNN


def variant(model, after):
    model.mlp.__class__ = SplitInputDNN if after else DNN
    params = list(model.parameters())
    kw = {"fused": True} if after else {}
    return torch.optim.AdamW(params, lr=5e-5, weight_decay=0.5, **kw)


def train_seconds(model, opt, batches):
    model.train()
    start = time.perf_counter()
    for inter in batches:
        opt.zero_grad()
        model.calculate_loss(inter).backward()
        opt.step()
    return (time.perf_counter() - start) / len(batches)


@torch.no_grad()
def infer_seconds(model, users):
    model.eval()
    start = time.perf_counter()
    model.preferences(users)
    return time.perf_counter() - start


def store_bytes(training, rows, m, omega_m, pool_epochs):
    """The store's size for every user, from the band sizes and training rows (they depend on the data only):
    in memory (int64 keys, int32 pools) and on disk (item ids in 16 bits when they fit), beside the band as a
    bitmap (the store's earlier layout) and as an int32 item list."""
    lo, hi = nns_band(training.n_items - 1 - training.counts, omega_m)
    band = hi - lo
    pool = int(pool_sizes(band, rows, pool_epochs).sum())
    u, n = training.n_users, int(training.counts.sum())
    item_bytes = 2 if training.n_items <= 1 << 16 else 4
    common = n * (8 + 4 + 4) + u * 8 + (u + 1) * 8  # key, preference, rank; band size, pool offsets
    return {
        "band_items_per_user_mean": int(band.sum()) / u,
        "pool_epochs": pool_epochs,
        "pool_items": pool,
        "pool_items_per_training_row": pool / int(rows.sum()),
        "pool_mb_memory": pool * 4 / 2**20,
        "store_mb_memory": (common + u * m * 8 + pool * 4) / 2**20,
        "store_file_mb": (common + (u * m + pool) * item_bytes) / 2**20,
        "band_bitmap_mb": u * ((training.n_items + 7) // 8) / 2**20,
        "int32_band_list_mb": (int(band.sum()) * 4 + (u + 1) * 8) / 2**20,
        "dense_float_matrix_mb": u * training.n_items * 4 / 2**20,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sizes-only", action="store_true", help="only the store sizes (no timing)")
    args = parser.parse_args()

    config, _, train, _, _ = build("PDRec", args.dataset, backbone="SASRec", MAX_ITEM_LIST_LENGTH=20)
    ds = train.dataset
    sub = stage_config(config, "TIDiffRec", {"mask_history": True})
    torch.manual_seed(0)
    model = get_model("TIDiffRec")(sub, ds)
    loader = UserDataLoader(sub, ds, None, shuffle=True)
    batches = []
    for inter in loader:
        batches.append(inter)
        if len(batches) == args.batches:
            break
    users, items = training_interactions(ds)
    training = TrainingItems.from_pairs(users, items, ds.user_num, ds.item_num)
    out = {
        "dataset": args.dataset,
        "users": ds.user_num,
        "items": ds.item_num,
        "dims_dnn": sub["dims_dnn"],
        "train_batch_size": sub["train_batch_size"],
        "batches_per_epoch": len(loader),
        "measured_batches": 2 * (args.batches // 2),
        "threads": torch.get_num_threads(),
    }
    rows = torch.bincount(ds.inter_feat[ds.uid_field].long(), minlength=ds.user_num)
    out["store"] = {
        f"omega_m_{w}_pool_epochs_{e}": store_bytes(training, rows, 50, w, e) for w in (0.5, 0.9) for e in (10, 20, 40)
    }
    if args.sizes_only:
        report(out, args.out)
        return
    rounds = {"before": [], "after": []}
    infer = {"before": [], "after": []}
    probe = torch.arange(1, 401)
    half = args.batches // 2
    for part in (batches[:half], batches[half : 2 * half]):  # interleaved: machine load hits both alike
        for name in ("before", "after"):
            opt = variant(model, name == "after")
            train_seconds(model, opt, part[:1])  # warm-up, not counted
            rounds[name].append(train_seconds(model, opt, part[1:]))
            infer[name].append(infer_seconds(model, probe))
    for name in ("before", "after"):
        per_batch = sum(rounds[name]) / len(rounds[name])
        per_user = sum(infer[name]) / len(infer[name]) / len(probe)
        out[name] = {
            "train_s_per_batch": per_batch,
            "epoch_s": per_batch * len(loader),
            "inference_s_per_user": per_user,
            "all_users_pass_s": per_user * ds.user_num,
        }
    out["epoch_speedup"] = out["before"]["epoch_s"] / out["after"]["epoch_s"]
    # stage 2 on the first users (untrained weights: the cost does not depend on training)
    model.mlp.__class__ = SplitInputDNN
    model.eval()
    part = TrainingItems(
        args.users,
        training.n_items,
        training.offsets[: args.users + 1],
        training.items[: int(training.offsets[args.users])],
    )
    start = time.perf_counter()
    compute_preference_store(model.preferences, part, 50, 0.5, batch_size=256)
    seconds = time.perf_counter() - start
    out["stage2_s_per_user"] = seconds / args.users
    out["stage2_all_users_s"] = seconds / args.users * ds.user_num
    report(out, args.out)


if __name__ == "__main__":
    main()
