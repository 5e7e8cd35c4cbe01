"""Trainers. ``<Model>Trainer`` classes defined here are picked up by
``recbole_diff.trainer.registry.get_trainer``; a plugin without one gets :class:`PluginTrainer`."""

from recbole_diff.trainer.diffuasr import DiffuASRTrainer
from recbole_diff.trainer.globaldiff import GlobalDiffTrainer
from recbole_diff.trainer.plugin import PluginTrainer
from recbole_diff.trainer.tidiffrec import TIDiffRecTrainer
from recbole_diff.trainer.trainer import CompatMixin, Trainer, compat_trainer, unique_checkpoint_path

__all__ = [
    "CompatMixin",
    "Trainer",
    "compat_trainer",
    "unique_checkpoint_path",
    "PluginTrainer",
    "GlobalDiffTrainer",
    "TIDiffRecTrainer",
    "DiffuASRTrainer",
]
