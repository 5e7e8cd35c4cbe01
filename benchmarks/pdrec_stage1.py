"""Is PDRec's stage 1 trained enough? TI-DiffRec trained on a dataset's training split, checked at several
epochs for what PDRec reads from it: stage 1's validation (RecBole's uni100 NDCG@10 on the sequential split,
history masked, as inside PDRec) and, per user, the Spearman correlation of the preferences at the user's
training items with their recency (HBR up-weights the items TI-DiffRec prefers; the time-interval input gives
recent items the larger weight, so a trained model should prefer them).

    python benchmarks/pdrec_stage1.py --dataset ml-100k --lr 5e-5 --checks 20,60,150,300,600 [--out f.json]
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--checks", default="20,60,150,300,600")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    checks = sorted(int(c) for c in args.checks.split(","))

    from recbole.data.dataloader import UserDataLoader
    from recbole.utils import ModelType

    from recbole_diff.config import stage_config
    from recbole_diff.data.interactions import training_interactions
    from recbole_diff.utils import get_model, get_trainer

    uni100 = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "uni100"}
    config, _, train, valid, _ = build("PDRec", args.dataset, backbone="SASRec", MAX_ITEM_LIST_LENGTH=20,
                                       eval_args=uni100, metrics=["Hit", "NDCG"], topk=[10], valid_metric="NDCG@10",
                                       seed=args.seed)
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

    out = {"dataset": args.dataset, "learning_rate": args.lr, "seed": args.seed, "checks": []}
    start = time.time()
    for epoch in range(checks[-1]):
        trainer._train_epoch(loader, epoch, show_progress=False)
        if epoch + 1 not in checks:
            continue
        model.eval()
        with torch.no_grad():
            pref = model.preferences(torch.arange(ds.user_num)).numpy()
        rho = per_user_spearman(users, pref[users, items], positions)
        valid_result = trainer.evaluate(valid, load_best_model=False)
        model.train()
        out["checks"].append({"epoch": epoch + 1, "median_spearman_recency": float(np.nanmedian(rho)),
                              "users_positive": float(np.nanmean(rho > 0)),
                              "valid_ndcg@10": float(valid_result["ndcg@10"]), "seconds": time.time() - start})
        print(out["checks"][-1], flush=True)
    report(out, args.out)


if __name__ == "__main__":
    main()
