"""PDRec's stage 2: every user's TI-DiffRec preferences, reduced to what stage 3 needs.

The authors keep two dense users x items float matrices in GPU memory (one never used) and fill them one user
at a time. Stage 3 only reads, per user: the preference and rank of each training item (HBR), the top-m
non-interacted items (DPA) and the low-preference band that NNS draws fresh negatives from every epoch. Those
are computed chunk by chunk and kept in :class:`PreferenceStore`: O(users x (history + m)) plus the band as one
bit per (user, item), 1/32 of a dense float matrix (the band's items as int32 would take 16x the bits: the
band holds about half of all items).
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

STORE_VERSION = 2


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
    :class:`TrainingItems` (sorted by user, then item), so ``train_key`` is sorted for lookups. ``band`` is each
    user's NNS band as a bitmap (bit ``i % 8`` of byte ``i // 8`` for item i); ``band_size`` counts its items
    and ``reserve`` is one of them (the best-preferred), the fallback that keeps a draw inside the band."""

    train_key: torch.Tensor  # [N] user * n_items + item
    train_pref: torch.Tensor  # [N] TI-DiffRec's preference for the item
    train_rank: torch.Tensor  # [N] ascending rank among the user's items / P_u, in (0, 1]
    topm: torch.Tensor  # [U, m] best non-interacted items, by preference
    band: torch.Tensor  # [U, ceil(n_items / 8)] uint8 bitmap of the low-preference band
    band_size: torch.Tensor  # [U] items in the band
    reserve: torch.Tensor  # [U] one item of the band
    n_items: int
    meta: dict = field(default_factory=dict)

    TENSORS = ("train_key", "train_pref", "train_rank", "topm", "band", "band_size", "reserve")

    def nbytes(self):
        return sum(getattr(self, n).element_size() * getattr(self, n).numel() for n in self.TENSORS)

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

    def in_band(self, users, items):
        """Whether each item (shape [B] or [B, k]) is in its user's band (users [B])."""
        rows = users if items.dim() == 1 else users[:, None]
        byte = self.band[rows, items >> 3]
        return ((byte >> (items & 7).to(torch.uint8)) & 1).bool()

    def band_items(self, user):
        """The band of one user as a sorted item tensor (for checks; stage 3 draws with :func:`draw_band`)."""
        bits = (self.band[user][:, None] >> torch.arange(8, dtype=torch.uint8, device=self.band.device)) & 1
        return torch.nonzero(bits.flatten()).flatten()

    def rounds(self, miss=1e-6, most=4096):
        """Proposals per NNS draw so that a draw falls back to ``reserve`` with probability <= ``miss`` for the
        user with the smallest band (each proposal is a uniform item; at most ``most``)."""
        share = float(self.band_size.min()) / max(self.n_items - 1, 1)
        if share >= 1:
            return 1
        return int(min(most, max(1, math.ceil(math.log(miss) / math.log1p(-share)))))

    def to(self, device):
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def save(self, path):
        data = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in asdict(self).items()}
        data["topm"] = data["topm"].int()  # item ids fit int32; halves the file
        with atomic_write(path) as tmp:
            torch.save(data, tmp)

    @classmethod
    def load(cls, path, device="cpu"):
        data = torch.load(path, map_location=device, weights_only=False)
        if data.get("meta", {}).get("version") != STORE_VERSION or "band" not in data:
            raise ValueError(
                f"Preference store '{path}' has an older layout (version "
                f"{data.get('meta', {}).get('version')}, this code writes {STORE_VERSION}); "
                "delete it to recompute it."
            )
        data["topm"] = data["topm"].long()
        return cls(**data)


def draw_band(store, users, rounds):
    """One fresh NNS negative per user in ``users``, uniform over the user's band, drawn on the store's device
    without leaving it: ``rounds`` uniform proposals per user, the first that lands in the band is kept (so
    it is uniform over the band); when none does (rarely, see :meth:`PreferenceStore.rounds`), the user's
    ``reserve`` band item."""
    proposals = torch.randint(1, store.n_items, (len(users), rounds), device=users.device)
    hit = store.in_band(users, proposals)
    first = hit.to(torch.uint8).argmax(1, keepdim=True)
    picks = proposals.gather(1, first).squeeze(1)
    return torch.where(hit.any(1), picks, store.reserve[users])


def pack_bits(mask):
    """[B, n] bool -> [B, ceil(n / 8)] uint8, item i at bit i % 8 of byte i // 8."""
    pad = (-mask.shape[1]) % 8
    mask = torch.nn.functional.pad(mask, (0, pad)).view(mask.shape[0], -1, 8).to(torch.uint8)
    weights = (2 ** torch.arange(8, device=mask.device)).to(torch.uint8)
    return (mask * weights).sum(-1, dtype=torch.uint8)


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
    }
    diff = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    first = sorted(diff, key=lambda k: k not in names)[0]
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


def store_meta(dataset_name, training, m, omega_m, tidiffrec):
    """What a store depends on (``tidiffrec``: :func:`model_fingerprint` of stage 1); its hash names the file,
    so other settings never overwrite it. The store draws nothing at random: no seed."""
    return {
        "version": STORE_VERSION,
        "dataset": str(dataset_name),
        "n_users": training.n_users,
        "n_items": training.n_items,
        "training": training.fingerprint(),
        "m": int(m),
        "omega_m": float(omega_m),
        "tidiffrec": str(tidiffrec),
    }


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
def compute_preference_store(
    preferences, training, m, omega_m, batch_size=256, device="cpu", show_progress=False, meta=None
):
    """Run ``preferences(users) -> [B, n_items]`` over all users in chunks of ``batch_size`` and keep the store.
    ``batch_size=1`` is the authors' one-user-at-a-time loop (the cost benchmark compares the two)."""
    n_users, n_items = training.n_users, training.n_items
    most = int(training.counts.max()) if n_users else 0
    if m > n_items - 1 - most:
        raise ValueError(
            f"PDRec: dpa_m = {m} exceeds the {n_items - 1 - most} items some user has not interacted with; lower dpa_m."
        )
    prefs, topm = [], torch.empty(n_users, m, dtype=torch.long)
    band = torch.empty(n_users, (n_items + 7) // 8, dtype=torch.uint8)
    band_size, reserve = torch.empty(n_users, dtype=torch.long), torch.empty(n_users, dtype=torch.long)
    starts = range(0, n_users, batch_size)
    if show_progress:
        starts = tqdm(
            starts, total=math.ceil(n_users / batch_size), ncols=100, desc=set_color("PDRec preferences", "pink")
        )
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
        order = argsort_descending(free).to(device)  # the slowest step after TI-DiffRec itself
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n_items, device=device).expand_as(order))
        lo, hi = nns_band((n_items - 1 - training.counts[start:stop]).to(device), omega_m)
        # interacted items sort last (-inf), at ranks >= N >= hi: the band never holds one
        in_band = (rank >= lo[:, None]) & (rank < hi[:, None])
        band[start:stop] = pack_bits(in_band).cpu()
        band_size[start:stop] = (hi - lo).cpu()
        reserve[start:stop] = order.gather(1, lo[:, None]).squeeze(1).cpu()
    pref = torch.cat(prefs) if prefs else torch.empty(0)
    owners = torch.repeat_interleave(torch.arange(n_users), training.counts)
    return PreferenceStore(
        training.keys(),
        pref,
        ascending_ranks(owners, pref) / training.counts[owners].float(),
        topm,
        band,
        band_size,
        reserve,
        n_items,
        dict(meta or {}),
    )


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
