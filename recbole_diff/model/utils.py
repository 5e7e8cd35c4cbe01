"""Helpers our models share: config checks, seeded randomness for evaluation, and sampled scores read off a full
sort."""

import contextlib

import numpy as np
import torch

from recbole_diff.device import host_fast_path


def require_keys(config, keys, model_name):
    """RecBole's Config returns None for a missing key; fail early and name the key instead."""
    missing = [k for k in keys if config[k] is None]
    if missing:
        raise KeyError(
            f"{model_name} needs the config key(s) {', '.join(missing)}; set them in a yaml passed with "
            f"--config_files or on the command line (--{missing[0]}=...)."
        )


@contextlib.contextmanager
def seeded_numpy(seed):
    """numpy's global generator seeded inside the block and restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def eval_generator(seed, interaction, user_field, device):
    """Noise for inference, seeded by the run's seed and the batch's first user: evaluation is reproducible
    run to run and does not depend on how much random state training consumed. Off the CPU the user is not read
    (a device-to-host copy per batch): every batch's noise starts from the run's seed, still reproducible."""
    users = interaction.interaction.get(user_field)
    first = int(users[0]) if users is not None and host_fast_path(users) else 0
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 1_000_003 + first)
    return generator


def predict_from_full_sort(model, interaction, full_sort):
    """``predict`` for sampled evaluation from a full-sort scorer: RecBole repeats each user once per candidate
    item, so the scorer runs once per distinct (sequence, length, user) and each row reads its item's score."""
    seq, lens = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    users = interaction[model.USER_ID] if model.USER_ID in interaction.interaction else None
    key = [seq, lens[:, None]] + ([users[:, None]] if users is not None else [])
    unique, inverse = torch.unique(torch.cat(key, dim=1), dim=0, return_inverse=True)
    # rows in the order they first appear, as a full sort of the batch's own rows sees them: a model that draws
    # noise row by row then gives each user the same noise in predict as in full_sort_predict
    first = torch.full((len(unique),), len(inverse), dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    unique, inverse = unique[order], rank[inverse]
    width = seq.shape[1]
    sub = {model.ITEM_SEQ: unique[:, :width], model.ITEM_SEQ_LEN: unique[:, width]}
    if users is not None:
        sub[model.USER_ID] = unique[:, width + 1]
    scores = full_sort(type(interaction)(sub))[inverse]
    return scores.gather(1, interaction[model.ITEM_ID][:, None]).squeeze(1)
