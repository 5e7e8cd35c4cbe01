"""DiffuASR's data side: each user's training sequence in time order, the augmenter's (S_aug, S_raw) pairs,
the random baselines, cosine rounding, and the writer of the augmented RecBole atomic dataset.

Everything here reads the training split only (see :func:`~recbole_diff.data.interactions.training_interactions`):
validation and test items never reach the augmenter, its condition or its exclusions.
"""

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from recbole_diff.data.interactions import training_interactions


@dataclass
class Sequences:
    """Per-user item sequences in time order as CSR: user u's items are ``items[offsets[u]:offsets[u + 1]]``."""

    offsets: torch.Tensor
    items: torch.Tensor

    @property
    def lengths(self):
        return self.offsets[1:] - self.offsets[:-1]

    def of(self, user):
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def bags(self, users, start=0):
        """(flat items, bag offsets) of the given users' sequences from position ``start`` on, for
        ``F.embedding_bag``."""
        lo = self.offsets[users] + start
        counts = (self.offsets[users + 1] - lo).clamp(min=0)
        idx = torch.repeat_interleave(lo - torch.cumsum(counts, 0) + counts, counts) + torch.arange(int(counts.sum()))
        return self.items[idx], torch.cumsum(counts, 0) - counts

    def heads(self, users, m):
        """[B, m] first m items of each user (all users must have at least m)."""
        return self.items[self.offsets[users][:, None] + torch.arange(m)[None]]


def training_sequences(train_dataset):
    """Each user's training items in time order (ties in row order)."""
    users, items, times = training_interactions(train_dataset, with_time=True)
    key = times if times is not None else np.zeros(len(users))
    order = np.lexsort((np.arange(len(users)), key, users))
    counts = np.bincount(users, minlength=train_dataset.user_num)
    offsets = np.zeros(train_dataset.user_num + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Sequences(torch.from_numpy(offsets), torch.from_numpy(items[order].astype(np.int64)))


def augmenter_users(sequences, m, min_raw):
    """Users whose training sequence is long enough to split into S_aug (first m) and S_raw (>= min_raw)."""
    return torch.nonzero(sequences.lengths >= m + min_raw).flatten()


def history_mask(sequences, users, n_items, start=0):
    """[B, n_items]: True at each user's items from position ``start`` on, and at padding (item 0)."""
    mask = torch.zeros(len(users), n_items, dtype=torch.bool)
    flat, offsets = sequences.bags(users, start=start)
    counts = torch.diff(offsets, append=torch.tensor([len(flat)]))
    rows = torch.repeat_interleave(torch.arange(len(users)), counts)
    mask[rows, flat] = True
    mask[:, 0] = True
    return mask


def round_to_items(x0, item_table, exclude=None):
    """Each generated position -> the item of highest cosine similarity, one matrix product per position (no
    batch x items x d tensor). With ``exclude`` [B, n_items] (the user's history, padding), those items and the
    items already chosen for earlier positions are skipped."""
    table = F.normalize(item_table, dim=-1)
    x0 = F.normalize(x0, dim=-1)
    taken = None if exclude is None else exclude.clone()
    out = torch.empty(x0.shape[:2], dtype=torch.long, device=x0.device)
    best = torch.empty(x0.shape[:2], dtype=x0.dtype, device=x0.device)
    for k in range(x0.shape[1]):
        sims = x0[:, k] @ table.T
        if taken is None:
            sims[:, 0] = float("-inf")
        else:
            sims = sims.masked_fill(taken, float("-inf"))
        best[:, k], out[:, k] = sims.max(dim=1)
        if taken is not None:
            taken[torch.arange(len(out), device=out.device), out[:, k]] = True
    # only exclusion can leave a user without items; read once, not per position (each read stalls a GPU)
    if taken is not None and torch.isinf(best).any():
        k = int(torch.isinf(best).any(0).nonzero()[0])
        raise ValueError(
            f"DiffuASR: a user has no item left for generated position {k + 1}: the catalogue "
            "minus the user's history and the items generated before is empty. Lower M or set "
            "exclude_history: False."
        )
    return out


def random_prefix(users, m, n_items, generator=None, exclude=None):
    """The paper's ``random`` baseline: m distinct uniform items (never the user's own, with ``exclude``)."""
    allowed = torch.ones(len(users), n_items)
    allowed[:, 0] = 0
    if exclude is not None:
        allowed = allowed.masked_fill(exclude, 0)
    return torch.multinomial(allowed, m, replacement=False, generator=generator)


def random_seq_prefix(sequences, users, m, generator=None):
    """The paper's ``random_seq`` baseline: items drawn from the user's own training sequence."""
    lengths = sequences.lengths[users]
    if (lengths == 0).any():
        raise ValueError("random_seq needs every user to have training items.")
    picks = (torch.rand(len(users), m, generator=generator) * lengths[:, None]).long()
    return sequences.items[sequences.offsets[users][:, None] + picks]


# ---- the augmented dataset ---------------------------------------------------------------------------
def augmented_name(
    dataset,
    backbone,
    augmenter,
    m,
    seed,
    guide=None,
    guidance_scale=None,
    sample_steps=None,
    sampler=None,
    settings=None,
):
    """``<dataset>-<augmenter>-<backbone>-M<M>[-<guide>-g<guidance_scale>-<sampler><steps>]-seed<seed>[-<hash>]``: the
    source, M, guidance, steps and seed readable; the augmenter's other settings as a short hash."""
    parts = [dataset, "diffuasr" if augmenter == "diffusion" else augmenter, backbone, f"M{m}"]
    if augmenter == "diffusion":
        parts += [guide, f"g{guidance_scale:g}", f"{sampler}{sample_steps if sample_steps else 'all'}"]
    parts.append(f"seed{seed}")
    if settings:
        parts.append(hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:6])
    return "-".join(parts)


def read_atomic(path):
    """Header fields (``name:type``) and rows of a RecBole atomic file."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        return header, list(reader)


def write_augmented_dataset(
    source_dir, source_name, target_root, target_name, user_tokens, prefix_tokens, uid_field, iid_field, time_field
):
    """A new atomic dataset ``<target_root>/<target_name>/``: the source ``.inter`` rows unchanged, then for each
    given user the M generated items, other columns copied from the user's first real row, with timestamps before
    the user's first real interaction (``first - M * gap``,
    ..., ``first - gap``), so a time-ordered split picks the same validation and test items. Other atomic files
    (``.item``, ``.user``) are copied. An existing target directory is never touched."""
    target = os.path.join(target_root, target_name)
    if os.path.exists(target):
        raise FileExistsError(
            f"Augmented dataset '{target}' already exists and is not overwritten. Delete it, or "
            "change augmented_data_path / the seed to write another one."
        )
    header, rows = read_atomic(os.path.join(source_dir, f"{source_name}.inter"))
    names = [h.split(":")[0] for h in header]
    for field in (uid_field, iid_field, time_field):
        if field not in names:
            raise ValueError(f"{source_name}.inter has no '{field}' column; DiffuASR needs user, item and time.")
    iu, ii, it = names.index(uid_field), names.index(iid_field), names.index(time_field)
    first, first_row = {}, {}
    for row in rows:
        t = float(row[it])
        if row[iu] not in first or t < first[row[iu]]:
            first[row[iu]], first_row[row[iu]] = t, row
    m = len(prefix_tokens[0]) if len(prefix_tokens) else 0
    tmp = f"{target}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    with open(os.path.join(tmp, f"{target_name}.inter"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        for user, items in zip(user_tokens, prefix_tokens):
            if user not in first:
                continue
            # RecBole sorts by float32 time (epoch seconds resolve to ~1 minute): space the pseudo items by two
            # float32 steps so they stay distinct and before the first real interaction after that rounding.
            gap = max(1.0, 2.0 * float(np.spacing(np.float32(abs(first[user]) + 1.0))))
            for k, item in enumerate(items):
                row = list(first_row[user])  # other columns (rating, ...) as the user's first real row
                row[iu], row[ii] = user, item
                t = first[user] - (m - k) * gap
                row[it] = str(int(t)) if float(t).is_integer() else repr(t)
                writer.writerow(row)
    for suffix in ("item", "user"):
        src = os.path.join(source_dir, f"{source_name}.{suffix}")
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(tmp, f"{target_name}.{suffix}"))
    os.makedirs(target_root, exist_ok=True)
    os.rename(tmp, target)  # the dataset appears whole or not at all
    return target
