"""RecBole's Trainer, made to work on torch >= 2.6 and under parallel runs.

Two problems with RecBole 1.2.1's Trainer that every recbole-diff run would hit:

* ``torch.load`` defaults to ``weights_only=True`` since torch 2.6 and refuses RecBole's checkpoints (they
  pickle the Config). We load our own files with ``weights_only=False`` and hand over to RecBole's code with
  ``load_best_model=False``, instead of flipping a process-wide switch.
* RecBole names checkpoints ``{model}-{time to the second}.pth``; two runs started in the same second (seeds,
  parallel trials) overwrite each other. Each run here gets a name no other run can have.
* Sampled evaluation (``uni100``...) draws each user's candidates from numpy's global generator while it
  iterates, so two models of one run (a plugin and its backbone), or two epochs, are scored against different
  candidates and a paired comparison carries sampling noise. Here every evaluation draws them from the run's
  seed, and the generator's state is put back afterwards so training's random stream is unchanged.
"""
import os
import uuid
from contextlib import contextmanager

import numpy as np

from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_local_time

from recbole_diff.utils import load_checkpoint


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


@contextmanager
def seeded_numpy(seed):
    """numpy's global generator seeded inside the block and restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class CompatMixin:
    """Put before a RecBole trainer class in the bases (see :func:`compat_trainer`)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.saved_model_file = unique_checkpoint_path(config)

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
        with seeded_numpy(self.config["seed"]):
            return super().evaluate(eval_data, load_best_model=False, model_file=None, show_progress=show_progress)

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
        _COMPAT_CACHE[trainer_class] = type(trainer_class.__name__, (CompatMixin, trainer_class), {
            "__module__": __name__,
            "__doc__": f"RecBole's {trainer_class.__name__} with recbole-diff's checkpoint handling.",
        })
    return _COMPAT_CACHE[trainer_class]


class Trainer(CompatMixin, RecBoleTrainer):
    """RecBole's Trainer with safe checkpoint loading and per-run checkpoint names."""


_COMPAT_CACHE[RecBoleTrainer] = Trainer
