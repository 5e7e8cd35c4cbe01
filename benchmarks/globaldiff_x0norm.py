"""A saved GlobalDiff's validation HR@10 / NDCG@10 on its first validation batches: the backbone alone, the
ensemble with ``x0_norm: softmax`` (the default) and ``l1``, and the diffusion model alone. ``x0_norm`` is an
inference setting, so one trained model answers whether the diffusion side gets a vote in the Borda count.
Scores as RecBole's full-sort evaluation does (training items and padding at -inf); the target's rank counts
the items scored strictly higher.

    python benchmarks/globaldiff_x0norm.py <saved GlobalDiff .pth> [--batches 8] [--out results.json]
"""

import argparse

import torch
from common import report


@torch.no_grad()
def top10(trainer, model, valid, batches):
    from recbole_diff.evaluation import target_hits_and_gains

    hits, gains = [], []
    for i, batch in enumerate(valid):
        if i >= batches:
            break
        _, scores, pu, pi = trainer._full_sort_batch_eval(batch)
        hit, gain = target_hits_and_gains(scores, pu, pi, 10)
        hits.append(hit)
        gains.append(gain)
    hits, gains = torch.cat(hits), torch.cat(gains)
    return {"hit@10": hits.mean().item(), "ndcg@10": gains.mean().item(), "users": len(hits)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from recbole_diff import get_trainer
    from recbole_diff.quick_start import load_data_and_model

    config, model, _, _, valid, _ = load_data_and_model(args.checkpoint)
    model.eval()
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    trainer.tot_item_num = valid._dataset.item_num
    out = {"checkpoint": args.checkpoint}
    for mode, norm in (
        ("backbone", "softmax"),
        ("ensemble", "softmax"),
        ("ensemble", "l1"),
        ("diffusion_only", "softmax"),
    ):
        model.x0_norm = norm
        with model.evaluating(mode):
            out[f"{mode}-{norm}"] = top10(trainer, model, valid, args.batches)
    report(out, args.out)


if __name__ == "__main__":
    main()
