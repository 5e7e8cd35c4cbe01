"""Trainer lookup by model name: recbole-diff's ``<Model>Trainer`` first, then RecBole's made safe."""
import importlib

from recbole.utils import get_trainer as recbole_get_trainer

from recbole_diff.trainer.trainer import compat_trainer


def get_trainer(model_type, model_name):
    """``<Model>Trainer`` from ``recbole_diff.trainer`` if it exists, else RecBole's trainer made safe for
    torch >= 2.6 and for parallel runs (see :class:`recbole_diff.trainer.CompatMixin`)."""
    # looked up by name when asked, as RecBole's get_trainer does, so that a trainer module can itself ask for
    # its backbone's trainer
    ours = getattr(importlib.import_module("recbole_diff.trainer"), f"{model_name}Trainer", None)
    if ours is not None:
        return ours
    return compat_trainer(recbole_get_trainer(model_type, model_name))
