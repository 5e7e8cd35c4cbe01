"""Resume points: training that goes on where a killed process stopped (``resume_dir``).

A grid cell on a large dataset can outlast the session or the machine it runs on (PDRec's stage 1 on Amazon
Sports trains for hours on one core). With ``resume_dir`` set, each training keeps one file there, rewritten
before every epoch (after the previous epoch's validation) with what the next epochs depend on: the weights,
the optimiser, early stopping's state, the path of the best checkpoint so far and the random generators
(torch's, numpy's, python's and the training loader's). The same run started again continues from it: it
trains the epochs the killed run would have trained, with the same random numbers. A finished training marks
its point done, so a run killed later (while testing, or in a later stage) loads the trained model instead of
training it again.

A point keeps the settings it was made with; a run where a key has another value refuses it with an error
that names the key, rather than continuing another training. Keys only one side has (a default a newer
version added) do not count. Data files count by size and content (older points kept their time: by size).
"""

import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch

from recbole_diff.io import atomic_write, load_checkpoint
from recbole_diff.trainer.settings import BOOKKEEPING, data_files, plain


def rng_state(loader=None):
    """Every random generator the next epoch reads: the global ones and the training loader's own."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        state["loader"] = generator.get_state()
    return state


def set_rng_state(state, loader=None):
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    generator = getattr(loader, "generator", None)
    if "loader" in state and isinstance(generator, torch.Generator):
        generator.set_state(state["loader"].cpu())


def plain_settings(config):
    """The config's values as json would keep them (numpy scalars as floats, enums as strings), without the
    keys that cannot change what is trained."""
    values = {k: v for k, v in config.final_config_dict.items() if k not in BOOKKEEPING}
    return json.loads(json.dumps(values, sort_keys=True, default=plain))


def run_settings(config):
    """What a run's point is checked against: its config (see :func:`plain_settings`) and its data files' size
    and content hash, so a point of other data is not resumed."""
    return dict(plain_settings(config), data_files=data_files(config))


def point_name(config, kind, settings=None):
    """``<kind>-<dataset>-seed<seed>-<hash>``: the hash covers the keys the user set (all but bookkeeping), so runs
    that share a ``resume_dir`` with other seeds or settings keep points of their own. Defaults are left out of
    the hash: a point made before a default changed is found, and refused by its settings check. A point beside a
    shared stage hashes the stage's ``settings`` instead: every run that claims the stage finds it."""
    user = settings
    if user is None:
        user = {k: v for k, v in getattr(config, "external_config_dict", {}).items() if k not in BOOKKEEPING}
        user["backbone"] = config["backbone"]
    digest = hashlib.sha1(json.dumps(user, sort_keys=True, default=plain).encode()).hexdigest()[:10]
    return f"{kind}-{os.path.basename(str(config['dataset']))}-seed{config['seed']}-{digest}"


class ResumePoint:
    """``<folder>/<name>.pth``: one training's point to resume from, made with ``settings``."""

    def __init__(self, folder, name, settings):
        self.folder, self.name = folder, name
        self.path = os.path.join(folder, f"{name}.pth")
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))

    def load(self):
        """The stored state (on the CPU; loading it into a model or optimiser moves it), or None."""
        if not os.path.isfile(self.path):
            return None
        state = load_checkpoint(self.path, "cpu")
        saved, mine = dict(state.get("settings", {})), self.settings
        if _sizes_only(saved.get("data_files")) is not None and "data_files" in mine:
            # a point from before data files were hashed kept their time, which a new copy changes: sizes then
            saved["data_files"] = _sizes_only(saved["data_files"])
            mine = dict(mine, data_files=_sizes_only(mine["data_files"], force=True))
        # keys on one side only are a newer or older version's defaults, not another training
        differ = sorted(k for k in set(saved) & set(mine) if saved[k] != mine[k])
        if differ:
            key = differ[0]
            raise ValueError(
                f"Resume point '{self.path}' was saved by a run with other settings ('{key}': {saved[key]!r} "
                f"there, {mine[key]!r} here). Delete it, or set another resume_dir, to train from the start."
            )
        return state

    def save(self, **state):
        os.makedirs(self.folder, exist_ok=True)
        with atomic_write(self.path) as tmp:  # a point is either whole or the previous one
            torch.save(dict(state, settings=self.settings), tmp, pickle_protocol=4)


def _sizes_only(files, force=False):
    """``{name: size}`` for data files recorded as [size, time] (older points); None for hashed ones."""
    if not isinstance(files, dict) or not files or not (force or all(isinstance(v[1], int) for v in files.values())):
        return None
    return {name: v[0] for name, v in files.items()}


def resume_point(folder, name, settings):
    """A :class:`ResumePoint`, or None when resuming is off (``folder`` is None)."""
    return None if not folder else ResumePoint(str(folder), name, settings)


def clear(folder):
    """Drop a folder of points once what they were for is stored elsewhere (a finished cell or stage)."""
    if folder and os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)
