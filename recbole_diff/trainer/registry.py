"""Trainer lookup by model name: recbole-diff's ``<Model>Trainer`` first, then RecBole's made safe."""

import importlib

from recbole.utils import get_trainer as recbole_get_trainer

from recbole_diff.model.plugin.base import is_plugin
from recbole_diff.model.registry import get_model, our_model_names
from recbole_diff.trainer.trainer import compat_trainer


def get_trainer(model_type, model_name):
    """``<Model>Trainer`` from ``recbole_diff.trainer`` if it exists, else :class:`PluginTrainer` for a plugin, else
    RecBole's trainer made safe for
    torch >= 2.6 and for parallel runs (see :class:`recbole_diff.trainer.CompatMixin`)."""
    # looked up by name when asked, as RecBole's get_trainer does, so that a trainer module can itself ask for
    # its backbone's trainer
    trainers = importlib.import_module("recbole_diff.trainer")
    ours = getattr(trainers, f"{model_name}Trainer", None)
    if ours is not None:
        return ours
    if model_name in our_model_names() and is_plugin(get_model(model_name)):
        return trainers.PluginTrainer  # a plugin needs no trainer of its own: its stages say what to train
    return compat_trainer(recbole_get_trainer(model_type, model_name))
