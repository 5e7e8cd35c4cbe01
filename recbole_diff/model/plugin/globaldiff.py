r"""GlobalDiff (AAAI 2025): a diffusion model over all items, stacked on a frozen sequential backbone.

Training (after the backbone is trained or loaded, then frozen): for a user's training sequence a position i
is masked; the target is a Bernoulli draw of the masked item's row of the item-item cosine similarity, with
the other items of the sequence boosted by their distance to i (``zeta``, ``delta``). An approximator
``f(x_t, t, c)`` learns to restore that x0 (MSE), conditioned on the backbone's states ``c = [h_i, mean h]``.

Inference: the backbone's softmax ``y`` is taken as the diffusion state at step ``start_step``, noised on to
the last step, denoised to ``x0_hat``, and the two are fused by a Borda count with ``gamma``.
See ``docs/globaldiff.md`` for every key and for where this differs from the authors' code.
"""

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from recbole.utils import InputType

from recbole_diff.data.globaldiff import (
    SIMILARITY_WINDOWS,
    ItemSimilarity,
    UserSequenceLoader,
    bernoulli_targets,
    reweighted_targets,
    sample_mask_positions,
    training_pairs,
    user_sequences,
    window_pairs,
)
from recbole_diff.device import argsort_descending, host_fast_path
from recbole_diff.diffusion import GaussianDiffusion, make_step_sampler
from recbole_diff.model.plugin.approximators import GlobalApproximator
from recbole_diff.model.plugin.base import PluginRecommender, Stage
from recbole_diff.model.utils import eval_generator, predict_from_full_sort, require_keys

GUIDANCE = ("full", "target", "none")
EVAL_MODES = ("ensemble", "backbone", "diffusion_only")


def descending_order(v, zero_ties=False):
    """Per row, the item indices from the largest value to the smallest, equal values in index order.

    On CPU torch's stable sort is the slowest step of the ensemble (3x the backbone's whole forward on ml-100k),
    and numpy's quicksort is about 4x faster; it is unstable, so rows with tied values are put in index order
    within each run of equal values afterwards. Tied zeros are left as they fall unless ``zero_ties``: their
    Borda score is 0 whatever their places."""
    if v.device.type != "cpu":
        return torch.argsort(v, dim=1, descending=True, stable=True)
    order = argsort_descending(v)
    ordered = v.gather(1, order)
    same = ordered[:, 1:] == ordered[:, :-1]
    tied = (same if zero_ties else same & (ordered[:, 1:] != 0)).any(dim=1)
    if tied.any():
        order[tied] = _index_order_within_runs(ordered[tied].numpy(), order[tied].numpy())
    return order


def _index_order_within_runs(ordered, order):
    """``order`` with each run of equal values in ``ordered`` sorted by item index: one integer sort of the key
    (run number, index), 3x faster than a stable float sort of the row."""
    n = ordered.shape[1]
    key = np.zeros(ordered.shape, dtype=np.int64)
    np.cumsum(ordered[:, 1:] != ordered[:, :-1], axis=1, out=key[:, 1:])
    key *= n
    key += order
    key.sort(axis=1)
    return torch.from_numpy(key % n)


def descending_places(v, zero_ties=False):
    """Per row, each item's place counted from the bottom: the largest value gets M, the next M - 1, ... (ties
    in index order, as ``descending_order``)."""
    places = torch.empty_like(v)
    m = v.shape[1]
    places.scatter_(
        1, descending_order(v, zero_ties), torch.arange(m, 0, -1, device=v.device, dtype=v.dtype).expand_as(v)
    )
    return places


def borda_fuse(y, x0, gamma):
    """``gamma * r(y) * y + (1 - gamma) * r(x0) * x0`` with r the rank (best item M, next M - 1, ...; ties in
    index order). Computed in float64 so that gamma = 1 keeps the backbone's order down to the tail."""

    def ranked(v):
        v = v.double()
        return descending_places(v) * v

    if gamma == 1:
        return ranked(y)
    if gamma == 0:
        return ranked(x0)
    return gamma * ranked(y) + (1 - gamma) * ranked(x0)


def softmax_distribution(x0_hat, exclude=None):
    """``x0_norm: softmax``: the softmax of x0_hat, the ``exclude``d items at 0."""
    if exclude is not None:
        x0_hat = x0_hat.masked_fill(exclude, float("-inf"))
    return torch.softmax(x0_hat, dim=-1)


def l1_distribution(x0_hat, exclude=None):
    """``x0_norm: l1``: x0_hat clipped at 0 and divided by its sum, the ``exclude``d items at 0."""
    x = x0_hat.clamp(min=0)
    if exclude is not None:
        x = x.masked_fill(exclude, 0.0)
    return x / x.sum(dim=-1, keepdim=True).clamp(min=1e-12)


X0_NORMS = {"softmax": softmax_distribution, "l1": l1_distribution}


# Place bounds from a histogram of each row: a value's bucket is its float64 bit pattern shifted right, which
# is monotone in the value for v >= 0, so an item's place among the row's items lies between the count of items
# in higher buckets and that count plus its bucket's. PLACE_BITS mantissa bits give buckets 0.4% wide; the
# PLACE_BUCKETS below the row's largest value cover 16 octaves, and everything smaller shares the last one
# (such items score too little to matter).
PLACE_BITS = 8
PLACE_BUCKETS = 16 << PLACE_BITS


# The top-k fusion's work grows with the candidates (c) and a sort's with the items (M): on one CPU thread the
# fusion is faster from about M = 50 c on (c = 50: slower at M = 1,683, 2.5x faster at 4,000, 4.8x at 18,358).
FUSION_ITEMS_PER_CANDIDATE = 50


def _bucket_keys(values):
    """Integer keys of float64 ``values``, monotone for values >= 0 (-0.0 falls below every other value)."""
    return values.view(torch.int64) >> (52 - PLACE_BITS)


class PlaceBounds:
    """Each row's histogram of ``v`` (non-negative float64), answering for any value the range of 0-based
    places (descending, ties in any order) an item with that value may hold: O(M) a row instead of a sort."""

    def __init__(self, v):
        key = _bucket_keys(v)
        self.top = key.max(dim=1, keepdim=True).values
        bucket = key.neg_().add_(self.top).clamp_(max=PLACE_BUCKETS - 1)  # in place: [B, M] is the large part
        ones = torch.ones(1, 1, dtype=torch.int32, device=v.device).expand_as(bucket)
        self.counts = torch.zeros(v.shape[0], PLACE_BUCKETS, dtype=torch.int32, device=v.device)
        self.counts.scatter_add_(1, bucket, ones)
        self.above = self.counts.cumsum(1, dtype=torch.int32) - self.counts

    def place_range(self, values):
        """(first, last) 0-based place that items of the row with these ``values`` ([B, n]) may hold."""
        bucket = (self.top - _bucket_keys(values)).clamp_(max=PLACE_BUCKETS - 1)
        first = self.above.gather(1, bucket).long()
        return first, first + self.counts.gather(1, bucket) - 1


def _nonzero_ties(values):
    """Rows of descending ``values`` with two equal non-zero neighbours, whose places a top-k does not give."""
    return ((values[:, 1:] == values[:, :-1]) & (values[:, 1:] != 0)).any(dim=1)


def _candidate_places(v, values, items, top_values, top_items, c):
    """For ``items`` ([B, n], whose ``values`` in v these are): the range (first, last) of their 0-based places
    in ``v``, their place in the list's top c (-1 if not there), and the first place an item outside the top c
    may hold ([B, 1]). Without ties among the list's top c + 1 values its top c places are exact and every other
    item stands below them; elsewhere the histogram's ranges hold."""
    bounds = PlaceBounds(v)
    first, last = bounds.place_range(values)
    first_outside = bounds.place_range(top_values[:, c:])[0]
    exact = ~_nonzero_ties(top_values)[:, None]
    match = items[:, :, None] == top_items[:, None, :c]  # [B, n, c]: cheaper than a [B, M] map for small c
    place = torch.where(match.any(dim=2), match.to(torch.uint8).argmax(dim=2), -1)
    known, below = exact & (place >= 0), exact & (place < 0)
    first = torch.where(known, place, torch.where(below, first.clamp(min=c), first))
    last = torch.where(known, place, last)
    return first, last, place, torch.where(exact, first_outside.clamp(min=c), first_outside)


def fused_topk(y, d, gamma, k, candidates):
    """The best ``k`` items of ``borda_fuse(y, d, gamma)`` without ranking every item, for non-negative y, d.

    The fused score ``gamma * r(y) * y + (1 - gamma) * r(d) * d`` (r = M - place) is, in each list,
    non-increasing down that list's order, so only the union of both lists' top ``candidates`` (c) can reach the
    top k, unless an item outside both beats the bound ``gamma * r * y_(c+1) + (1 - gamma) * r * d_(c+1)`` (r at
    the first place a value y_(c+1) may hold). Each candidate's places are exact inside a top list (when its
    values do not tie) and ranges from a histogram of the row elsewhere (:class:`PlaceBounds`), which give its
    fused score as an interval. A row is certified when its k best candidates by lower bound each stand strictly
    above every upper bound below them; its k items then get their lower bounds, which rank them in the exact
    fused order, and every other item -inf. Rows not certified (near-equal fused scores, ties) get the full
    Borda scores. The bounds are computed with ``borda_fuse``'s own expression (``weight * (r * v)``, then the
    sum) and float rounding is monotone, so they hold as computed: keep the two expressions alike. Returns
    (scores [B, M] float64, certified rows [B] bool)."""
    y, d = y.double(), d.double()
    b, m = y.shape
    c = min(int(candidates), m - 1)
    if k > c:
        return borda_fuse(y, d, gamma), torch.zeros(b, dtype=torch.bool, device=y.device)
    vy, iy = torch.topk(y, c + 1, dim=1)
    vd, idd = torch.topk(d, c + 1, dim=1)
    items = torch.cat([iy[:, :c], idd[:, :c]], dim=1)
    lo = hi = outside = 0.0
    places = []
    for weight, v, top_values, top_items in ((gamma, y, vy, iy), (1 - gamma, d, vd, idd)):
        values = v.gather(1, items)
        first, last, place, first_outside = _candidate_places(v, values, items, top_values, top_items, c)
        lo = lo + weight * ((m - last).to(v.dtype) * values)
        hi = hi + weight * ((m - first).to(v.dtype) * values)
        outside = outside + weight * ((m - first_outside).to(v.dtype) * top_values[:, c:])
        places.append(place)
    dup = torch.zeros_like(items, dtype=torch.bool)
    dup[:, c:] = places[0][:, c:] >= 0  # in both top lists: its copy from y's list stands
    lo, hi = lo.masked_fill(dup, float("-inf")), hi.masked_fill(dup, float("-inf"))
    lo, order = torch.sort(lo, dim=1, descending=True)
    hi, items = hi.gather(1, order), items.gather(1, order)
    below = torch.flip(torch.cummax(torch.flip(hi, [1]), dim=1).values, [1])  # max hi from each place on
    rest = torch.maximum(below[:, 1 : k + 1], outside)
    certified = (lo[:, :k] > rest).all(dim=1)
    scores = torch.full_like(y, float("-inf")).scatter_(1, items[:, :k], lo[:, :k])
    failed = ~certified
    if failed.any():  # rank only the rows that need it
        scores[failed] = borda_fuse(y[failed], d[failed], gamma)
    return scores, certified


class GlobalDiff(PluginRecommender):
    """GlobalDiff plugin; ``--backbone`` picks the RecBole sequential model it is stacked on. Stages: the
    backbone (trained with RecBole's recipe, then frozen), then the diffusion model on it."""

    input_type = InputType.POINTWISE
    EVAL_MODES = EVAL_MODES
    STAGES = (Stage("backbone", "backbone"), Stage("diffusion", "fit", cache=False))

    REQUIRED = (
        "backbone",
        "diffusion_steps",
        "noise_schedule",
        "noise_scale",
        "noise_min",
        "noise_max",
        "step_sampler",
        "approximator",
        "step_embedding_size",
        "guidance",
        "zeta",
        "delta",
        "position_offset",
        "mask_samples",
        "similarity",
        "dense_memory_limit_gb",
        "diffusion_loss",
        "diffusion_epochs",
        "diffusion_stopping_step",
        "diffusion_learning_rate",
        "diffusion_batch_size",
        "diffusion_dropout",
        "sampling_noise",
        "y_form",
        "y_scale",
        "gamma",
        "eval_mode",
        "filter_history",
        "similarity_window",
        "topk_fusion",
        "fusion_candidates",
    )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        require_keys(config, self.REQUIRED, "GlobalDiff")
        self._check_choices(config)
        self.build_backbone(config, dataset)
        self.adapter.require_position_states("GlobalDiff")
        state_dim = self._state_dim()
        self.guidance = config["guidance"]
        cond_dim = {"full": 2 * state_dim, "target": state_dim, "none": 0}[self.guidance]
        hidden = config["approx_hidden"] or state_dim
        self.approximator = GlobalApproximator(
            self.n_items,
            hidden,
            cond_dim,
            config["step_embedding_size"],
            config["approximator"],
            config["diffusion_dropout"],
        )
        steps = int(config["diffusion_steps"])
        self.diffusion = GaussianDiffusion(
            config["noise_schedule"],
            steps,
            parameterization="x0",
            variance="fixed_small",
            noise_scale=config["noise_scale"],
            noise_min=config["noise_min"],
            noise_max=config["noise_max"],
        )
        self.step_sampler = make_step_sampler(config["step_sampler"], steps)
        self.start_step = steps - 1 if config["start_step"] is None else int(config["start_step"])
        if not 0 <= self.start_step < steps:
            raise ValueError(f"start_step must be in [0, {steps - 1}] (a step index), got {self.start_step}.")
        self.sample_steps = config["sample_steps"]
        self.sampling_noise = bool(config["sampling_noise"])
        self.y_form, self.gamma = config["y_form"], float(config["gamma"])
        self.y_scale = config["y_scale"]
        # the typical L2 length of the training x0 (a running mean): the scale of the x0 estimates and of y in
        # the reverse process, so that the schedule's noise is as large against them as it was in training
        self.register_buffer("x0_length", torch.zeros(()))
        # softmax suits cross-entropy logits; an MSE-trained x0_hat lies in about [0, 1] and its softmax is nearly
        # flat, which takes away the diffusion side's Borda vote (docs/globaldiff.md has the validation figures)
        self.x0_norm = config["x0_norm"] or ("l1" if config["diffusion_loss"] == "mse" else "softmax")
        self.fusion_k = self._fusion_k(config)
        self.fusion_candidates = int(config["fusion_candidates"])
        self.fusion_fallbacks = 0  # rows the top-k fusion could not certify (ranked in full instead)
        self.y_topk = int(config["y_topk"] or 50)
        self.hide_target = bool(config["hide_target"])
        self.eval_mode = config["eval_mode"]
        self.filter_history = bool(config["filter_history"])
        self.zeta, self.delta = float(config["zeta"]), float(config["delta"])
        self.position_offset = float(config["position_offset"])
        self.diffusion_loss = config["diffusion_loss"]
        self.eval_seed = int(config["seed"])
        self.similarity = None

    @staticmethod
    def _check_choices(config):
        checks = {
            "guidance": GUIDANCE,
            "eval_mode": EVAL_MODES,
            "diffusion_loss": ("mse", "ce"),
            "y_form": ("softmax", "logits", "topk"),
            "y_scale": ("unit", "raw"),
            "x0_norm": (None, "softmax", "l1"),
            "similarity_window": SIMILARITY_WINDOWS,
            "topk_fusion": (True, False),
        }
        for key, allowed in checks.items():
            if config[key] not in allowed:
                raise ValueError(f"GlobalDiff: {key} must be one of {allowed}, got '{config[key]}'.")
        if not 0.0 <= float(config["gamma"]) <= 1.0:
            raise ValueError(f"GlobalDiff: gamma must be in [0, 1], got {config['gamma']}.")
        if not isinstance(config["fusion_candidates"], int) or config["fusion_candidates"] < 1:
            raise ValueError(
                f"GlobalDiff: fusion_candidates must be a positive integer, got {config['fusion_candidates']!r}."
            )

    @staticmethod
    def _fusion_k(config):
        """The K of the exact top-K fusion in full-sort evaluation: the largest ``topk`` when every metric reads
        only the top of the ranking; None (the whole Borda ranking) otherwise or with ``topk_fusion: False``."""
        if not config["topk_fusion"]:
            return None
        from recbole.evaluator.register import metric_information

        needs = set()
        for metric in config["metrics"]:
            needs.update(metric_information.get(metric.lower(), ["rec.score"]))
        if needs & {"rec.score", "rec.meanrank"}:
            return None
        return max(config["topk"]) if config["topk"] else None

    @torch.no_grad()
    def _state_dim(self):
        seq = torch.ones(1, self.max_seq_length, dtype=torch.long)
        return self.adapter.states(seq, torch.tensor([self.max_seq_length])).shape[-1]

    # ---- stages ----------------------------------------------------------------------------------------
    def stage_parameters(self, name):
        return self.diffusion_parameters()

    def stage_data(self, name, train_data, logger=None):
        return self.build_training_data(train_data, logger)

    def diffusion_parameters(self):
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    @torch.no_grad()
    def condition(self, item_seq, item_seq_len, positions=None):
        """``[h, mean h]`` (``guidance: full``), ``h`` (``target``) or None (``none``).

        Training (``positions`` given) masks position i: a causal backbone's states after i have seen the
        masked item, so its condition is the state that predicts i from the prefix before it (h_{i-1}) and
        the mean over that prefix; a bidirectional backbone with a mask token reads position i with the
        mask in place and averages over the whole sequence. Inference (no positions) predicts the next item:
        the state at the last position and the mean over the sequence."""
        if self.guidance == "none":
            return None
        if positions is None:
            seq, pick, count = self.adapter.eval_input(item_seq, item_seq_len), item_seq_len - 1, item_seq_len
        elif self.adapter.causal:
            seq, pick, count = item_seq, positions - 1, positions
        else:
            seq = item_seq.clone()
            seq[torch.arange(seq.shape[0], device=seq.device), positions] = self.adapter.mask_token
            pick, count = positions, item_seq_len
        return self.condition_from_states(self.adapter.states(seq, item_seq_len), pick, count)

    def condition_from_states(self, states, pick, count):
        if self.guidance == "none":
            return None
        h = states[torch.arange(states.shape[0], device=states.device), pick]
        if self.guidance == "target":
            return h
        keep = torch.arange(states.shape[1], device=states.device)[None] < count[:, None]
        mean = (states * keep[..., None]).sum(1) / count[:, None].clamp(min=1)
        return torch.cat([h, mean], dim=-1)

    # ---- training data -------------------------------------------------------------------------------
    def build_training_data(self, train_data, logger=None):
        """Similarity (from training interactions only) and the per-user sequence loader."""
        dataset = train_data.dataset
        args = (dataset, self.USER_ID, self.ITEM_ID, self.ITEM_SEQ, self.ITEM_SEQ_LEN)
        u, seqs, lens = user_sequences(*args, max_len=self.max_seq_length)
        config = self.config
        if config["similarity_window"] == "last":  # the authors': each user's last MAX_ITEM_LIST_LENGTH items
            users, items = window_pairs(u, seqs, lens)
        else:
            users, items = training_pairs(*args)
        self.similarity = ItemSimilarity(
            users,
            items,
            dataset.user_num,
            dataset.item_num,
            kind=config["similarity"],
            topk=config["similarity_topk"],
            n_clusters=config["n_clusters"],
            dense_limit_gb=config["dense_memory_limit_gb"],
            seed=config["seed"],
            device=self.device,
        )
        keep = lens >= (2 if self.adapter.causal else 1)  # a causal condition needs a prefix
        if logger is not None:
            logger.info(
                f"GlobalDiff: {config['similarity']} similarity of {dataset.item_num} items from "
                f"{len(users)} training interactions (similarity_window: {config['similarity_window']}, "
                f"{self.similarity.nbytes() / 2**20:.1f} MB); {int(keep.sum())} user sequences"
            )
        return UserSequenceLoader(
            dataset,
            u[keep],
            seqs[keep],
            lens[keep],
            config["diffusion_batch_size"],
            config["mask_samples"],
            self.USER_ID,
            self.ITEM_SEQ,
            self.ITEM_SEQ_LEN,
        )

    def calculate_loss(self, interaction):
        if self.similarity is None:
            raise RuntimeError(
                "GlobalDiff.calculate_loss needs build_training_data(train_data) first "
                "(its trainer's diffusion stage does it)."
            )
        seq, lens = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        positions = sample_mask_positions(lens, self.adapter.causal)
        arange = torch.arange(seq.shape[0], device=seq.device)
        masked = seq[arange, positions]
        q = reweighted_targets(
            self.similarity.rows(masked), seq, lens, positions, self.zeta, self.delta, self.position_offset
        )
        x0 = bernoulli_targets(q)
        if self.training:
            self._track_x0_length(x0)
        cond = self.condition(seq, lens, positions)
        t, weights = self.step_sampler.sample(seq.shape[0], seq.device)
        x_in = x0
        if self.hide_target:
            # The schedule barely noises x0, and x0 always holds the masked item: without this the network
            # can copy the answer from its input, which it never has at inference.
            x_in = x0.clone()
            x_in[arange, masked] = 0.0
        out = self.approximator(self.diffusion.q_sample(x_in, t), t, cond)
        if self.diffusion_loss == "mse":
            per_sample = ((self.x0_prediction(out) - x0) ** 2).sum(dim=-1)
        else:
            per_sample = F.cross_entropy(out, masked, reduction="none")
        self.step_sampler.update(t, per_sample)
        return (per_sample * weights).mean()

    @torch.no_grad()
    def _track_x0_length(self, x0):
        length = x0.norm(dim=-1).mean()
        self.x0_length.copy_(length if self.x0_length == 0 else 0.99 * self.x0_length + 0.01 * length)

    def x0_prediction(self, out):
        """The approximator's output as the loss scores it: with ``diffusion_loss: mse`` L2-normalised over items
        (the paper's loss), with ``ce`` the raw logits."""
        return F.normalize(out, dim=-1) if self.diffusion_loss == "mse" else out

    def _mse_scale(self):
        """The length the reverse process gives x0 estimates and y with ``mse``: the training x0's."""
        return self.x0_length.item() if self.x0_length > 0 else 1.0

    def x0_estimate(self, out):
        """The x0 estimate of a reverse step: the normalised output at the training x0's length (``mse``). Left
        raw, its norm (8-13 on ml-100k) swamped the backbone's y (~0.09) in every posterior mean."""
        estimate = self.x0_prediction(out)
        return estimate * self._mse_scale() if self.diffusion_loss == "mse" else estimate

    # ---- inference -----------------------------------------------------------------------------------
    # Named steps; each key picks its step by name where it is read (benchmarks switch them on a live model):
    #   eval_mode backbone:       backbone_scores (the backbone's own full_sort_predict, history dropped)
    #   eval_mode diffusion_only: votes (backbone pass -> drop history -> diffusion_input -> denoise_scores ->
    #                             normalise), the diffusion side
    #   eval_mode ensemble:       votes, then fuse (exact top-k with fusion_k, else the full Borda count)
    SCORERS = {"ensemble": "ensemble_scores", "backbone": "backbone_scores", "diffusion_only": "diffusion_scores"}
    Y_FORMS = {"softmax": "_y_softmax", "logits": "_y_logits", "topk": "_y_topk"}

    def _history_mask(self, item_seq, n_items):
        mask = torch.zeros(item_seq.shape[0], n_items, dtype=torch.bool, device=item_seq.device)
        mask.scatter_(1, item_seq, True)
        mask[:, 0] = False
        return mask

    def excluded_items(self, item_seq, n_items):
        """The items dropped from every ranking: each user's history with ``filter_history``, else None."""
        return self._history_mask(item_seq, n_items) if self.filter_history else None

    @staticmethod
    def drop_items(logits, excluded):
        return logits if excluded is None else logits.masked_fill(excluded, float("-inf"))

    def diffusion_input(self, logits, y=None):
        """The backbone's prediction in the form the diffusion model starts from (``y_form``, see the
        ``_y_*`` steps). With ``diffusion_loss: mse``, ``y_scale: unit`` gives y the length of the x0 estimates it
        is mixed with in the reverse steps (the training x0's); with ``ce`` those are logits and y enters as
        formed. ``y``: the softmax of ``logits`` when the caller has it."""
        x = getattr(self, self.Y_FORMS[self.y_form])(logits, y)
        if self.y_scale == "unit" and self.diffusion_loss == "mse":
            x = F.normalize(x, dim=-1) * self._mse_scale()
        return x

    def _y_softmax(self, logits, y):
        """The softmax (the paper)."""
        return (torch.softmax(logits.double(), dim=-1) if y is None else y).float()

    def _y_logits(self, logits, y):
        """The raw logits (the authors' code); a dropped history item (-inf) takes its row's lowest finite one."""
        finite = torch.isfinite(logits)
        lowest = logits.masked_fill(~finite, float("inf")).min(dim=-1, keepdim=True).values
        return torch.where(finite, logits, lowest)

    def _y_topk(self, logits, y):
        """A binary vector of the ``y_topk`` best items: the form of the Bernoulli x0 the model is trained on."""
        top = torch.topk(logits, min(self.y_topk, logits.shape[1]), dim=1).indices
        return torch.zeros_like(logits).scatter_(1, top, 1.0)

    def denoise_scores(self, y, cond, generator=None):
        """The backbone's y as the state at ``start_step``, noised on to the last step, reversed to x0_hat."""
        last = self.diffusion.num_steps - 1
        x = y
        if self.start_step < last:
            b = y.shape[0]
            s = torch.full((b,), self.start_step, device=y.device, dtype=torch.long)
            t = torch.full((b,), last, device=y.device, dtype=torch.long)
            x = self.diffusion.q_sample_from(y, s, t, torch.randn(y.shape, device=y.device, generator=generator))

        def model_fn(x_t, t):
            return self.x0_estimate(self.approximator(x_t, t, cond))

        return self.diffusion.sample(
            model_fn, x_T=x, steps=self.sample_steps, generator=generator, stochastic=self.sampling_noise
        )

    def normalise(self, x0_hat, exclude=None):
        """x0_hat as a distribution over items (``x0_norm``), the ``exclude``d items at 0. ``softmax`` suits logits
        (``diffusion_loss: ce``); an MSE-trained x0_hat estimates a 0/1 vector (entries of at most ~1), whose
        softmax is nearly flat: the diffusion side loses most of its vote in the Borda count, which ``l1`` (clip
        at 0, divide by the sum) keeps."""
        return X0_NORMS[self.x0_norm](x0_hat, exclude)

    def votes(self, interaction):
        """One backbone pass -> (y, d): the backbone's softmax and the diffusion model's distribution, both
        without the excluded items."""
        seq, lens = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        logits, states = self.adapter.scores_and_states(interaction)  # the scores and the condition at once
        excluded = self.excluded_items(seq, logits.shape[1])
        logits = self.drop_items(logits, excluded)
        y = torch.softmax(logits.double(), dim=-1)  # once: the diffusion input and the Borda count share it
        cond = self.condition_from_states(states, lens - 1, lens)
        generator = eval_generator(self.eval_seed, interaction, self.USER_ID, self.device)
        x0_hat = self.denoise_scores(self.diffusion_input(logits, y), cond, generator)
        return y, self.normalise(x0_hat.double(), excluded)

    def fuse(self, y, d, fusion_k=None):
        """The Borda count of the two votes: exactly its best ``fusion_k`` items (see :func:`fused_topk`; on the
        CPU, for catalogues where it is faster than a sort), or the whole ranking (None)."""
        if (
            fusion_k is None
            or not host_fast_path(y)
            or y.shape[1] < FUSION_ITEMS_PER_CANDIDATE * self.fusion_candidates
        ):
            # an accelerator sorts fast, and picking the rows the certificate failed would cost a host sync
            return borda_fuse(y, d, self.gamma)
        scores, certified = fused_topk(y, d, self.gamma, fusion_k, self.fusion_candidates)
        self.fusion_fallbacks += int((~certified).sum())
        return scores

    # The scorers of the eval modes; ``fusion_k`` is the ranking depth the caller reads (None: every item's
    # place), which only the ensemble's top-k fusion needs: the others rank every item.
    def backbone_scores(self, interaction, fusion_k=None):
        """The backbone alone, as it scores on its own (``full_sort_predict``), without the excluded items."""
        logits = self.adapter.item_scores(interaction)
        return self.drop_items(logits, self.excluded_items(interaction[self.ITEM_SEQ], logits.shape[1]))

    def diffusion_scores(self, interaction, fusion_k=None):
        """The diffusion model alone (the paper's Figure 5)."""
        return self.votes(interaction)[1]

    def ensemble_scores(self, interaction, fusion_k=None):
        return self.fuse(*self.votes(interaction), fusion_k)

    def _scores(self, interaction, fusion_k=None):
        return getattr(self, self.SCORERS[self.eval_mode])(interaction, fusion_k)

    def full_sort_predict(self, interaction):
        """Full-ranking scores. The ensemble scores only its best ``fusion_k`` items, exactly in the Borda order
        (every other item -inf), when the metrics read no deeper (see :func:`fused_topk`)."""
        return self._scores(interaction, self.fusion_k)

    @contextmanager
    def ranking_depth(self, k):
        """Full-sort scores good down to place ``k`` at least inside the block (the whole ranking if needed)."""
        saved = self.fusion_k
        if saved is not None and k > saved:
            self.fusion_k = None
        try:
            yield self
        finally:
            self.fusion_k = saved

    def predict(self, interaction):
        """Sampled evaluation: each row's item in its user's full-sort order, as a score (higher is better).

        RecBole gathers sampled scores in float32, which would refuse the float64 Borda scores and, once cast,
        could tie items that differ only past float32's precision; the item's place in the float64 order keeps
        the ranking exact (an integer below 2^24 is exact in float32)."""
        return predict_from_full_sort(self, interaction, self._full_sort_places)

    def _full_sort_places(self, interaction):
        scores = self._scores(interaction)  # every candidate needs its exact place: the whole Borda ranking
        if scores.dtype == torch.float32:
            return scores
        return descending_places(scores, zero_ties=True).float()  # zeros too: every candidate gets its place

    sampled_full_sort = _full_sort_places  # what predict reads, for the trainer's fast_sampled_eval
