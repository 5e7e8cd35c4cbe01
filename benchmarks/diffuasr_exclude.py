"""``exclude_history`` decided by measurement: one backbone and one augmenter, then the same generation with the
user's own items (and repeats) forbidden at rounding and allowed.

* fidelity (as ``diffuasr_fidelity.py``): for users long enough to teach the augmenter, M items generated from
  S_raw against the real first M items (overlap, best cosine), with S_raw's items excluded or not;
* the pipeline: M items for every augmentable user, conditioned on the training part, written as a dataset each;
  the backbone trained on each from the same initial weights; its best validation result (the early-stopping
  split, whose targets are the original's) and its test results. Also the share of generated items that are
  the user's own training items and of repeats within a prefix.

    python benchmarks/diffuasr_exclude.py --dataset ml-100k --preset properties/bench/diffuasr_ml-100k.yaml \\
        [--guide cf] [--seed 2020] [--key=value ...] [--out results.json]
"""

import argparse
import copy
import logging
import time

from common import build, report
from diffuasr_fidelity import closeness, generate_from_raw
from diffuasr_samplers import overrides, test_results


def prefix_stats(sequences, users, prefix, n_items):
    from recbole_diff.data.augment import history_mask

    own = history_mask(sequences, users, n_items).gather(1, prefix).float().mean().item()
    repeats = 1.0 - sum(len(set(row.tolist())) for row in prefix) / prefix.numel()
    return {
        "own_items": own,
        "repeats": repeats,
        "padding": int((prefix == 0).sum()),
        "distinct": int(prefix.unique().numel()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--guide", default="cf")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()

    from recbole_diff import get_trainer
    from recbole_diff.data.augment import augmenter_users, training_sequences

    keys = overrides(args, extra)
    config, model, train, valid, test = build("DiffuASR", args.dataset, backbone=args.backbone, **keys)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    start = time.perf_counter()
    trainer.run_stage("backbone", train, valid, verbose=False, saved=True)
    backbone_seconds = time.perf_counter() - start
    sequences = training_sequences(train.dataset)
    trainer.run_stage("augmenter", train, valid, verbose=False, saved=False)
    with model.evaluating("backbone"):
        original = test_results(trainer, test)
    out = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "guide": args.guide,
        "seed": args.seed,
        "config": {
            k: config[k]
            for k in (
                "M",
                "guidance_scale",
                "sampler",
                "sample_steps",
                "augmenter_train_steps",
                "MAX_ITEM_LIST_LENGTH",
                "epochs",
            )
        },
        "backbone_seconds": backbone_seconds,
        "augmenter_seconds": trainer.info["augmenter_seconds"],
        "augmenter_final_loss": trainer.info["augmenter_final_loss"],
        "original": {"valid": trainer.valid_results.get("backbone"), **original},
        "fidelity": {},
        "runs": {},
    }

    fid_users = augmenter_users(sequences, model.m, int(config["augmenter_min_raw"]))
    real = sequences.heads(fid_users, model.m)
    table = model.augmenter.embedding.weight.detach()
    for exclude in (True, False):
        generated, x0_std = generate_from_raw(trainer, sequences, fid_users, exclude=exclude)
        out["fidelity"][f"exclude_{exclude}"] = dict(closeness(generated, real, table), x0_std=x0_std)
        print("fidelity", exclude, out["fidelity"][f"exclude_{exclude}"], flush=True)

    users = model.augmentable_users(sequences, valid, logging.getLogger())
    initial = copy.deepcopy(model.final.state_dict())
    for exclude in (True, False):
        config["exclude_history"] = exclude
        prefix, generation_seconds = model.generate(sequences, users)
        name, root = trainer.write_dataset(train.dataset, prefix, users)
        model.final.load_state_dict(initial)
        start = time.perf_counter()
        _, valid_result = trainer.train_on_augmented(name, root, train.dataset, verbose=False)
        out["runs"][f"exclude_{exclude}"] = {
            "generation_seconds": generation_seconds,
            "backbone_seconds": time.perf_counter() - start,
            "prefix": prefix_stats(sequences, users, prefix, model.n_items),
            "valid": {k: float(v) for k, v in valid_result.items()},
            **test_results(trainer, test),
        }
        print(exclude, out["runs"][f"exclude_{exclude}"], flush=True)
    report(out, args.out)


if __name__ == "__main__":
    main()
