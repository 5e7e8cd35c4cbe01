"""DiffuASR's samplers compared in one run: the 1000-step ancestral loop (the paper) vs DDIM at 100 and 50 steps,
each generating from the same trained augmenter for the same users, each written as its own dataset and used to
train the backbone from the same initial weights. Reports generation users/s, the speed-up over ancestral and
the test metrics of the backbone trained on each augmented dataset, beside the backbone on the original data.

The backbone (original data) and the augmenter are trained once, so a seed costs one backbone, one augmenter,
three generations and three backbones on augmented data, where three bench cells would train three of each.

    python benchmarks/diffuasr_samplers.py --dataset ml-100k --preset properties/bench/diffuasr_ml-100k.yaml \
        [--guide cg] [--seed 2020] [--key=value ...] [--out results.json]
"""

import argparse
import copy
import logging
import os
import time

from common import build, report

SAMPLERS = (("ancestral", None), ("ddim", 100), ("ddim", 50))


def overrides(args, extra):
    from recbole_diff.benchmark import load_grid
    from recbole_diff.runtime import parse_key_values

    keys = {}
    if args.preset:
        spec = load_grid(args.preset)
        keys.update(spec["config"], **spec["dataset_config"].get(args.dataset, {}))
    keys.update(parse_key_values(extra))  # --key=value, read as the CLI reads them
    work = args.work or os.path.abspath(f"saved/diffuasr_samplers-{time.strftime('%Y%m%d-%H%M%S')}")
    keys.update(guide=args.guide, seed=args.seed, checkpoint_dir=work)
    return keys


def test_results(trainer, test):
    from recbole_diff.quick_start import extra_mode_results

    out = {"test_result": trainer.evaluate(test, load_best_model=False)}
    out.update(extra_mode_results(trainer.config, trainer))
    return {name: {k: float(v) for k, v in result.items()} for name, result in out.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument(
        "--preset", default=None, help="take the shared keys of a bench preset (e.g. the DiffuASR grid)"
    )
    parser.add_argument("--guide", default="cg")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--work", default=None, help="checkpoints and augmented datasets (default: a new folder)")
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()

    from recbole_diff import get_trainer
    from recbole_diff.data.augment import training_sequences

    keys = overrides(args, extra)
    config, model, train, valid, test = build("DiffuASR", args.dataset, backbone=args.backbone, **keys)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    trainer.run_stage("backbone", train, valid, verbose=False, saved=True)
    sequences = training_sequences(train.dataset)
    trainer.run_stage("augmenter", train, valid, verbose=False, saved=False)
    users = model.augmentable_users(sequences, valid, logging.getLogger())
    with model.evaluating("backbone"):
        out = {
            "dataset": args.dataset,
            "backbone": args.backbone,
            "guide": args.guide,
            "seed": args.seed,
            "users": len(users),
            "augmenter_seconds": trainer.info["augmenter_seconds"],
            "original": test_results(trainer, test),
            "runs": {},
        }
    initial = copy.deepcopy(model.final.state_dict())  # every augmented backbone starts from the same weights
    for sampler, steps in SAMPLERS:
        config["sampler"], config["sample_steps"] = sampler, steps
        prefix, generation_seconds = model.generate(sequences, users)
        name, root = trainer.write_dataset(train.dataset, prefix, users)
        model.final.load_state_dict(initial)
        trainer.train_on_augmented(name, root, train.dataset, verbose=False)
        label = f"{sampler}{steps or config['diffusion_steps']}"
        out["runs"][label] = {
            "users_per_s": len(users) / generation_seconds,
            "generation_seconds": generation_seconds,
            "dataset": name,
            **test_results(trainer, test),
        }
        print(label, out["runs"][label], flush=True)
    ancestral = out["runs"][f"ancestral{config['diffusion_steps']}"]
    for run in out["runs"].values():
        run["speedup_over_ancestral"] = run["users_per_s"] / ancestral["users_per_s"]
    report(out, args.out)


if __name__ == "__main__":
    main()
