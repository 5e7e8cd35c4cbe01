"""BERT4Rec's training step with its loss at the counted masked slots only (``sparse_masked_loss``) against
RecBole's loss over every slot: CPU seconds a step on the same batches from the same weights, interleaved, and
the largest loss difference.

    python benchmarks/bert4rec_loss.py [--dataset sports] [--length 20] [--batches 20] [--out results.json]
"""

import argparse
import copy
import time

import torch
from common import build, report
from recbole.model.sequential_recommender.bert4rec import BERT4Rec as RecBoleBERT4Rec


def step(model, opt, batch, loss_fn):
    start = time.process_time()
    opt.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    return time.process_time() - start, loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    # DiffuASR's sports preset: width 64, 2 layers, dropout 0.5, batch 512
    config, model, train, _, _ = build(
        "BERT4Rec",
        args.dataset,
        MAX_ITEM_LIST_LENGTH=args.length,
        hidden_size=64,
        inner_size=256,
        n_layers=2,
        hidden_dropout_prob=0.5,
        attn_dropout_prob=0.5,
        train_batch_size=512,
        train_neg_sample_args=None,
        checkpoint_dir="benchmarks/saved",
    )
    batches = [b for _, b in zip(range(args.batches + 2), train)]
    counted = sum(int((b[model.MASK_INDEX] > 0).sum()) for b in batches) / sum(
        b[model.MASK_INDEX].numel() for b in batches
    )
    models = {"sparse": model, "recbole": copy.deepcopy(model)}
    losses = {"sparse": type(model).calculate_loss, "recbole": RecBoleBERT4Rec.calculate_loss}
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    seconds = {k: 0.0 for k in models}
    gap = 0.0
    for i, batch in enumerate(batches):
        out = {}
        for k in models:  # the same batch, the same dropout draws for both
            models[k].train()
            torch.manual_seed(i)
            out[k] = step(models[k], opts[k], batch, losses[k])
            if i >= 2:  # two warm-up steps
                seconds[k] += out[k][0]
        gap = max(gap, abs(out["sparse"][1] - out["recbole"][1]))
    n = len(batches) - 2
    report(
        {
            "dataset": args.dataset,
            "length": args.length,
            "slots_per_row": model.mask_item_length,
            "counted_slot_share": round(counted, 3),
            "steps": n,
            "recbole_step_s": round(seconds["recbole"] / n, 4),
            "sparse_step_s": round(seconds["sparse"] / n, 4),
            "speedup": round(seconds["recbole"] / seconds["sparse"], 2),
            "max_loss_difference": gap,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
