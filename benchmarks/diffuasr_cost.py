"""DiffuASR's generation cost in one run: users/s of the full 1000-step ancestral loop (the paper) vs DDIM with
50 and 100 steps, for classifier guidance (a backbone forward and backward per step) and classifier-free
guidance (a doubled batch per step), on the same users with the same trained augmenter.

    python benchmarks/diffuasr_cost.py --dataset ml-100k [--users 256] [--augmenter-epochs 20]

Quality per sampler comes from full pipeline runs (see properties/bench/diffuasr_*.yaml).
"""

import argparse
import time

import torch
from common import build, report

from recbole_diff import get_trainer
from recbole_diff.data.augment import training_sequences


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--augmenter-epochs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    out = {"dataset": args.dataset, "users": args.users, "threads": torch.get_num_threads(), "runs": {}}
    for guide in ("cg", "cf"):
        config, model, train, valid, _ = build(
            "DiffuASR",
            args.dataset,
            backbone=args.backbone,
            guide=guide,
            MAX_ITEM_LIST_LENGTH=50,
            augmenter_epochs=args.augmenter_epochs,
            augmenter_train_steps=None,
        )
        trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
        model.freeze_backbone()  # an untrained backbone costs the same as a trained one
        out["config"] = {
            k: config[k]
            for k in (
                "M",
                "diffusion_embedding_size",
                "unet_channels",
                "unet_res_blocks",
                "x0_scale",
                "diffusion_steps",
                "generation_batch_size",
            )
        }
        seqs = training_sequences(train.dataset)
        start = time.perf_counter()
        trainer.run_stage("augmenter", train, valid, verbose=False, saved=False)
        out[f"augmenter_{guide}_seconds_per_epoch"] = (time.perf_counter() - start) / args.augmenter_epochs
        users = torch.nonzero(seqs.lengths > 0).flatten()[: args.users]
        for sampler, steps in (("ancestral", None), ("ddim", 100), ("ddim", 50)):
            config["sampler"], config["sample_steps"] = sampler, steps
            _, seconds = model.generate(seqs, users)
            name = f"{guide}-{sampler}{steps or 1000}"
            out["runs"][name] = {"users_per_s": len(users) / seconds, "seconds": seconds}
            print(name, out["runs"][name], flush=True)
        full = out["runs"][f"{guide}-ancestral1000"]["users_per_s"]
        for steps in (100, 50):
            out[f"{guide}_ddim{steps}_speedup"] = out["runs"][f"{guide}-ddim{steps}"]["users_per_s"] / full
    report(out, args.out)


if __name__ == "__main__":
    main()
