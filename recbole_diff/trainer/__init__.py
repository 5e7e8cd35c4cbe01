"""Trainers. ``<Model>Trainer`` classes defined here are picked up by ``recbole_diff.trainer.registry.get_trainer``."""
from recbole_diff.trainer.diffuasr import DiffuASRTrainer
from recbole_diff.trainer.globaldiff import GlobalDiffTrainer
from recbole_diff.trainer.pdrec import PDRecTrainer
from recbole_diff.trainer.tidiffrec import TIDiffRecTrainer
from recbole_diff.trainer.trainer import CompatMixin, Trainer, compat_trainer, unique_checkpoint_path

__all__ = [
    "CompatMixin", "Trainer", "compat_trainer", "unique_checkpoint_path", "GlobalDiffTrainer", "PDRecTrainer",
    "TIDiffRecTrainer", "DiffuASRTrainer",
]
