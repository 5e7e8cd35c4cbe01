"""RecBole's Trainer, made to work on torch >= 2.6 and under parallel runs.

What RecBole 1.2.1's Trainer does that every recbole-diff run would hit:

* ``torch.load`` defaults to ``weights_only=True`` since torch 2.6 and refuses RecBole's checkpoints (they
  pickle the Config). We load our own files with ``weights_only=False`` and hand over to RecBole's code with
  ``load_best_model=False``, instead of flipping a process-wide switch.
* RecBole names checkpoints ``{model}-{time to the second}.pth``; two runs started in the same second (seeds,
  parallel trials) overwrite each other. Each run here gets a name no other run can have.
* Sampled evaluation (``uni100``...) draws each user's candidates from numpy's global generator while it
  iterates, so two models of one run (a plugin and its backbone), or two epochs, are scored against different
  candidates and a paired comparison carries sampling noise. Here every evaluation draws them from the run's
  seed, and the generator's state is put back afterwards so training's random stream is unchanged.
* Sampled evaluation scores every candidate row with ``model.predict``, and each row carries its user's whole
  sequence: ``uni100`` runs the sequence encoder 101 times per user (on ml-100k 95% of a validation's time).
  With ``fast_sampled_eval`` each user's row is encoded once by ``full_sort_predict`` and the candidates'
  scores are read off it; each evaluation's first batch is also scored by ``predict``, and a model whose two
  scores differ is evaluated RecBole's way (see :func:`source_rows`). RecBole's collector then sorts a
  ``[users x items]`` matrix that is ``-inf`` but for the ~101 candidates; it gets the candidates only (see
  :func:`compact_candidates`: same metrics, on sports 2.5x faster a validation).
* ``mixed_precision: bf16`` runs training and evaluation steps under bfloat16 autocast (see
  :func:`recbole_diff.device.mixed_precision`); RecBole's own ``enable_amp`` would pick float16 and a scaler.
* A killed run loses its training. With ``resume_dir`` each ``fit`` keeps a point to resume from before every
  epoch, and the same run started again goes on from there (see :mod:`recbole_diff.trainer.resume`).
"""

import os
import shutil
import uuid

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import EvaluatorType, get_local_time

from recbole_diff.device import mixed_precision
from recbole_diff.io import atomic_write, load_checkpoint
from recbole_diff.model.utils import seeded_numpy
from recbole_diff.trainer.resume import point_name, resume_point, rng_state, run_settings, set_rng_state


def unique_checkpoint_path(config, tag=None):
    """``{checkpoint_dir}/{model}[-{tag}]-{dataset}-seed{seed}-{time}-{random}.pth``, never an existing file."""
    parts = [config["model"]]
    if tag:
        parts.append(tag)
    parts += [os.path.basename(str(config["dataset"])), f"seed{config['seed']}", get_local_time()]
    os.makedirs(config["checkpoint_dir"], exist_ok=True)
    while True:
        path = os.path.join(config["checkpoint_dir"], "-".join(parts + [uuid.uuid4().hex[:8]]) + ".pth")
        if not os.path.exists(path):
            return path


# more users x items scores than this in one batch would cost too much memory: RecBole's predict is used instead
MAX_FULL_SORT_SCORES = 1 << 24


def source_rows(row_idx, positive_u):
    """For a batch of RecBole's sampled evaluation, the index of the row each row is a copy of, or None when
    the batch is not laid out that way.

    RecBole's ``NegSampleEvalDataLoader`` puts each user's rows in one block: its ``n`` positive rows, then
    ``inter.repeat(times)`` of them with the item replaced by a sampled negative. Row ``k`` of a block is thus
    row ``k % n`` of the block with another item."""
    n_users = int(positive_u[-1]) + 1
    positives = torch.bincount(positive_u, minlength=n_users)
    rows = torch.bincount(row_idx, minlength=n_users)
    if (positives == 0).any() or (rows % positives).any() or (row_idx[1:] < row_idx[:-1]).any():
        return None
    start = (torch.cumsum(rows, 0) - rows)[row_idx]
    return start + (torch.arange(len(row_idx)) - start) % positives[row_idx]


def compact_candidates(row_idx, items, scores, positive_u, positive_i, n_items):
    """A sampled batch's scores as RecBole's ``[users x n_items]`` matrix less the columns of items no user of
    the batch was scored on, or None where a positive item is not among its user's rows.

    RecBole's collector sorts every row of that matrix (GAUC) and takes its top k; all but each user's ~101
    candidates are ``-inf``. Here row ``u`` holds user ``u``'s distinct candidates in item-id order (the
    matrix's column order, a repeated negative once, as in the matrix), then ``-inf``: at least one, since
    GAUC reads a row's candidate count as the place of its first ``-inf``. Returns (matrix, positive columns)."""
    key = row_idx.to(items.device) * n_items + items
    unique, inverse = torch.unique(key, return_inverse=True)
    user = torch.div(unique, n_items, rounding_mode="floor")
    column = torch.arange(len(unique), device=unique.device) - torch.searchsorted(unique, user * n_items)
    # float32 as RecBole's matrix, whatever the autocast; a repeated (user, item) has one score: equal rows
    values = torch.empty(len(unique), device=scores.device)
    values[inverse.to(scores.device)] = scores.to(values.dtype)
    n_users = int(positive_u[-1]) + 1
    matrix = torch.full((n_users, int(column.max()) + 2), -np.inf, device=scores.device)
    matrix[user.to(scores.device), column.to(scores.device)] = values
    positive_key = positive_u.to(unique.device) * n_items + positive_i.to(unique.device)
    place = torch.searchsorted(unique, positive_key).clamp(max=len(unique) - 1)
    if not torch.equal(unique[place], positive_key):
        return None
    return matrix, column[place].to(positive_u.device)  # on positive_u's device, as RecBole's positive_i


class CompatMixin:
    """Put before a RecBole trainer class in the bases (see :func:`compat_trainer`)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_path(config)
        self._item_side, self._full_sort_agrees, self._disagreed = set(), None, set()
        self._compact = False  # set by evaluate: see compact_candidates
        # a stage shared between runs keeps its point beside the stage instead (see plugin.py)
        self.resume_dir, self.resume_settings = config["resume_dir"], None
        self.point_kind = None  # the resume point's name stem (default: trainer and model class)
        self._resume = None
        # built once here so that a bad value fails before training
        self._autocast = mixed_precision(config, self.device)
        if self._autocast._enabled:
            # RecBole's step opens autocast(enabled=enable_amp) inside ours; enabled, it inherits our bf16
            self.enable_amp = True

    # ---- resume points (resume_dir) ------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        # without checkpoints the best weights of the killed run would be gone: nothing to resume to
        point = self._resume_point() if saved else None
        state = point.load() if point is not None else None
        if state is not None:
            self._restore(state, train_data)
            if state["done"]:
                self.logger.info(f"resume_dir: {point.name} finished in an earlier run; loaded it from {point.path}")
                return self.best_valid_score, self.best_valid_result
            self.logger.info(f"resume_dir: {point.name} goes on at epoch {self.start_epoch} from {point.path}")
        self._resume = point
        try:
            result = super().fit(
                train_data,
                valid_data,
                verbose=verbose,
                saved=saved,
                show_progress=show_progress,
                callback_fn=callback_fn,
            )
        finally:
            self._resume = None
        if point is not None:
            point.save(**self._training_state(train_data, self.epochs, done=True))
        return result

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        # here the epochs before epoch_idx, validation included, are complete
        if self._resume is not None and epoch_idx > self.start_epoch:
            self._resume.save(**self._training_state(train_data, epoch_idx))
        with mixed_precision(self.config, self.device):
            return super()._train_epoch(train_data, epoch_idx, *args, **kwargs)

    def _resume_point(self):
        if not self.resume_dir:
            return None
        base = next(c for c in type(self).__mro__ if c.__module__.startswith("recbole.trainer"))
        if base is not RecBoleTrainer:
            # RecBole's other trainers keep state of their own (two optimisers, cluster centroids, inner
            # loaders' generators) that a point does not hold: they train from the start
            self.logger.warning(
                f"resume_dir: {base.__name__} is not covered by resume points; it trains from the start"
            )
            return None
        name = point_name(
            self.config, self.point_kind or f"{type(self).__name__}-{type(self.model).__name__}", self.resume_settings
        )
        return resume_point(self.resume_dir, name, self.resume_settings or run_settings(self.config))

    def _training_state(self, train_data, epoch, done=False):
        return {
            "epoch": epoch,
            "done": done,
            "model": self.model.state_dict(),
            "other_parameter": self._other_parameter(),
            "optimizer": self.optimizer.state_dict(),
            "cur_step": self.cur_step,
            "best_valid_score": self.best_valid_score,
            "best_valid_result": self.best_valid_result,
            "saved_model_file": self.saved_model_file,
            "train_loss_dict": dict(self.train_loss_dict),
            "rng": rng_state(train_data),
        }

    def _other_parameter(self):
        # some RecBole models list sub-modules here, which the state dict holds already; setting a copy back
        # would cut them off from the optimiser
        return {k: v for k, v in self.model.other_parameter().items() if not isinstance(v, torch.nn.Module)}

    def _restore(self, state, train_data):
        self.model.load_state_dict(state["model"])
        self.model.load_other_parameter(state["other_parameter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.cur_step = state["epoch"], state["cur_step"]
        self.best_valid_score, self.best_valid_result = state["best_valid_score"], state["best_valid_result"]
        self.train_loss_dict.update(state.get("train_loss_dict", {}))
        self._adopt_best_checkpoint(state["saved_model_file"], state["best_valid_result"] is not None)
        set_rng_state(state["rng"], train_data)

    def _adopt_best_checkpoint(self, path, needed):
        """The killed run's best checkpoint, copied to this run's own file: it may lie in another run's folder
        (a shared stage's point), which this run must not write to."""
        if os.path.isfile(path):
            with atomic_write(self.saved_model_file) as tmp:
                shutil.copyfile(path, tmp)
        elif needed:
            raise FileNotFoundError(
                f"resume_dir: the best checkpoint '{path}' of the run to resume is gone. Delete "
                "its resume point to train from the start."
            )

    def load_model_file(self, model_file=None):
        """Load a checkpoint's weights into ``self.model`` (the best one of this run by default)."""
        path = model_file or self.saved_model_file
        checkpoint = load_checkpoint(path, self.device)
        self._check_checkpoint_matches(checkpoint, path)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.logger.info(f"Loading model structure and parameters from {path}")
        return checkpoint

    def _check_checkpoint_matches(self, checkpoint, path):
        saved = checkpoint.get("config")
        if saved is None:
            return
        for key in ("model", "dataset"):
            if str(saved[key]) != str(self.config[key]):
                raise ValueError(
                    f"Checkpoint '{path}' was trained for {key} '{saved[key]}', but this run uses "
                    f"'{self.config[key]}'. Pass a checkpoint of the same {key}."
                )

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self.load_model_file(model_file)
        self.start_sampled_eval(eval_data)
        self._compact = not isinstance(eval_data, FullSortEvalDataLoader) and self._collector_takes_compact()
        try:
            with seeded_numpy(self.config["seed"]), mixed_precision(self.config, self.device):
                return super().evaluate(eval_data, load_best_model=False, model_file=None, show_progress=show_progress)
        finally:
            self._compact = False

    def _collector_takes_compact(self):
        """Whether the metrics read a sampled batch's scores only through ranks among its users' candidates
        (Hit, NDCG, MRR, GAUC...), so that :func:`compact_candidates` gives them the same values: not the
        recommended items' ids (coverage, popularity metrics) nor the raw score matrix."""
        register = self.eval_collector.register
        return (
            self.config["fast_sampled_eval"]
            and self.config["eval_type"] == EvaluatorType.RANKING
            and not register.need("rec.items")
            and not register.need("rec.score")
        )

    def batch_scorer(self, eval_data):
        """The function :meth:`evaluate` scores each batch of ``eval_data`` with, for evaluation code of its own
        (per-group metrics): batch -> (interaction, scores, positive_u, positive_i), one row of scores over all
        items per user of the batch."""
        self.tot_item_num = eval_data._dataset.item_num
        if not isinstance(eval_data, FullSortEvalDataLoader):
            self.start_sampled_eval(eval_data)
            return self._neg_sample_batch_eval
        if self.item_tensor is None:
            self.item_tensor = eval_data._dataset.get_item_feature().to(self.device)
        return self._full_sort_batch_eval

    def start_sampled_eval(self, eval_data):
        """Before scoring ``eval_data``'s batches with ``fast_sampled_eval``: which fields belong to the item, and
        a fresh check against ``predict`` (a plugin's model scores by its evaluation mode, which may change)."""
        item_feat = eval_data._dataset.item_feat
        self._item_side = {self.config["ITEM_ID_FIELD"], self.config["LABEL_FIELD"]}
        self._item_side.update(item_feat.columns if item_feat is not None else ())
        self._full_sort_agrees = None

    def _neg_sample_batch_eval(self, batched_data):
        interaction, row_idx, positive_u, positive_i = batched_data
        scores = self._scores_once_per_user(interaction, row_idx, positive_u)
        if self._compact:
            if scores is None:
                scores = self._predict_rows(interaction).view(-1)
            compact = compact_candidates(
                row_idx,
                interaction[self.config["ITEM_ID_FIELD"]].to(self.device),
                scores,
                positive_u,
                positive_i,
                self.tot_item_num,
            )
            if compact is not None:
                return interaction, compact[0], positive_u, compact[1]
        if scores is None:
            return super()._neg_sample_batch_eval(batched_data)
        matrix = torch.full((int(positive_u[-1]) + 1, self.tot_item_num), -np.inf, device=self.device)
        matrix[row_idx, interaction[self.config["ITEM_ID_FIELD"]]] = scores.to(matrix.dtype)
        return interaction, matrix, positive_u, positive_i

    def _scores_once_per_user(self, interaction, row_idx, positive_u):
        """``model.predict``'s scores of the batch's rows, from one full sort per user row; None where that
        cannot be done (see the module doc)."""
        verified = self._full_sort_agrees
        if (
            not self.config["fast_sampled_eval"]
            or verified is False
            or self.config["eval_type"] != EvaluatorType.RANKING
        ):
            return None
        src = source_rows(row_idx, positive_u)
        if src is None:
            return None
        keep = torch.unique(src)
        # a full sort pays off with several candidates per row (uni100: 101), not with uni1's two
        if len(keep) * self.tot_item_num > MAX_FULL_SORT_SCORES or len(src) < 4 * len(keep):
            return None
        for field in interaction.columns:  # every row must be its source but for the item and its features
            if field not in self._item_side and not torch.equal(interaction[field], interaction[field][src]):
                return None
        # a model whose predict reads another full-sort score (GlobalDiff: places, not Borda scores) names it
        scorer = getattr(self.model, "sampled_full_sort", None) or self.model.full_sort_predict
        if type(self.model).full_sort_predict is AbstractRecommender.full_sort_predict:
            self._full_sort_agrees = False  # RecBole's context-aware models score sampled rows only
            return None
        full = scorer(interaction[keep].to(self.device)).view(len(keep), -1)
        items = interaction[self.config["ITEM_ID_FIELD"]].to(self.device)
        scores = full[torch.searchsorted(keep, src).to(self.device), items]
        if verified is None:
            self._full_sort_agrees = self._agrees_with_predict(interaction, scores)
            if not self._full_sort_agrees:
                return None
        return scores

    def _predict_rows(self, interaction):
        """``model.predict`` of every row, in slices of ``eval_batch_size`` rows (as RecBole's evaluation)."""
        n = interaction.length
        if n <= self.test_batch_size:
            return self.model.predict(interaction.to(self.device))
        return self._spilt_predict(interaction, n)

    def _agrees_with_predict(self, interaction, scores):
        """The same items at -inf (a model's masked history) and the same finite scores up to float rounding."""
        reference = self._predict_rows(interaction).view(-1).double()
        scores = scores.double()
        finite = torch.isfinite(reference)
        agrees = torch.equal(finite, torch.isfinite(scores)) and (
            not finite.any()
            or torch.allclose(
                scores[finite], reference[finite], rtol=1e-5, atol=1e-6 * max(1.0, float(reference[finite].abs().max()))
            )
        )
        if not agrees and type(self.model) not in self._disagreed:
            self._disagreed.add(type(self.model))
            self.logger.warning(
                f"fast_sampled_eval: {type(self.model).__name__}'s full_sort_predict does not "
                f"give its predict scores; sampled evaluation scores every row with predict"
            )
        return agrees

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = self.load_model_file(resume_file)
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


_COMPAT_CACHE = {}


def compat_trainer(trainer_class):
    """RecBole trainer class -> the same class with :class:`CompatMixin` in front, built once per class.
    Trainers outside RecBole's ``Trainer`` family (the
    decision-tree ones) do not use torch checkpoints and are returned unchanged."""
    if issubclass(trainer_class, CompatMixin) or not issubclass(trainer_class, RecBoleTrainer):
        return trainer_class
    if trainer_class not in _COMPAT_CACHE:
        _COMPAT_CACHE[trainer_class] = type(
            trainer_class.__name__,
            (CompatMixin, trainer_class),
            {
                "__module__": __name__,
                "__doc__": f"RecBole's {trainer_class.__name__} with recbole-diff's checkpoint handling.",
            },
        )
    return _COMPAT_CACHE[trainer_class]


class Trainer(CompatMixin, RecBoleTrainer):
    """RecBole's Trainer with safe checkpoint loading and per-run checkpoint names."""


_COMPAT_CACHE[RecBoleTrainer] = Trainer
