"""Is PDRec's stage 1 trained enough, and does it know more than popularity? TI-DiffRec trained on a dataset's
training split, checked at several epochs for what PDRec reads from it:

* stage 1's validation (RecBole's uni100 NDCG@10 on the sequential split, history masked, as inside PDRec);
* its own ranking of each user's held-out next item (the validation item) against a popularity ranking (training
  counts), both with the user's training items removed: full-ranking NDCG@10 / HR@10, the same over the item and
  100 uniform non-interacted items (the same draws for both rankers), and the next item's AUC (the share of
  the user's non-interacted items it is preferred to: how well the preferences correlate with what comes next);
* per user, the Spearman correlation of the whole preference vector with popularity (is it popularity?) and of
  the preferences at the user's training items with their recency (HBR up-weights the items TI-DiffRec prefers;
  the time-interval input gives recent items the larger weight, so a trained model should prefer them).

    python benchmarks/pdrec_stage1.py --dataset ml-100k --lr 5e-5 --checks 20,60,150,300,600 [--out f.json]
    python benchmarks/pdrec_stage1.py --dataset sports --checkpoint <grid>/stages/PDRec-tidiffrec-...pth
"""

import argparse
import time

import numpy as np
import torch
from common import build, report


def per_user_spearman(users, values, positions, min_items=5):
    from scipy.stats import spearmanr

    rho = []
    for u in np.unique(users):
        m = users == u
        if m.sum() >= min_items:
            rho.append(spearmanr(values[m], positions[m]).correlation)
    return np.array(rho, dtype=float)


def next_item_metrics(score_rows, train_users, train_items, next_users, next_items, negatives, chunk=2048):
    """Ranking of each user's next item by ``score_rows(users) -> [n, I]`` with the user's training items (and
    item 0) removed: full-ranking NDCG@10 / HR@10, the same among the item and its 100 ``negatives`` [n, 100], and
    AUC. Users go in chunks, so no users x items float64 matrix is held (sports: 5 GB)."""
    order = np.argsort(train_users, kind="stable")
    t_users, t_items = train_users[order], train_items[order]
    rank_full, rank100, auc = [], [], []
    for start in range(0, len(next_users), chunk):
        users = next_users[start : start + chunk]
        s = np.array(score_rows(users), dtype=np.float64)
        lo, hi = np.searchsorted(t_users, users, "left"), np.searchsorted(t_users, users, "right")
        rows = np.repeat(np.arange(len(users)), hi - lo)
        cols = t_items[np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])] if len(rows) else rows
        s[rows, cols] = -np.inf
        s[:, 0] = -np.inf
        n = np.arange(len(users))
        target = s[n, next_items[start : start + chunk]][:, None]
        finite = np.isfinite(s).sum(1)
        ties = (s == target).sum(1) - 1  # ties count half, so a constant ranker scores AUC 0.5
        full = (s > target).sum(1) + 0.5 * ties
        rank_full.append(full)
        auc.append(1 - full / np.maximum(finite - 1, 1))
        neg = s[n[:, None], negatives[start : start + chunk]]
        rank100.append((neg > target).sum(1) + 0.5 * (neg == target).sum(1))

    def ndcg_hr(rank):
        hit = rank < 10
        return float(np.mean(np.where(hit, 1 / np.log2(rank + 2), 0))), float(np.mean(hit))

    out = {}
    out["full_ndcg@10"], out["full_hit@10"] = ndcg_hr(np.concatenate(rank_full))
    out["uni100_ndcg@10"], out["uni100_hit@10"] = ndcg_hr(np.concatenate(rank100))
    out["auc"] = float(np.mean(np.concatenate(auc)))
    return out


def sample_negatives(train_users, train_items, next_users, next_items, n_items, k=100, seed=0):
    """k uniform items per row, none a training item of the user, the next item or item 0."""
    rng = np.random.default_rng(seed)
    seen = set(zip(train_users.tolist(), train_items.tolist()))
    out = np.empty((len(next_users), k), dtype=np.int64)
    for row, (u, target) in enumerate(zip(next_users.tolist(), next_items.tolist())):
        picks = []
        while len(picks) < k:
            i = int(rng.integers(1, n_items))
            if i != target and (u, i) not in seen:
                picks.append(i)
        out[row] = picks
    return out


def per_user_spearman_rows(a, b, chunk=2048):
    """Spearman correlation of rows of ``a`` [U, I] with vector ``b`` [I] (item 0 left out), chunk by chunk."""
    from scipy.stats import rankdata

    rb = rankdata(b[1:])
    rb = rb - rb.mean()
    out = []
    for start in range(0, len(a), chunk):
        ra = rankdata(a[start : start + chunk, 1:], axis=1)
        ra -= ra.mean(1, keepdims=True)
        out.append((ra @ rb) / np.sqrt((ra**2).sum(1) * (rb**2).sum()))
    return np.concatenate(out)


def check(model, users, items, positions, next_users, next_items, negatives, popularity, ds):
    """What PDRec reads from a TI-DiffRec: its next-item ranking, its distance from popularity, its recency."""
    model.eval()
    with torch.no_grad():
        pref = torch.cat(
            [model.preferences(torch.arange(a, min(a + 1024, ds.user_num))) for a in range(0, ds.user_num, 1024)]
        )
    pref = pref.numpy()
    model.train()
    rho = per_user_spearman(users, pref[users, items], positions)
    own = next_item_metrics(lambda u: pref[u], users, items, next_users, next_items, negatives)
    rho_pop = per_user_spearman_rows(pref[next_users], popularity)
    return {
        "next_item": own,
        "median_spearman_with_popularity": float(np.median(rho_pop)),
        "median_spearman_recency": float(np.nanmedian(rho)),
        "users_positive": float(np.nanmean(rho > 0)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--checks", default="20,60,150,300,600")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="check this trained TI-DiffRec (a bench grid's stages/PDRec-tidiffrec-*.pth) instead of training one",
    )
    parser.add_argument("--length", type=int, default=20, help="MAX_ITEM_LIST_LENGTH (as the grid the model is from)")
    args = parser.parse_args()
    checks = sorted(int(c) for c in args.checks.split(","))

    from recbole.data.dataloader import UserDataLoader
    from recbole.utils import ModelType

    from recbole_diff import get_model, get_trainer
    from recbole_diff.config import stage_config
    from recbole_diff.data.interactions import training_interactions

    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    config, _, train, valid, _ = build(
        "PDRec",
        args.dataset,
        backbone="SASRec",
        MAX_ITEM_LIST_LENGTH=args.length,
        eval_args=uni100,
        metrics=["Hit", "NDCG"],
        topk=[10],
        valid_metric="NDCG@10",
        seed=args.seed,
    )
    sub = stage_config(config, "TIDiffRec", {"mask_history": True, "learning_rate": args.lr})
    ds = train.dataset
    torch.manual_seed(args.seed)
    model = get_model("TIDiffRec")(sub, ds)
    trainer = get_trainer(ModelType.GENERAL, "TIDiffRec")(sub, model)
    loader = UserDataLoader(sub, ds, None, shuffle=True)
    users, items = training_interactions(ds)  # each user's training items in time order
    positions = np.zeros(len(users))
    seen = {}
    for k, u in enumerate(users):
        positions[k] = seen.get(u, 0)
        seen[u] = positions[k] + 1

    vd = valid.dataset.inter_feat
    next_users, next_items = vd[ds.uid_field].numpy(), vd[ds.iid_field].numpy()
    popularity = np.bincount(items, minlength=ds.item_num).astype(np.float64)
    negatives = sample_negatives(users, items, next_users, next_items, ds.item_num, seed=args.seed)
    out = {
        "dataset": args.dataset,
        "learning_rate": args.lr,
        "seed": args.seed,
        "users": int(len(next_users)),
        "items": int(ds.item_num),
        "popularity": next_item_metrics(
            lambda u: np.tile(popularity, (len(u), 1)), users, items, next_users, next_items, negatives
        ),
        "checks": [],
    }
    print("popularity", out["popularity"], flush=True)
    start = time.time()
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
        got = check(model, users, items, positions, next_users, next_items, negatives, popularity, ds)
        got.update(checkpoint=args.checkpoint, seconds=time.time() - start)
        got["beats_popularity"] = {k: got["next_item"][k] > out["popularity"][k] for k in got["next_item"]}
        out["checks"].append(got)
        print(got, flush=True)
        report(out, args.out)
        return
    for epoch in range(checks[-1]):
        trainer._train_epoch(loader, epoch, show_progress=False)
        if epoch + 1 not in checks:
            continue
        got = check(model, users, items, positions, next_users, next_items, negatives, popularity, ds)
        valid_result = trainer.evaluate(valid, load_best_model=False)
        model.train()
        got.update(
            epoch=epoch + 1,
            **{"valid_ndcg@10": float(valid_result["ndcg@10"])},
            seconds=time.time() - start,
        )
        got["beats_popularity"] = {k: got["next_item"][k] > out["popularity"][k] for k in got["next_item"]}
        out["checks"].append(got)
        print(out["checks"][-1], flush=True)
    report(out, args.out)


if __name__ == "__main__":
    main()
