r"""TI-DiffRec (PDRec's stage 1): RecBole's DiffRec with time-interval input weights.

A user's input vector holds, for every item of the user's training history,
``w = w_min + (t_j - t_first) / (t_last - t_first) * (w_max - w_min)`` over that user's training timestamps
(all timestamps equal: ``w_max``; a repeated item keeps its last occurrence's weight), else 0. With
``weighting: position`` the weights are spaced by position instead (T-DiffRec, RecBole's ``time-aware``).
Everything else (network, linear-var schedule, SNR reweighting, loss-aware steps, noise-free inference from
the un-noised input) is RecBole's DiffRec. Runs on its own (``--model=TIDiffRec``) with RecBole's user-level
data loader.

The network's first layer, ``Linear(I + emb -> d)`` over ``cat(x, step embedding)``, is computed as two
products (:class:`SplitInputDNN`, same weights and state dict): autograd then no longer computes the gradient
of the wide item input, which nothing uses (one of the five [B, I] x [I, d] products of a training step), and the
first reverse step of inference, whose input is the un-noised, sparse history, multiplies only its nonzeros.
Training inputs are noised, hence dense: no sparse product there.
"""

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.model.general_recommender.diffrec import DNN, DiffRec, timestep_embedding

from recbole_diff.data.interactions import training_interactions

WEIGHTINGS = ("interval", "position")
# users scored together in evaluation (see TIDiffRec.full_sort_predict)
EVAL_WINDOW = 256


def interval_weights(users, items, times, w_min, w_max):
    """Per-interaction time-interval weights and the (user, item) pairs they belong to, a repeated item kept
    once with the weight of its last occurrence. Returns (users, items, weights) sorted by user, then time."""
    order = np.lexsort((np.arange(len(users)), times, users))
    users, items, times = users[order], items[order], times[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    first = np.minimum.reduceat(times, starts)
    last = np.maximum.reduceat(times, starts)
    group = np.cumsum(np.r_[False, users[1:] != users[:-1]])
    span = (last - first)[group]
    frac = np.divide(times - first[group], span, out=np.ones_like(times), where=span > 0)
    weights = w_min + frac * (w_max - w_min)
    # keep each (user, item)'s last occurrence: scan from the end, take the first sighting
    key = users.astype(np.int64) * (int(items.max()) + 1) + items
    _, last_idx = np.unique(key[::-1], return_index=True)
    keep = np.sort(len(key) - 1 - last_idx)
    return users[keep], items[keep], weights[keep]


def within_user_positions(users, times=None):
    """0, 1, 2, ... over each user's interactions in time order (row order where there is no time)."""
    key = times if times is not None else np.zeros(len(users))
    order = np.lexsort((np.arange(len(users)), key, users))
    positions = np.empty(len(users), dtype=np.float64)
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    positions[order] = np.arange(len(users)) - np.repeat(starts, counts)
    return positions


class SplitInputDNN(DNN):
    """RecBole's DNN with the first layer split into its item part and its step-embedding part; with
    ``sparse_input`` set, the item part is a sparse product over the input's nonzeros. Same output as
    :meth:`DNN.forward` up to float summation order."""

    sparse_input = False

    def forward(self, x, timesteps):
        emb = self.emb_layer(timestep_embedding(timesteps, self.time_emb_dim).to(x.device))
        if self.norm:
            x = torch.nn.functional.normalize(x)
        x = self.drop(x)
        layers = list(self.mlp_layers.mlp_layers)
        first = next(k for k, layer in enumerate(layers) if isinstance(layer, torch.nn.Linear))
        # what precedes the first Linear is MLPLayers' input dropout, which DNN builds with p = 0
        linear, n = layers[first], x.shape[1]
        h = torch.addmm(linear.bias, emb, linear.weight[:, n:].t())
        w_items = linear.weight[:, :n].t()
        h = h + (torch.sparse.mm(x.to_sparse(), w_items) if self.sparse_input else x @ w_items)
        for layer in layers[first + 1 :]:
            h = layer(h)
        return h


class TIDiffRec(DiffRec):
    r"""DiffRec on time-interval weighted user vectors; see the module docstring."""

    dataloader_as = "DiffRec"  # RecBole picks its user-level loader by model name
    needs_timestamp = True  # its weights follow each user's interactions in time (checked at config time)
    # DiffRec's importance-sampling history is kept in plain tensors, outside the state dict: without this a
    # checkpoint or a resume point would restart it from zero
    other_parameter_name = ["Lt_history", "Lt_count"]

    def __init__(self, config, dataset):
        if config["weighting"] not in WEIGHTINGS:
            raise ValueError(f"TIDiffRec: weighting must be one of {WEIGHTINGS}, got '{config['weighting']}'.")
        self.weighting = config["weighting"]
        if not 0 <= float(config["w_min"]) <= float(config["w_max"]):
            raise ValueError(f"TIDiffRec needs 0 <= w_min <= w_max, got {config['w_min']}, {config['w_max']}.")
        # Inside PDRec, TI-DiffRec is validated on a sequential split, whose evaluator does not remove the
        # history the way RecBole's general evaluation does; DiffRec's output is mostly that history.
        self.mask_history = bool(config["mask_history"])
        super().__init__(config, dataset)
        self.mlp.__class__ = SplitInputDNN  # DiffRec builds a DNN; the same module, computed as two products
        self._window = None  # (first user, weights' versions, preferences) of the last evaluation window

    def p_sample(self, x_start):
        """RecBole's noise-free reverse run from the un-noised ``x_start`` (``sampling_steps: 0``), its first
        step over the sparse input; the other settings go to RecBole's."""
        if self.sampling_steps != 0 or self.sampling_noise or self.noise_scale == 0.0:
            return super().p_sample(x_start)
        x_t = x_start
        for i in reversed(range(self.steps)):
            t = torch.full((x_t.shape[0],), i, dtype=torch.long, device=x_t.device)
            self.mlp.sparse_input = x_t is x_start
            try:
                x_t = self.p_mean_variance(x_t, t)["mean"]
            finally:
                self.mlp.sparse_input = False
        return x_t

    def build_histroy_items(self, dataset):
        # Built from the training split's interactions (also a sequential split's, inside PDRec), not
        # RecBole's history matrix, which misses a sequential split's first items.
        users, items, times = training_interactions(dataset, with_time=True)
        if self.weighting == "position":
            self.time_aware = True  # T-DiffRec: weights evenly spaced over each user's items in time order
            times = within_user_positions(users, times)
        elif times is None:
            raise ValueError(
                "TIDiffRec (weighting: interval) needs the timestamp column: set TIME_FIELD and "
                "load_col: {inter: [user_id, item_id, timestamp]}."
            )
        users, items, weights = interval_weights(users, items, times, float(self.w_min), float(self.w_max))
        counts = np.bincount(users, minlength=dataset.user_num)
        width = max(int(counts.max()), 1)
        slot = np.arange(len(users)) - np.repeat(np.cumsum(counts) - counts, counts)
        history_id = np.zeros((dataset.user_num, width), dtype=np.int64)
        history_value = np.zeros((dataset.user_num, width), dtype=np.float32)
        history_id[users, slot] = items
        history_value[users, slot] = weights
        self.history_item_id = torch.from_numpy(history_id).to(self.device)
        self.history_item_value = torch.from_numpy(history_value).to(self.device)

    def preferences(self, user):
        """x0_hat' [B, n_items]: the noise-free reverse run from each user's weighted training vector."""
        return self.p_sample(self.get_rating_matrix(user))

    def history_mask(self, user):
        mask = torch.zeros(len(user), self.n_items, dtype=torch.bool, device=self.device)
        rows = self.history_item_id[user]
        mask.scatter_(1, rows, self.history_item_value[user] > 0)
        return mask

    def window_preferences(self, user):
        """``preferences(user)`` in evaluation, computed for ``EVAL_WINDOW`` consecutive user ids at a time.
        A user costs ten passes over the [items x d] weights whatever the batch, and RecBole's sampled evaluation
        asks for eval_batch_size / 101 users a batch (10 at 1024): scoring them 10 at a time reads the weights
        25x as often, which on sports made a validation 3x a full pass over the users. Batches come in user
        order, so one window serves many of them; it is dropped when any weight changes."""
        versions = tuple(p._version for p in self.parameters())
        lo, hi = int(user.min()), int(user.max()) + 1
        w = self._window
        if w is None or w[1] != versions or lo < w[0] or hi > w[0] + len(w[2]):
            stop = min(max(hi, lo + EVAL_WINDOW), self.n_users)
            w = self._window = (lo, versions, self.preferences(torch.arange(lo, stop, device=user.device)))
        return w[2][user - w[0]]

    def train(self, mode=True):
        self._window = None
        return super().train(mode)

    def full_sort_predict(self, interaction):
        user = interaction[self.USER_ID]
        scores = self.preferences(user) if self.training or torch.is_grad_enabled() else self.window_preferences(user)
        if self.mask_history:
            scores = scores.masked_fill(self.history_mask(user), float("-inf"))
        return scores

    def predict(self, interaction):
        # Sampled evaluation repeats each user once per candidate: run the reverse process once per user.
        users, inverse = torch.unique(interaction[self.USER_ID], return_inverse=True)
        scores = self.full_sort_predict(Interaction({self.USER_ID: users}))
        return scores[inverse, interaction[self.ITEM_ID]]
