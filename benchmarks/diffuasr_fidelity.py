"""Does DiffuASR's augmenter generate what it was trained to: a user's own first items?

The augmenter learns to produce a user's first M training items (S_aug) from the rest (S_raw). For those users,
this script generates M items from S_raw exactly as in training and compares them with the real S_aug:

* ``overlap``: the share of generated items that are among the user's real first M items;
* ``cosine``: for each generated item, the highest cosine similarity (in the trained backbone's item space) to
  one of the real first M items, averaged;
* ``distinct`` items over all users and ``x0_std``, the scale of the sampled x0 before rounding (the scaled
  table's is 1 with ``x0_scale: unit``).

The same figures for uniform random items and for items drawn by training popularity are the floor a working
augmenter must clear. One backbone and one augmenter per run; ``--key=value`` overrides any key (e.g.
``--x0_scale=raw --clip_x0=False --augmenter_train_steps=~ --augmenter_epochs=100`` for the augmenter before the
scale fix).

    python benchmarks/diffuasr_fidelity.py --dataset ml-100k --preset properties/bench/diffuasr_ml-100k.yaml \
        [--guide cf] [--seed 2020] [--key=value ...] [--out results.json]
"""

import argparse

import torch
import torch.nn.functional as F
from common import build, report
from diffuasr_samplers import overrides


def closeness(generated, real, table):
    """(overlap, mean best cosine) of generated [U, M] items against the real first items [U, M]."""
    overlap = (generated[:, :, None] == real[:, None, :]).any(dim=2).float().mean().item()
    unit = F.normalize(table, dim=-1)
    cos = torch.einsum("umd,und->umn", unit[generated], unit[real]).max(dim=2).values.mean().item()
    return {"overlap": overlap, "cosine": cos, "distinct": int(generated.unique().numel())}


@torch.no_grad()
def generate_from_raw(trainer, sequences, users, batch=256, exclude=False):
    """M items per user from S_raw, guided as configured (``cg`` scores S_raw's first item, the real item right
    after the generated ones), with the sampled x0's scale. ``exclude``: round as ``exclude_history: True`` does
    in generation, skipping the items the user is conditioned on (S_raw here, the whole training part there)
    and repeats."""
    from recbole_diff.data.augment import history_mask

    model, c = trainer.model, trainer.config
    aug = model.augmenter
    generator = torch.Generator().manual_seed(int(c["seed"]))
    out, stds = [], []
    for lo in range(0, len(users), batch):
        b = users[lo : lo + batch]
        flat, offsets = sequences.bags(b, start=model.m)
        cond = aug.condition(flat, offsets)
        log_prob = (
            model.first_item_log_prob(sequences.heads(b, model.m + 1)[:, model.m]) if c["guide"] == "cg" else None
        )
        with torch.enable_grad():
            x0 = aug.sample(
                cond, float(c["guidance_scale"]), c["sampler"], c["sample_steps"], float(c["eta"]), log_prob, generator
            )
        stds.append(x0.std().item())
        out.append(model.round(x0, history_mask(sequences, b, model.n_items, start=model.m) if exclude else None))
    return torch.cat(out), sum(stds) / len(stds)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--backbone", default="SASRec")
    parser.add_argument(
        "--preset", default=None, help="take the shared keys of a bench preset (e.g. the DiffuASR grid)"
    )
    parser.add_argument("--guide", default="cf")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--work", default=None, help="checkpoints (default: a new folder)")
    parser.add_argument("--out", default=None)
    args, extra = parser.parse_known_args()

    from recbole_diff import get_trainer
    from recbole_diff.data.augment import augmenter_users, training_sequences

    keys = overrides(args, extra)
    config, model, train, valid, _ = build("DiffuASR", args.dataset, backbone=args.backbone, **keys)
    trainer = get_trainer(config["MODEL_TYPE"], "DiffuASR")(config, model)
    trainer.run_stage("backbone", train, valid, verbose=False, saved=True)
    sequences = training_sequences(train.dataset)
    trainer.run_stage("augmenter", train, valid, verbose=False, saved=False)
    users = augmenter_users(sequences, model.m, int(config["augmenter_min_raw"]))
    real = sequences.heads(users, model.m)
    table = model.augmenter.embedding.weight.detach()

    generated, x0_std = generate_from_raw(trainer, sequences, users)
    gen = torch.Generator().manual_seed(args.seed)
    uniform = torch.randint(1, model.n_items, real.shape, generator=gen)
    counts = torch.bincount(sequences.bags(torch.arange(len(sequences.lengths)))[0], minlength=model.n_items).float()
    counts[0] = 0
    popular = torch.multinomial(counts, real.numel(), replacement=True, generator=gen).view(real.shape)
    keys_shown = (
        "guide",
        "guidance_scale",
        "M",
        "sampler",
        "sample_steps",
        "x0_scale",
        "clip_x0",
        "augmenter_train_steps",
        "augmenter_epochs",
    )
    out = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "seed": args.seed,
        "users": len(users),
        "config": {k: config[k] for k in keys_shown},
        "augmenter_seconds": trainer.info["augmenter_seconds"],
        "augmenter_final_loss": trainer.info["augmenter_final_loss"],
        "diffusion": dict(closeness(generated, real, table), x0_std=x0_std),
        "uniform": closeness(uniform, real, table),
        "popularity": closeness(popular, real, table),
    }
    report(out, args.out)


if __name__ == "__main__":
    main()
