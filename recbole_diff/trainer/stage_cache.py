"""Trained stages shared between runs (``stage_cache: <folder>``).

A plugin's first stage (GlobalDiff's and DiffuASR's backbone, PDRec's TI-DiffRec) is often the same model in
many runs: a benchmark grid trains one backbone per seed for every augmenter, guidance or ablation cell. With a
stage cache the first run trains it and stores the checkpoint (and its validation result); the others load it.
Every run using the stage then compares against the very same model, and a grid costs one stage per seed.

A stage counts as the same when its model, dataset (name, folder, and the size and content of its files), seed and
the value of every key the stage model's own config has are equal. Keys only the plugin reads (``gamma``,
``guide``, ``M``...) and bookkeeping (``checkpoint_dir``, ``device``...) do not count. DiffuASR's augmenter
is a second stage of its own, keyed by everything but what only its sampling reads (see
``PluginTrainer.fit_stage_key``). Runs started together wait for the one training the
stage (a lock file with its pid); a lock left by a dead process is taken over.
"""

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager

import torch

from recbole_diff.config import Config
from recbole_diff.io import atomic_write, claim_lock, load_checkpoint
from recbole_diff.trainer.resume import clear
from recbole_diff.trainer.settings import BOOKKEEPING, data_files, plain

_OWN_KEYS = {}


def own_keys(model_name, dataset, data_path):
    """The keys of ``model_name``'s own config on this dataset (RecBole's and ours, its yamls, the dataset's)."""
    if (model_name, dataset, data_path) not in _OWN_KEYS:
        config = Config(model=model_name, dataset=dataset, config_dict={"data_path": data_path}, cmd_line=False)
        _OWN_KEYS[model_name, dataset, data_path] = frozenset(config.final_config_dict)
    return _OWN_KEYS[model_name, dataset, data_path]


def stage_key(config, model_name):
    """What makes two runs' stage the same model (see the module doc)."""
    keys = own_keys(model_name, config["dataset"], os.path.dirname(str(config["data_path"]))) - BOOKKEEPING
    values = {k: config[k] for k in sorted(keys) if k in config}
    return {"stage_model": model_name, "config": values, "data_files": data_files(config)}


def claim_or_wait(lock, ready, logger, what, poll=10.0):
    """True when this process must build ``what``: ``ready()`` is False and we hold ``lock``. False as soon as
    ``ready()`` is True, built by us earlier or by another run, whose claim we wait out."""
    waited = False
    while not ready():
        if claim_lock(lock):
            if not ready():
                return True
            os.remove(lock)  # built between our look and our claim
            break
        if not waited:
            logger.info(f"another run is building {what}; waiting for it")
            waited = True
        time.sleep(poll)
    return False


class Stage:
    """One stage's place in the cache: ``hit`` (a stored checkpoint at ``path`` and its ``meta``) or a claim
    to train it and ``store`` the result. ``key`` replaces :func:`stage_key` for a stage that is not a whole
    RecBole model (DiffuASR's augmenter)."""

    def __init__(self, folder, name, config, model_name, key=None):
        self.folder = folder
        self.hit, self.path, self.meta, self.resume_dir = False, None, {}, None
        if folder is None:
            return
        self.key = key if key is not None else stage_key(config, model_name)
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True, default=plain).encode()).hexdigest()[:12]
        base = os.path.join(folder, f"{name}-{os.path.basename(str(config['dataset']))}-seed{config['seed']}-{digest}")
        self.path, self._meta_path, self._lock = base + ".pth", base + ".json", base + ".lock"
        # its training's resume point: whichever run claims the stage next goes on from it
        self.resume_dir = base + ".resume"

    def trainer(self, trainer):
        """``trainer`` with its resume point beside the stage (when the run keeps resume points)."""
        if self.folder is not None and trainer.resume_dir:
            settings = dict(self.key["config"], stage_model=self.key["stage_model"], data_files=self.key["data_files"])
            trainer.resume_dir, trainer.resume_settings = self.resume_dir, settings
        return trainer

    def _load(self):
        if os.path.isfile(self._meta_path) and os.path.isfile(self.path):
            with open(self._meta_path) as f:
                self.meta = json.load(f)["meta"]
            self.hit = True
        return self.hit

    def acquire(self, logger, poll=10.0):
        """Find the stage, or claim it for this run; while another live run holds the claim, wait for it."""
        if self.folder is None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        if not claim_or_wait(self._lock, self._load, logger, os.path.basename(self.path), poll):
            logger.info(f"stage_cache: using the stored stage {self.path}")
        return self

    def store(self, checkpoint_file, drop=(), **meta):
        """Keep a copy of the trained stage's checkpoint and ``meta`` (json) for the next runs. True if stored.

        ``drop``: checkpoint keys left out of the copy, e.g. the optimiser's state, which no later run reads (a
        stored stage is loaded, never trained on): it is two thirds of an Adam checkpoint, and stages are small
        enough to commit without it."""
        if self.folder is None or self.hit:
            return False
        checkpoint = load_checkpoint(checkpoint_file, "cpu") if drop else None
        with atomic_write(self.path) as tmp:
            if isinstance(checkpoint, dict) and any(k in checkpoint for k in drop):
                torch.save({k: v for k, v in checkpoint.items() if k not in drop}, tmp)
            else:
                shutil.copyfile(checkpoint_file, tmp)
        # last: the pair counts only when both are whole
        with atomic_write(self._meta_path) as tmp, open(tmp, "w") as f:
            json.dump({"key": self.key, "meta": meta, "trained_as": checkpoint_file}, f, indent=1, default=plain)
        clear(self.resume_dir)
        return True

    def release(self):
        if self.folder is not None and not self.hit and os.path.isfile(self._lock):
            os.remove(self._lock)


@contextmanager
def shared_stage(config, name, model_name, logger, key=None):
    """The stage ``name`` (model ``model_name``, or what ``key`` says) in ``config['stage_cache']``; a plain miss
    that stores nothing when no cache is configured. The claim is given up on leaving, stored or not."""
    stage = Stage(config["stage_cache"], name, config, model_name, key)
    try:
        yield stage.acquire(logger)
    finally:
        stage.release()
