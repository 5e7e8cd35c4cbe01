"""Model and trainer lookup (ours first, then RecBole's) and small runtime helpers."""
import contextlib
import importlib
import os
import sys

import numpy as np
import recbole.model.sequential_recommender  # noqa: F401  (see below)
import torch
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_diff.device import host_fast_path

# RecBole 1.2.1's sine.py calls torch.autograd.set_detect_anomaly(True) when its sequential models are
# imported, which slows every backward pass of every model (SASRec: 1.75x per batch here). The import above
# makes that happen now, once; we switch anomaly detection back off for the whole process.
torch.autograd.set_detect_anomaly(False)

# Our models: name -> module. Kept explicit so an unknown name can list what exists.
_OUR_MODELS = {
    "DiffuRec": "recbole_diff.model.sequential_recommender.diffurec",
    "DiffuRecSys": "recbole_diff.model.sequential_recommender.diffurec",
    "GlobalDiff": "recbole_diff.model.plugin.globaldiff",
    "TIDiffRec": "recbole_diff.model.plugin.tidiffrec",
    "PDRec": "recbole_diff.model.plugin.pdrec",
    "DiffuASR": "recbole_diff.model.plugin.diffuasr",
}


def _available_our_models():
    # Methods land one at a time; a name whose module is not in this install is not offered.
    found = {}
    for name, module_path in _OUR_MODELS.items():
        try:
            if importlib.util.find_spec(module_path) is not None:
                found[name] = module_path
        except ModuleNotFoundError:
            pass
    return found


def recbole_model_names():
    """Names of every model RecBole 1.2.1 ships, read from its model packages."""
    names = []
    # exlib_recommender is left out: importing it needs xgboost and lightgbm.
    for sub in ("general_recommender", "sequential_recommender", "context_aware_recommender",
                "knowledge_aware_recommender"):
        pkg = importlib.import_module(f"recbole.model.{sub}")
        for attr in dir(pkg):
            obj = getattr(pkg, attr)
            if isinstance(obj, type) and hasattr(obj, "calculate_loss") and obj.__module__.startswith(pkg.__name__):
                names.append(attr)
    return sorted(set(names))


def sequential_model_names():
    """Models a plugin can take as its backbone: RecBole's sequential models and ours that are not plugins."""
    from recbole.utils import ModelType

    pkg = importlib.import_module("recbole.model.sequential_recommender")
    names = [name for name in dir(pkg) if isinstance(getattr(pkg, name), type)
             and getattr(getattr(pkg, name), "type", None) == ModelType.SEQUENTIAL
             and hasattr(getattr(pkg, name), "calculate_loss")]
    for name in our_model_names():
        model = get_model(name)
        if model.type == ModelType.SEQUENTIAL and not is_plugin(model):
            names.append(name)
    return sorted(set(names))


def is_plugin(model_class):
    """A model built around a backbone (:class:`~recbole_diff.model.plugin.base.PluginRecommender`)."""
    from recbole_diff.model.plugin.base import PluginRecommender

    return isinstance(model_class, type) and issubclass(model_class, PluginRecommender)


def our_model_names():
    return sorted(_available_our_models())


def get_model(model_name):
    """Return the model class named ``model_name``: recbole-diff's first, then RecBole's."""
    ours = _available_our_models()
    if model_name in ours:
        return getattr(importlib.import_module(ours[model_name]), model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError, ImportError) as e:  # RecBole imports exlib (lightgbm) last
        raise ValueError(
            f"Unknown model '{model_name}'. recbole-diff models: {', '.join(our_model_names())}; "
            f"RecBole models: {', '.join(recbole_model_names())}."
        ) from e


def get_trainer(model_type, model_name):
    """``<Model>Trainer`` from ``recbole_diff.trainer`` if it exists, else RecBole's trainer made safe for
    torch >= 2.6 and for parallel runs (see :class:`recbole_diff.trainer.CompatMixin`)."""
    from recbole_diff import trainer as our_trainers

    ours = getattr(our_trainers, f"{model_name}Trainer", None)
    if ours is not None:
        return ours
    if model_name in _available_our_models() and is_plugin(get_model(model_name)):
        return our_trainers.PluginTrainer
    return our_trainers.compat_trainer(recbole_get_trainer(model_type, model_name))


@contextlib.contextmanager
def clean_argv():
    """Hide ``sys.argv``'s ``--key=value`` words from RecBole's ``Config`` (pytest's ``--tb=short`` or a Ray
    worker's flags would otherwise become config keys with the highest priority)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def init_logger(config):
    """RecBole's ``init_logger``, with a log file no other run shares. RecBole names the file by model, dataset,
    the second and a hash of the config, so two identical runs started together would write into one file; here
    the pid and a random part follow the time. Returns the file's path."""
    import logging
    import uuid

    from recbole.utils import logger as recbole_logger

    local_time = recbole_logger.get_local_time
    stamp = f"{local_time()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    recbole_logger.get_local_time = lambda: stamp
    try:
        recbole_logger.init_logger(config)
    finally:
        recbole_logger.get_local_time = local_time
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return next((f for f in files if stamp in f), None)


def set_threads(n):
    """One torch thread per process by default: on small shared machines two threads made an epoch ~7x
    slower, and two single-threaded processes side by side beat one with two threads."""
    if n is None:
        return
    n = int(n)
    if n > 0 and torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def allow_full_unpickling():
    """Narrow scope for RecBole code paths we do not own that call ``torch.load`` without ``weights_only``
    (e.g. S3Rec's pre-trained model). Our own loads pass ``weights_only=False`` explicitly."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_checkpoint(path, device="cpu"):
    """Load one of our or RecBole's checkpoints. RecBole pickles its Config object, which the
    ``weights_only`` unpickler (torch >= 2.6 default) refuses, so we opt out for files we wrote ourselves."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint file '{path}' does not exist.")
    return torch.load(path, map_location=device, weights_only=False)


def read_yaml(path, what, error=ValueError, missing=FileNotFoundError):
    """The content of a user's yaml file, with errors that name the file and what it was for."""
    import yaml

    if not os.path.isfile(path):
        raise missing(f"{what} '{path}' does not exist.")
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise error(f"{what} '{path}' is not valid yaml: {e}") from e


@contextlib.contextmanager
def seeded_numpy(seed):
    """numpy's global generator seeded inside the block and restored after it."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def eval_generator(seed, interaction, user_field, device):
    """Noise for inference, seeded by the run's seed and the batch's first user: evaluation is reproducible
    run to run and does not depend on how much random state training consumed. Off the CPU the user is not read
    (a device-to-host copy per batch): every batch's noise starts from the run's seed, still reproducible."""
    users = interaction.interaction.get(user_field)
    first = int(users[0]) if users is not None and host_fast_path(users) else 0
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 1_000_003 + first)
    return generator


def predict_from_full_sort(model, interaction, full_sort):
    """``predict`` for sampled evaluation from a full-sort scorer: RecBole repeats each user once per candidate
    item, so the scorer runs once per distinct (sequence, length, user) and each row reads its item's score."""
    seq, lens = interaction[model.ITEM_SEQ], interaction[model.ITEM_SEQ_LEN]
    users = interaction[model.USER_ID] if model.USER_ID in interaction.interaction else None
    key = [seq, lens[:, None]] + ([users[:, None]] if users is not None else [])
    unique, inverse = torch.unique(torch.cat(key, dim=1), dim=0, return_inverse=True)
    # rows in the order they first appear, as a full sort of the batch's own rows sees them: a model that draws
    # noise row by row then gives each user the same noise in predict as in full_sort_predict
    first = torch.full((len(unique),), len(inverse), dtype=torch.long, device=inverse.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse), device=inverse.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    unique, inverse = unique[order], rank[inverse]
    width = seq.shape[1]
    sub = {model.ITEM_SEQ: unique[:, :width], model.ITEM_SEQ_LEN: unique[:, width]}
    if users is not None:
        sub[model.USER_ID] = unique[:, width + 1]
    scores = full_sort(type(interaction)(sub))[inverse]
    return scores.gather(1, interaction[model.ITEM_ID][:, None]).squeeze(1)


def require_keys(config, keys, model_name):
    """RecBole's Config returns None for a missing key; fail early and name the key instead."""
    missing = [k for k in keys if config[k] is None]
    if missing:
        raise KeyError(
            f"{model_name} needs the config key(s) {', '.join(missing)}; set them in a yaml passed with "
            f"--config_files or on the command line (--{missing[0]}=...)."
        )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_lock(lock):
    """Take ``lock`` (a file holding our pid, created atomically) for this process. A lock left by a dead process
    (an interrupted run) is taken over; False when a live process holds it."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and _pid_alive(owner):
                return False
            try:
                os.remove(lock)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def argsort_descending(v):
    """Per row of a 2-d tensor, the indices from the largest value to the smallest; ties in no set order.
    On CPU numpy's (AVX-512) quicksort is about 4x faster than torch's sort over a row of all items."""
    if v.device.type != "cpu":
        return torch.argsort(v, dim=1, descending=True)
    return torch.from_numpy(np.argsort(-v.numpy(), axis=1, kind="quicksort"))
