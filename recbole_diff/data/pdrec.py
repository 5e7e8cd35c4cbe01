"""PDRec's stage 2: every user's TI-DiffRec preferences, reduced to what stage 3 needs.

The authors keep two dense users x items float matrices in GPU memory (one never used) and fill them one user
at a time. Stage 3 only reads, per user: the preference and rank of each training item (HBR), the top-m
non-interacted items (DPA) and negatives from the low-preference band (NNS). Those are computed chunk by chunk
and kept in :class:`PreferenceStore`, O(users x (history + m + pool)) memory.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from recbole.utils import set_color
from tqdm import tqdm

from recbole_diff.utils import argsort_descending

STORE_VERSION = 1


@dataclass
class TrainingItems:
    """Each user's distinct training items as CSR (``offsets`` [U + 1], ``items`` [N]); item 0 is padding."""

    n_users: int
    n_items: int
    offsets: torch.Tensor
    items: torch.Tensor

    @classmethod
    def from_pairs(cls, users, items, n_users, n_items):
        key = np.unique(np.asarray(users, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64))
        u, i = key // n_items, key % n_items
        offsets = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(u, minlength=n_users), out=offsets[1:])
        return cls(n_users, n_items, torch.from_numpy(offsets), torch.from_numpy(i))

    @property
    def counts(self):
        return self.offsets[1:] - self.offsets[:-1]

    def keys(self):
        users = torch.repeat_interleave(torch.arange(self.n_users), self.counts)
        return users * self.n_items + self.items

    def fingerprint(self):
        return hashlib.sha1(self.keys().numpy().tobytes()).hexdigest()[:16]

    def chunk(self, start, stop):
        """(row in chunk, item) of the training items of users start..stop-1."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        rows = torch.repeat_interleave(torch.arange(stop - start), self.counts[start:stop])
        return rows, self.items[lo:hi]


@dataclass
class PreferenceStore:
    """Stage 3's view of the preferences. Entry k of ``train_*`` belongs to the k-th (user, item) of
    :class:`TrainingItems` (sorted by user, then item), so ``train_key`` is sorted for lookups."""

    train_key: torch.Tensor   # [N] user * n_items + item
    train_pref: torch.Tensor  # [N] TI-DiffRec's preference for the item
    train_rank: torch.Tensor  # [N] ascending rank among the user's items / P_u, in (0, 1]
    topm: torch.Tensor        # [U, m] best non-interacted items, by preference
    pool: torch.Tensor        # [U, pool] negatives from the low-preference band
    n_items: int
    meta: dict = field(default_factory=dict)

    def nbytes(self):
        tensors = (self.train_key, self.train_pref, self.train_rank, self.topm, self.pool)
        return sum(t.element_size() * t.numel() for t in tensors)

    def lookup(self, users, items):
        """Index of each (user, item) in ``train_*``; a pair that is not a training interaction is an error
        (the store belongs to other data)."""
        key = users.long() * self.n_items + items.long()
        idx = torch.searchsorted(self.train_key, key).clamp(max=len(self.train_key) - 1)
        if not torch.equal(self.train_key[idx], key):
            raise ValueError("PDRec: a training (user, item) pair is missing from the preference store; it was "
                             "computed for other data. Delete it or point tidiffrec_checkpoint elsewhere.")
        return idx

    def to(self, device):
        for name in ("train_key", "train_pref", "train_rank", "topm", "pool"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def save(self, path):
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in asdict(self).items()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device="cpu"):
        data = torch.load(path, map_location=device, weights_only=False)
        return cls(**data)


def store_meta(dataset_name, training, m, pool_size, omega_m, seed, tidiffrec_checkpoint):
    """What a store depends on; its hash names the file, so other settings never overwrite it."""
    return {"version": STORE_VERSION, "dataset": str(dataset_name), "n_users": training.n_users,
            "n_items": training.n_items, "training": training.fingerprint(), "m": int(m),
            "pool_size": int(pool_size), "omega_m": float(omega_m), "seed": int(seed),
            "tidiffrec_checkpoint": os.path.basename(str(tidiffrec_checkpoint))}


def store_path(tidiffrec_checkpoint, meta):
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    stem = os.path.splitext(str(tidiffrec_checkpoint))[0]
    return f"{stem}.preferences-{digest}.pt"


def ascending_ranks(rows, values):
    """1-based rank of each value among the values of its row (ties in input order)."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    sorted_rows = rows[order]
    starts = torch.ones_like(sorted_rows, dtype=torch.bool)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    first = torch.cummax(torch.where(starts, torch.arange(len(rows)), 0), 0).values
    ranks = torch.empty(len(rows), dtype=torch.float32)
    ranks[order] = (torch.arange(len(rows)) - first + 1).float()
    return ranks


def nns_band(n_candidates, omega_m):
    """[lo, hi) of the low-preference band among ``n_candidates`` items sorted by preference, best first:
    ``[floor(omega_m * N), ceil(0.99 * N))``, never empty."""
    lo = torch.floor(omega_m * n_candidates.double()).long()
    hi = torch.ceil(0.99 * n_candidates.double()).long()
    lo = torch.minimum(lo, (n_candidates - 1).clamp(min=0))
    return lo, torch.maximum(hi, lo + 1)


@torch.no_grad()
def compute_preference_store(preferences, training, m, pool_size, omega_m, batch_size=256, device="cpu",
                             generator=None, show_progress=False, meta=None):
    """Run ``preferences(users) -> [B, n_items]`` over all users in chunks of ``batch_size`` and keep the store.
    ``batch_size=1`` is the authors' one-user-at-a-time loop (the cost benchmark compares the two)."""
    n_users, n_items = training.n_users, training.n_items
    most = int(training.counts.max()) if n_users else 0
    if m > n_items - 1 - most:
        raise ValueError(f"PDRec: dpa_m = {m} exceeds the {n_items - 1 - most} items some user has not interacted "
                         "with; lower dpa_m.")
    prefs, topm, pool = [], torch.empty(n_users, m, dtype=torch.long), torch.empty(n_users, pool_size, dtype=torch.long)
    starts = range(0, n_users, batch_size)
    if show_progress:
        starts = tqdm(starts, total=math.ceil(n_users / batch_size), ncols=100,
                      desc=set_color("PDRec preferences", "pink"))
    for start in starts:
        stop = min(start + batch_size, n_users)
        users = torch.arange(start, stop, device=device)
        scores = preferences(users).float()
        rows, items = training.chunk(start, stop)
        rows_d, items_d = rows.to(device), items.to(device)
        prefs.append(scores[rows_d, items_d].cpu())
        interacted = torch.zeros_like(scores, dtype=torch.bool)
        interacted[rows_d, items_d] = True
        interacted[:, 0] = True
        free = scores.masked_fill(interacted, float("-inf"))
        topm[start:stop] = torch.topk(free, m, dim=1).indices.cpu()
        order = argsort_descending(free)  # the slowest step after TI-DiffRec itself
        lo, hi = nns_band((n_items - 1 - training.counts[start:stop]).to(device), omega_m)
        u = torch.rand(stop - start, pool_size, generator=generator, device=device)
        picks = lo[:, None] + (u * (hi - lo)[:, None]).long()
        pool[start:stop] = order.gather(1, picks).cpu()
    pref = torch.cat(prefs) if prefs else torch.empty(0)
    owners = torch.repeat_interleave(torch.arange(n_users), training.counts)
    return PreferenceStore(training.keys(), pref, ascending_ranks(owners, pref) / training.counts[owners].float(),
                           topm, pool, n_items, dict(meta or {}))


def hbr_weights(store, omega_r, c_w, omega_f):
    """HBR's weight of every training (user, item): preferences min-max normalised over the user's items and
    rescaled to mean 1, mixed with the ascending rank ``r / P_u`` by ``omega_r``, clamped to [0, c_w], times
    ``omega_f`` (what the authors' code computes). A user whose items all have one preference gets s = 1."""
    users = store.train_key // store.n_items
    n = int(users.max()) + 1 if len(users) else 0
    pref = store.train_pref.double()
    low = torch.full((n,), float("inf"), dtype=pref.dtype).scatter_reduce(0, users, pref, "amin")
    high = torch.full((n,), float("-inf"), dtype=pref.dtype).scatter_reduce(0, users, pref, "amax")
    span = (high - low)[users]
    s = torch.where(span > 0, (pref - low[users]) / span.clamp(min=1e-300), torch.ones_like(pref))
    total = torch.zeros(n, dtype=pref.dtype).index_add_(0, users, s)
    count = torch.zeros(n, dtype=pref.dtype).index_add_(0, users, torch.ones_like(s))
    mean = (total / count.clamp(min=1))[users]
    s = torch.where(mean > 0, s / mean.clamp(min=1e-300), torch.ones_like(s))
    w = (1 - omega_r) * s + omega_r * store.train_rank.double()
    return (w.clamp(0, c_w) * omega_f).float()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
