"""Evaluation beyond RecBole's: per-user-group metrics (DiffuASR's long-tail report, :func:`group_metrics`) and
long-term evaluation (GlobalDiff's RQ2): how well a model predicts the P-th next item, P = 1..4.

Each user's last ``horizon - 1`` interactions are held out before RecBole splits the data, so RecBole's
leave-one-out split trains on everything up to L-5, validates on L-4 and tests on L-3 (P = 1). The held-out
items are then the targets for P = 2..4, scored from the same input as P = 1.
"""

from contextlib import nullcontext

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader

from recbole_diff.model.utils import seeded_numpy


def hold_out_last(dataset, n):
    """Drop each user's last ``n`` interactions (in time order) from ``dataset`` before it is split; return
    {user id: [item at L-n+1, ..., item at L]} for the dropped ones."""
    inter = dataset.inter_feat  # a pandas frame until RecBole builds the dataset
    uid, iid, tid = dataset.uid_field, dataset.iid_field, dataset.time_field
    users = np.asarray(inter[uid])
    times = np.asarray(inter[tid]) if tid in inter.columns else np.arange(len(users))
    order = np.lexsort((np.arange(len(users)), times, users))  # by user, then time, stable
    sorted_users = users[order]
    # rank from the end within each user: 0 for the last interaction
    counts = np.bincount(sorted_users)
    ends = np.cumsum(counts)[sorted_users]
    from_end = ends - 1 - np.arange(len(order))
    dropped = order[from_end < n]  # `order` is by user then time, so each user's rows come in time order
    keep = np.ones(len(users), dtype=bool)
    keep[dropped] = False
    held = {}
    items = np.asarray(inter[iid])
    for row in dropped:
        held.setdefault(int(users[row]), []).append(int(items[row]))
    dataset.inter_feat = inter[keep].reset_index(drop=True)
    return held


def ranked_to(model, k):
    """A block in which the model's full-sort scores order its items down to place ``k`` at least: a model that
    scores only its best items (GlobalDiff's top-k fusion) widens that to k."""
    depth = getattr(model, "ranking_depth", None)
    return depth(k) if depth is not None else nullcontext()


@torch.no_grad()
def long_term_evaluate(model, test_data, held_out, k=20, device=None):
    """HR@k and NDCG@k for P = 1 (RecBole's test target) and P = 2.. (the held-out items), full ranking."""
    if not isinstance(test_data, FullSortEvalDataLoader):
        raise ValueError("long-term evaluation needs full-ranking test data (eval_args mode: full).")
    model.eval()
    horizon = 1 + max((len(v) for v in held_out.values()), default=0)
    hits = np.zeros(horizon)
    ndcg = np.zeros(horizon)
    counts = np.zeros(horizon)
    uid = model.USER_ID
    for interaction, _, _, _ in test_data:
        interaction = interaction.to(device or model.device)
        with ranked_to(model, k):
            scores = model.full_sort_predict(interaction).view(len(interaction), -1).double()
        scores[:, 0] = float("-inf")
        users = interaction[uid].tolist()
        targets = [[int(t)] + held_out.get(u, []) for u, t in zip(users, interaction[model.ITEM_ID].tolist())]
        for p in range(horizon):
            rows = [b for b, tg in enumerate(targets) if len(tg) > p]
            if not rows:
                continue
            rows_t = torch.tensor(rows, device=scores.device)
            items = torch.tensor([targets[b][p] for b in rows], device=scores.device)
            target_scores = scores[rows_t, items]
            # rank = number of items scored strictly higher (ties resolved in the target's favour, as a
            # stable top-k would not guarantee either way)
            rank = (scores[rows_t] > target_scores[:, None]).sum(dim=1).cpu().numpy()
            hit = rank < k
            hits[p] += hit.sum()
            ndcg[p] += (hit / np.log2(rank + 2)).sum()
            counts[p] += len(rows)
    return {
        f"P{p + 1}": {f"hit@{k}": float(hits[p] / counts[p]), f"ndcg@{k}": float(ndcg[p] / counts[p])}
        for p in range(horizon)
        if counts[p]
    }


@torch.no_grad()
def target_hits_and_gains(scores, positive_u, positive_i, k):
    """Per target row: hit@k and its NDCG gain, the rank counting the items scored strictly higher (items tied
    with the target rank below it)."""
    target = scores[positive_u, positive_i]
    rank = (scores[positive_u] > target[:, None]).sum(1).cpu()
    gain = torch.where(rank < k, 1.0 / torch.log2(rank.float() + 2), torch.zeros_like(rank, dtype=torch.float))
    return (rank < k).float(), gain


@torch.no_grad()  # as RecBole's evaluate: scoring builds no autograd graph
def group_metrics(trainer, eval_data, user_lengths, bounds=(5, 20), k=10):
    """HR@k and NDCG@k per user group by sequence length (the long-tail report): groups ``[3, b1]``,
    ``[b1 + 1, b2]``, ..., ``> b_last`` of ``user_lengths[user]``. Scores come from the trainer's own batch
    evaluation (:meth:`recbole_diff.trainer.CompatMixin.batch_scorer`), so sampled (uni100) and full ranking both
    work; items tied with the target rank below it."""
    model = trainer.model
    model.eval()
    full = isinstance(eval_data, FullSortEvalDataLoader)
    batch_eval = trainer.batch_scorer(eval_data)
    uid = eval_data._dataset.uid_field
    users, hits, gains = [], [], []
    with seeded_numpy(trainer.config["seed"]), ranked_to(model, k):  # the candidates the trainer's evaluate scores
        for batched in eval_data:
            interaction, scores, positive_u, positive_i = batch_eval(batched)
            if full:
                row_users = interaction[uid]
            else:  # one score row per user of the batch; row_idx maps interaction rows to those rows
                row_users = torch.zeros(int(positive_u[-1]) + 1, dtype=torch.long)
                row_users[batched[1].cpu()] = interaction[uid].cpu()
            hit, gain = target_hits_and_gains(scores, positive_u, positive_i, k)
            users.append(row_users[positive_u.cpu()].cpu())
            hits.append(hit)
            gains.append(gain)
    users, hits, gains = torch.cat(users), torch.cat(hits), torch.cat(gains)
    lengths = torch.as_tensor(user_lengths)[users]
    edges = [3] + [b + 1 for b in bounds]
    out = {}
    for i, low in enumerate(edges):
        high = edges[i + 1] - 1 if i + 1 < len(edges) else None
        name = f"{low}-{high}" if high is not None else f">{low - 1}"
        keep = (lengths >= low) & (lengths <= high if high is not None else torch.ones_like(lengths, dtype=torch.bool))
        n = int(keep.sum())
        out[name] = {
            "users": n,
            f"hit@{k}": round(float(hits[keep].mean()), 4) if n else None,
            f"ndcg@{k}": round(float(gains[keep].mean()), 4) if n else None,
        }
    return out
