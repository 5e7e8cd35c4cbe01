"""How well does DiffuASR's augmenter learn its eps prediction? Its loss against a bound any working network beats.

Trains the augmenter for ``--steps`` optimiser steps (the backbone as configured, e.g. loaded with
``--backbone_checkpoint=...``), then measures the eps loss over the augmenter's users (10 passes, fixed seed),
overall and per tenth of the 1000 steps, beside ``gaussian_prior_bound``: the loss of the best linear guess
that treats x0 as unit Gaussian noise (eps_hat = sqrt(1 - abar_t) x_t, error abar_t, averaged over t). At large
t x_t is nearly eps, so a working network's loss there is near 0; a network that cannot pass its input through
(e.g. a first SU-Net width below M) stays far above it.

    python benchmarks/diffuasr_augmenter_loss.py --dataset ml-100k --preset properties/bench/diffuasr_ml-100k.yaml \
        --steps 1000 [--unet_channels=[16,16,16,16]] [--key=value ...] [--out results.json]
"""

import argparse
import time

import torch
from common import build, report
from diffuasr_samplers import overrides


@torch.no_grad()
def eps_loss(aug, sequences, users, m, passes=10, batch=512):
    torch.manual_seed(0)
    steps = aug.diffusion.num_steps
    by_t, count = torch.zeros(10), torch.zeros(10)
    for _ in range(passes):
        for lo in range(0, len(users), batch):
            b = users[lo : lo + batch]
            flat, offsets = sequences.bags(b, start=m)
            x0, c = aug.embed(sequences.heads(b, m)), aug.condition(flat, offsets)
            t = torch.randint(steps, (len(x0),))
            noise = torch.randn_like(x0)
            err = ((aug.sunet(aug.diffusion.q_sample(x0, t, noise), t, c) - noise) ** 2).mean(dim=(1, 2))
            tenth = t * 10 // steps
            by_t.index_add_(0, tenth, err)
            count.index_add_(0, tenth, torch.ones_like(err))
    return (by_t.sum() / count.sum()).item(), (by_t / count).tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--guide", default="cf")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()

    from recbole_diff import get_trainer
    from recbole_diff.data.augment import augmenter_users, training_sequences

    keys = dict(overrides(args, extra), augmenter_train_steps=args.steps)
    config, model, train, valid, _ = build("DiffuASR", args.dataset, backbone=args.backbone, **keys)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    trainer.run_stage("backbone", train, valid, verbose=False, saved=True)
    sequences = training_sequences(train.dataset)
    start = time.perf_counter()
    trainer.run_stage("augmenter", train, valid, verbose=False, saved=False)
    seconds = time.perf_counter() - start
    aug = model.augmenter.eval()
    users = augmenter_users(sequences, model.m, int(config["augmenter_min_raw"]))
    loss, by_tenth = eps_loss(aug, sequences, users, model.m)
    bound = aug.diffusion.alphas_cumprod.mean().item()
    report(
        {
            "dataset": args.dataset,
            "unet_channels": list(config["unet_channels"]),
            "M": model.m,
            "steps": args.steps,
            "seconds_per_step": seconds / args.steps,
            "final_train_loss": trainer.info["augmenter_final_loss"],
            "eps_loss": loss,
            "eps_loss_per_tenth_of_t": by_tenth,
            "gaussian_prior_bound": bound,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
