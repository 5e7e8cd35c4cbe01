"""PDRec's stage 2: every user's TI-DiffRec preferences, reduced to what stage 3 needs.

The authors keep two dense users x items float matrices in GPU memory (one never used) and fill them one user
at a time. Stage 3 only reads, per user: the preference and rank of each training item (HBR), the top-m
non-interacted items (DPA) and the low-preference band that NNS draws fresh negatives from every epoch. Those
are computed chunk by chunk and kept in :class:`PreferenceStore`: O(users x (history + m)) plus each user's NNS
pool, the band's items a run can draw: as many as the user's training rows over ``pool_epochs`` epochs (the
whole band when that is more), uniform without replacement from the band, in random order. Stage 3 walks each
pool in order, so no band item is drawn twice for a user before ``pool_epochs`` epochs (drawing from the whole
band with replacement repeats some), and the store is ~E x rows items instead of one bit per (user, item)
(sports: 8 MB against the band's 78 MB bitmap; the band holds about half of all items).
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

from recbole_diff.device import argsort_descending
from recbole_diff.io import atomic_write

STORE_VERSION = 3
# the pools' random keys are computed from (seed, user, item) by a 31-bit integer hash, not drawn, so they do
# not depend on how users are chunked or on the device
_M31 = (1 << 31) - 1


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
    :class:`TrainingItems` (sorted by user, then item), so ``train_key`` is sorted for lookups. ``pool`` holds
    user u's NNS pool at ``pool[pool_offsets[u]:pool_offsets[u + 1]]`` (items of u's band, distinct, in random
    order); ``band_size`` counts u's band."""

    train_key: torch.Tensor  # [N] user * n_items + item
    train_pref: torch.Tensor  # [N] TI-DiffRec's preference for the item
    train_rank: torch.Tensor  # [N] ascending rank among the user's items / P_u, in (0, 1]
    topm: torch.Tensor  # [U, m] best non-interacted items, by preference
    pool: torch.Tensor  # [P] int32 NNS pools, user after user
    pool_offsets: torch.Tensor  # [U + 1]
    band_size: torch.Tensor  # [U] items in the band
    n_items: int
    meta: dict = field(default_factory=dict)

    TENSORS = ("train_key", "train_pref", "train_rank", "topm", "pool", "pool_offsets", "band_size")

    def nbytes(self):
        return sum(getattr(self, n).element_size() * getattr(self, n).numel() for n in self.TENSORS)

    @property
    def pool_sizes(self):
        return self.pool_offsets[1:] - self.pool_offsets[:-1]

    def lookup(self, users, items):
        """Index of each (user, item) in ``train_*``; a pair that is not a training interaction is an error
        (the store belongs to other data)."""
        key = users.long() * self.n_items + items.long()
        idx = torch.searchsorted(self.train_key, key).clamp(max=len(self.train_key) - 1)
        if not torch.equal(self.train_key[idx], key):
            raise ValueError(
                "PDRec: a training (user, item) pair is missing from the preference store; it was "
                "computed for other data. Delete it or point tidiffrec_checkpoint elsewhere."
            )
        return idx

    def pool_items(self, user):
        """One user's NNS pool, in draw order."""
        return self.pool[int(self.pool_offsets[user]) : int(self.pool_offsets[user + 1])]

    def to(self, device):
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def save(self, path):
        data = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in asdict(self).items()}
        for name in ("topm", "pool"):
            data[name] = _narrow_items(data[name], self.n_items)
        with atomic_write(path) as tmp:
            torch.save(data, tmp)

    @classmethod
    def load(cls, path, device="cpu"):
        data = torch.load(path, map_location=device, weights_only=False)
        if data.get("meta", {}).get("version") != STORE_VERSION or "pool" not in data:
            raise ValueError(
                f"Preference store '{path}' has an older layout (version "
                f"{data.get('meta', {}).get('version')}, this code writes {STORE_VERSION}); "
                "delete it to recompute it."
            )
        data["topm"] = _widen_items(data["topm"]).long()
        data["pool"] = _widen_items(data["pool"])
        return cls(**data)


def _narrow_items(items, n_items):
    """Item ids on disk: 16 bits when every id fits (kept as int16 holding the unsigned value), else int32."""
    items = items.to(torch.int32)
    if n_items > 1 << 16:
        return items
    return torch.where(items >= 1 << 15, items - (1 << 16), items).to(torch.int16)


def _widen_items(items):
    items = items.to(torch.int32)
    return torch.where(items < 0, items + (1 << 16), items)


def draw_pool(store, users, cursor):
    """One NNS negative per row of ``users``: the next unused entries of each user's pool. ``cursor`` [U] counts
    each user's draws so far and is advanced in place; rows of one user in a batch take consecutive entries, so
    a user gets no item twice before its pool wraps. Everything stays on the store's device."""
    order = torch.argsort(users, stable=True)
    occurrence = torch.empty_like(users)
    occurrence[order] = places_in_runs(users[order])
    begin = store.pool_offsets[users]
    size = (store.pool_offsets[users + 1] - begin).clamp(min=1)
    picks = store.pool[begin + (cursor[users] + occurrence) % size]
    cursor.index_add_(0, users, torch.ones_like(users))
    return picks.long()


def _hash31(x):
    """A 31-bit integer mix (int64 tensors, no overflow): decorrelates neighbouring inputs."""
    x = x & _M31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M31
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M31
    return x ^ (x >> 16)


def pool_keys(users, n_items, seed):
    """[B, n_items] random-looking keys of (seed, user, item), the same whatever the chunking or device: the
    pool of a user is its band items with the smallest keys, in key order."""
    items = torch.arange(n_items, device=users.device)
    per_user = _hash31(_hash31(users.long() + _hash31(torch.tensor(seed, device=users.device))) + 0x3C6EF372)
    return _hash31(per_user[:, None] * 0x9E37 + _hash31(items + 0x1B873593)[None, :])


def pool_sizes(band_size, rows, pool_epochs):
    """Items in each user's pool: its draws over ``pool_epochs`` epochs (one per training row), at most the whole
    band, at least one."""
    return torch.minimum(band_size, rows.to(band_size.dtype) * int(pool_epochs)).clamp(min=1)


def check_store_meta(stored, expected, path):
    """Refuse a store made for another dataset, training split, TI-DiffRec or setting, naming what differs."""
    if stored == expected:
        return
    names = {
        "dataset": "dataset",
        "training": "training split",
        "tidiffrec": "TI-DiffRec (its weights)",
        "n_users": "user count",
        "n_items": "item count",
        "rows": "training rows per user",
        "pool_epochs": "nns_pool_epochs",
    }
    diff = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    first = min(diff, key=lambda k: list(names).index(k) if k in names else len(names))  # the most telling
    raise ValueError(
        f"Preference store '{path}' was computed for another {names.get(first, first)} "
        f"({first}: stored {stored.get(first)!r}, this run {expected.get(first)!r}); it is not used or "
        "overwritten. Move it away to recompute it, or point tidiffrec_checkpoint at the model it "
        "was computed from."
    )


def model_fingerprint(model):
    """A short hash of a model's weights: a store computed from other weights is refused."""
    h = hashlib.sha1()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rows_fingerprint(rows):
    return hashlib.sha1(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


def store_meta(dataset_name, training, m, omega_m, tidiffrec, rows=None, pool_epochs=20):
    """What a store depends on (``tidiffrec``: :func:`model_fingerprint` of stage 1; ``rows``: each user's
    training rows, which size the pools); its hash names the file, so other settings never overwrite it. The
    pools' random order comes from this hash, not from the run's seed: cells of any seed that share a TI-DiffRec
    share its store."""
    rows = training.counts if rows is None else rows
    return {
        "version": STORE_VERSION,
        "dataset": str(dataset_name),
        "n_users": training.n_users,
        "n_items": training.n_items,
        "training": training.fingerprint(),
        "m": int(m),
        "omega_m": float(omega_m),
        "tidiffrec": str(tidiffrec),
        "rows": rows_fingerprint(rows),
        "pool_epochs": int(pool_epochs),
    }


def store_path(tidiffrec_checkpoint, meta):
    digest = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:10]
    stem = os.path.splitext(str(tidiffrec_checkpoint))[0]
    return f"{stem}.preferences-{digest}.pt"


def places_in_runs(sorted_keys):
    """0, 1, 2, ... within each run of equal values of a sorted 1-d tensor."""
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    idx = torch.arange(len(sorted_keys), device=sorted_keys.device)
    return idx - torch.cummax(torch.where(starts, idx, 0), 0).values


def ascending_ranks(rows, values):
    """1-based rank of each value among the values of its row (ties in input order)."""
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(rows[order], stable=True)]
    ranks = torch.empty(len(rows), dtype=torch.float32)
    ranks[order] = (places_in_runs(rows[order]) + 1).float()
    return ranks


def nns_band(n_candidates, omega_m):
    """[lo, hi) of the low-preference band among ``n_candidates`` items sorted by preference, best first:
    ``[floor(omega_m * N), ceil(0.99 * N))``, never empty."""
    lo = torch.floor(omega_m * n_candidates.double()).long()
    hi = torch.ceil(0.99 * n_candidates.double()).long()
    lo = torch.minimum(lo, (n_candidates - 1).clamp(min=0))
    return lo, torch.maximum(hi, lo + 1)


@torch.no_grad()
def compute_preference_store(
    preferences,
    training,
    m,
    omega_m,
    batch_size=256,
    device="cpu",
    show_progress=False,
    meta=None,
    rows=None,
    pool_epochs=20,
):
    """Run ``preferences(users) -> [B, n_items]`` over all users in chunks of ``batch_size`` and keep the store.
    ``rows`` [U]: each user's training rows per epoch, which sizes its NNS pool (default: its distinct training
    items). ``batch_size=1`` is the authors' one-user-at-a-time loop (the cost benchmark compares the two)."""
    n_users, n_items = training.n_users, training.n_items
    most = int(training.counts.max()) if n_users else 0
    if m > n_items - 1 - most:
        raise ValueError(
            f"PDRec: dpa_m = {m} exceeds the {n_items - 1 - most} items some user has not interacted with; lower dpa_m."
        )
    rows = training.counts if rows is None else torch.as_tensor(rows, dtype=torch.long)
    if len(rows) != n_users:
        raise ValueError(f"PDRec: rows has {len(rows)} entries for {n_users} users.")
    meta = dict(meta or {})
    seed = int(hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:7], 16)
    prefs, pools, topm = [], [], torch.empty(n_users, m, dtype=torch.long)
    band_size, sizes = torch.empty(n_users, dtype=torch.long), torch.empty(n_users, dtype=torch.long)
    starts = range(0, n_users, batch_size)
    if show_progress:
        starts = tqdm(
            starts, total=math.ceil(n_users / batch_size), ncols=100, desc=set_color("PDRec preferences", "pink")
        )
    for start in starts:
        stop = min(start + batch_size, n_users)
        users = torch.arange(start, stop, device=device)
        scores = preferences(users).float()
        chunk_rows, items = training.chunk(start, stop)
        rows_d, items_d = chunk_rows.to(device), items.to(device)
        prefs.append(scores[rows_d, items_d].cpu())
        interacted = torch.zeros_like(scores, dtype=torch.bool)
        interacted[rows_d, items_d] = True
        interacted[:, 0] = True
        free = scores.masked_fill(interacted, float("-inf"))
        topm[start:stop] = torch.topk(free, m, dim=1).indices.cpu()
        order = argsort_descending(free).to(device)  # the slowest step after TI-DiffRec itself
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_items, device=device).expand_as(order))
        lo, hi = nns_band((n_items - 1 - training.counts[start:stop]).to(device), omega_m)
        # interacted items sort last (-inf), at ranks >= N >= hi: the band never holds one
        in_band = (rank >= lo[:, None]) & (rank < hi[:, None])
        chunk_sizes = pool_sizes(hi - lo, rows[start:stop].to(device), pool_epochs)
        band_size[start:stop], sizes[start:stop] = (hi - lo).cpu(), chunk_sizes.cpu()
        pools.append(_chunk_pools(in_band, users, chunk_sizes, seed))
    pref = torch.cat(prefs) if prefs else torch.empty(0)
    owners = torch.repeat_interleave(torch.arange(n_users), training.counts)
    offsets = torch.zeros(n_users + 1, dtype=torch.long)
    torch.cumsum(sizes, 0, out=offsets[1:])
    return PreferenceStore(
        training.keys(),
        pref,
        ascending_ranks(owners, pref) / training.counts[owners].float(),
        topm,
        torch.cat(pools) if pools else torch.empty(0, dtype=torch.int32),
        offsets,
        band_size,
        n_items,
        meta,
    )


def _chunk_pools(in_band, users, sizes, seed):
    """Each user's pool: its ``sizes`` band items with the smallest :func:`pool_keys`, in key order (a uniform
    sample without replacement, in random order), concatenated user after user."""
    keys = pool_keys(users, in_band.shape[1], seed).masked_fill(~in_band, 1 << 32)
    order = torch.sort(keys, dim=1, stable=True).indices[:, : int(sizes.max())]
    keep = torch.arange(order.shape[1], device=order.device)[None, :] < sizes[:, None]
    return order[keep].to(torch.int32).cpu()


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
