"""Where a DiffuASR grid cell spends its time, from short runs extrapolated to the whole stage.

A cell is: the backbone on the original data (shared by the cells of a seed through ``stage_cache``), the augmenter
(shared by the cells that differ only in sampling), generation for every augmentable user, the backbone on the
augmented data, and the test evaluations (uni100, full ranking, both backbones, the long-tail groups). This
script times, on the real dataset and the preset's settings:

* a few hundred training batches of the backbone -> seconds per epoch (rows / rows per second), x ``epochs``;
* one validation pass (run after every epoch) and one test pass per evaluation mode;
* ``--augmenter-steps`` optimiser steps of the augmenter -> x ``augmenter_train_steps``;
* generation (CF and CG, the preset's sampler) for ``--gen-users`` users at each ``--gen-batch`` -> x users;
* the augmented backbone: the same per-row cost over the original rows plus M rows per augmented user.

Untrained weights cost the same as trained ones, so nothing is trained to the end. Times are the process's CPU
seconds (``time.process_time``, one thread): what the stage costs on one core whatever else the machine runs.

    python benchmarks/diffuasr_stages.py --dataset sports --preset properties/bench/diffuasr_sports.yaml \
        [--backbone SASRec] [--out results.json]
"""

import argparse
import logging
import time

import torch
from common import build, report
from diffuasr_samplers import overrides

from recbole_diff.model.plugin.diffuasr import AUG_HEADS, AUG_RAW, AugmenterLoader


def seconds(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def train_rate(model, loader, batches, warmup=2):
    """Training rows per CPU second over ``batches`` Adam steps after ``warmup`` uncounted ones."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    rows, spent = 0, 0.0
    for i, inter in enumerate(loader):
        if i >= batches + warmup:
            break
        start = time.process_time()
        opt.zero_grad()
        model.calculate_loss(inter).backward()
        opt.step()
        if i >= warmup:
            spent += time.process_time() - start
            rows += len(inter)
    return rows / spent


def augmenter_step_seconds(model, sequences, users, batch, steps):
    aug = model.augmenter
    opt = torch.optim.Adam([p for p in aug.parameters() if p.requires_grad], lr=1e-3)
    aug.train()
    batch = next(iter(AugmenterLoader(None, sequences, users[:batch], model.m, batch)))
    total = 0.0
    for k in range(steps + 1):
        start = time.process_time()
        loss = aug.loss(batch[AUG_HEADS], batch[AUG_RAW])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if k:  # the first step warms up
            total += time.process_time() - start
    aug.eval()
    return total / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="sports")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--guide", default="cg")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--work", default=None)
    parser.add_argument("--batches", type=int, default=200, help="backbone training batches timed")
    parser.add_argument("--augmenter-steps", type=int, default=20)
    parser.add_argument("--gen-users", type=int, default=512)
    parser.add_argument("--gen-batch", type=int, nargs="+", default=[256])
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()

    from recbole.utils import ModelType

    from recbole_diff.data.augment import augmenter_users, training_sequences
    from recbole_diff.quick_start import extra_mode_results
    from recbole_diff.trainer.registry import get_trainer

    keys = overrides(args, extra)
    start = time.process_time()
    config, model, train, valid, test = build("DiffuASR", args.dataset, backbone=args.backbone, **keys)
    out = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "data_seconds": time.process_time() - start,
        "config": {
            k: config[k]
            for k in (
                "M",
                "sampler",
                "sample_steps",
                "augmenter_train_steps",
                "augmenter_batch_size",
                "train_batch_size",
                "epochs",
                "MAX_ITEM_LIST_LENGTH",
                "eval_args",
            )
        },
    }
    epochs, m = int(config["epochs"]), int(config["M"])
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    sequences = training_sequences(train.dataset)
    users = model.augmentable_users(sequences, valid, logging.getLogger())
    rows = len(train.dataset)
    aug_rows = rows + m * len(users)

    # the backbone: training rows per second, one validation pass
    rate = train_rate(model.backbone, train, args.batches)
    plain = get_trainer(ModelType.SEQUENTIAL, args.backbone)(config, model.backbone)
    valid_s = seconds(lambda: plain.evaluate(valid, load_best_model=False))
    out["backbone"] = {
        "rows": rows,
        "rows_per_s": rate,
        "batches_timed": args.batches,
        "epoch_train_s": rows / rate,
        "valid_pass_s": valid_s,
        "stage_s": epochs * (rows / rate + valid_s),
    }
    print(out["backbone"], flush=True)
    model.freeze_backbone()

    # the augmenter
    model.init_embedding_from_backbone()
    teach = augmenter_users(sequences, m, int(config["augmenter_min_raw"]))
    step = augmenter_step_seconds(model, sequences, teach, int(config["augmenter_batch_size"]), args.augmenter_steps)
    out["augmenter"] = {
        "users": len(teach),
        "step_s": step,
        "steps_timed": args.augmenter_steps,
        "stage_s": step * int(config["augmenter_train_steps"]),
    }
    print(out["augmenter"], flush=True)

    # generation, per guide and batch size, on the first users
    out["generation"] = {"users": len(users)}
    sample = users[: args.gen_users]
    for guide in ("cf", "cg"):
        config["guide"], model.augmenter.guide = guide, guide
        for batch in args.gen_batch:
            config["generation_batch_size"] = batch
            ups = len(sample) / seconds(lambda: model.generate(sequences, sample))
            out["generation"][f"{guide}_batch{batch}"] = {
                "users_timed": len(sample),
                "users_per_s": ups,
                "stage_s": len(users) / ups,
            }
            print(guide, batch, out["generation"][f"{guide}_batch{batch}"], flush=True)
    from recbole_diff.data.augment import history_mask, round_to_items

    x0 = torch.randn(256, m, model.d)
    mask = history_mask(sequences, users[:256], model.n_items)
    out["generation"]["rounding_s_per_256_users"] = seconds(
        lambda: round_to_items(x0, model.augmenter.embedding.weight, mask)
    )

    # the augmented backbone: the same cost per row over the augmented rows; its validation passes prepend M items
    model.prefix[users] = torch.randint(1, model.n_items, (len(users), m))
    valid_aug_s = seconds(lambda: trainer.evaluate(valid, load_best_model=False))
    out["augmented_backbone"] = {
        "rows": aug_rows,
        "epoch_train_s": aug_rows / rate,
        "valid_pass_s": valid_aug_s,
        "stage_s": epochs * (aug_rows / rate + valid_aug_s),
    }
    print(out["augmented_backbone"], flush=True)

    # the test: uni100 and full ranking of the augmented backbone; the original backbone and the long-tail groups
    # repeat the uni100 pass three times (backbone, and the groups for both)
    test_s = seconds(lambda: trainer.evaluate(test, load_best_model=False))
    full_s = seconds(lambda: extra_mode_results(config, trainer))
    out["test"] = {"uni100_pass_s": test_s, "extra_modes_s": full_s, "stage_s": 4 * test_s + full_s}
    print(out["test"], flush=True)
    out["cell_s"] = {
        "first_of_a_seed": sum(out[k]["stage_s"] for k in ("backbone", "augmenter", "augmented_backbone", "test"))
        + out["generation"][f"{args.guide}_batch{args.gen_batch[0]}"]["stage_s"]
        + out["data_seconds"]
    }
    out["cell_s"]["with_shared_stages"] = (
        out["cell_s"]["first_of_a_seed"] - out["backbone"]["stage_s"] - out["augmenter"]["stage_s"]
    )
    report(out, args.out)


if __name__ == "__main__":
    main()
