"""The plugin contract: a model built around any RecBole sequential backbone and trained in declared stages.

A plugin subclasses :class:`PluginRecommender`, names its default backbone and evaluation modes, and lists its
stages (:class:`Stage`). :class:`~recbole_diff.trainer.PluginTrainer` walks the list: each stage is loaded from
``<stage>_checkpoint`` or the stage cache, or trained, then frozen; the last stage is the run's own training,
whose best checkpoint and validation result are the run's. ``docs/plugins.md`` shows a plugin written this way.

Kinds of stage:

* ``backbone``: the plugin's ``backbone`` module trained by its own RecBole trainer on the run's data and keys
  (the baseline every plugin is compared with), then frozen;
* ``model``: another model (``Stage.model``, e.g. TI-DiffRec) built with its own yamls on the training split and
  trained by its own trainer; the plugin reads it through :meth:`PluginRecommender.set_stage_model`;
* ``fit``: the plugin's own ``stage_parameters(name)`` trained through RecBole's ``Trainer.fit`` on
  ``stage_data(name, train_data)`` with ``calculate_loss`` in that stage;
* ``compute``: no training: ``compute_stage(name, ...)`` builds what the next stages read (a preference store,
  generated items) and the stage cache keeps it.

Per-stage keys (``docs/plugins.md`` has the table): ``<stage>_<key>`` sets the RecBole training key ``<key>``
(see :data:`STAGE_KEYS`) for that stage only; unset, the stage uses the run's value (a ``model`` stage: its own
yaml's). ``<stage>_train_steps`` is a budget in optimiser steps instead of epochs; ``<stage>_checkpoint`` loads a
``backbone`` or ``model`` stage instead of training it; ``<stage>: {key: value}`` sets any key of a ``model``
stage's own config.
"""

import importlib
from contextlib import contextmanager
from dataclasses import dataclass

from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import ModelType

from recbole_diff.model.backbone import BackboneAdapter
from recbole_diff.model.registry import get_model, our_model_names

STAGE_KINDS = ("backbone", "model", "fit", "compute")
# what a plugin declaring a compute stage must define (see PluginRecommender)
COMPUTE_HOOKS = ("compute_stage", "load_stage", "set_stage_result")
# <stage>_<key> -> the RecBole key it sets for that stage
STAGE_KEYS = {
    "epochs": "epochs",
    "learning_rate": "learning_rate",
    "weight_decay": "weight_decay",
    "stopping_step": "stopping_step",
    "eval_step": "eval_step",
    "batch_size": "train_batch_size",
    "learner": "learner",
}


@dataclass(frozen=True)
class Stage:
    """One step of a plugin's pipeline (see the module doc). ``cache``: whether ``stage_cache`` may keep it."""

    name: str
    kind: str
    model: str = None
    cache: bool = True
    only_for: str = None  # the one later stage that reads this one: skipped when that stage is stored

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"Stage '{self.name}': kind must be one of {STAGE_KINDS}, got '{self.kind}'.")
        if (self.kind == "model") != (self.model is not None):
            raise ValueError(f"Stage '{self.name}': a 'model' stage names its model class, other kinds do not.")

    def key(self, suffix):
        """The config key ``<stage>_<suffix>``."""
        return f"{self.name}_{suffix}"


class PluginRecommender(SequentialRecommender):
    """Base class of recbole-diff's plugins. Subclasses set ``default_backbone``, ``EVAL_MODES`` (the first is
    the plugin's own scoring; ``backbone`` scores the backbone alone) and return their stages from ``stages``."""

    default_backbone = "SASRec"
    EVAL_MODES = ()
    # read by the config checks and the trainer for any model (ours that are not plugins declare them too)
    needs_timestamp = False  # a stage orders interactions by time: the config checks the time field first
    sampled_full_sort = None  # predict reads another full-sort scorer than full_sort_predict (fast_sampled_eval)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self.stage = None
        self.stage_info = {}  # what the stages report, for the run's result dict
        self.stage_models = {}  # trained ``model`` stages (kept out of the plugin's own parameters)

    # ---- the contract ----------------------------------------------------------------------------------
    STAGES = ()

    def stages(self):
        """The stages in the order they run (``STAGES``); the last one is the run's own training."""
        return self.STAGES

    def set_stage(self, name):
        """Called before each stage runs: ``calculate_loss`` trains what stage ``name`` trains."""
        self.stage = name

    def stage_parameters(self, name):
        """The parameters a ``fit`` stage trains (default: all that require grad)."""
        return [p for p in self.parameters() if p.requires_grad]

    def stage_data(self, name, train_data, logger=None):
        """The training loader of a ``fit`` stage (default: the run's)."""
        return train_data

    def skip_stage(self, name):
        """True when this configuration does not need stage ``name`` (e.g. an ablation without it)."""
        return False

    # model stages
    def stage_config_overrides(self, name):
        """Keys a ``model`` stage must have whatever the user sets (e.g. how it is validated)."""
        return {}

    def set_stage_model(self, name, model):
        """A trained ``model`` stage, for the stages after it: in ``stage_models``, so that it is not part of the
        plugin's weights (a plain dict is no sub-module)."""
        self.stage_models[name] = model

    # fit stages before the last, when cached
    def stage_ignores(self, name):
        """Config keys that cannot change what stage ``name`` learns (read only by later stages)."""
        return frozenset()

    def stage_settings(self, name):
        """What else makes two runs' stage ``name`` the same (json values), added to its cache key."""
        return {}

    def stage_state(self, name):
        """The weights stage ``name`` trained, as stored in the cache (default: the plugin's whole state; a plugin
        stores less when it can)."""
        return self.state_dict()

    def load_stage_state(self, name, state):
        self.load_state_dict(state)

    # compute stages: a plugin that declares one defines the methods of COMPUTE_HOOKS (checked by PluginTrainer):
    #   compute_stage(name, train_data, valid_data, logger) -> the product (with save(path) when cached)
    #   load_stage(name, path, train_data, meta) -> a stored product, checked against this run (cached stages)
    #   set_stage_result(name, product, path, reused): take it, computed or loaded from path
    def stage_meta(self, name, product):
        """What the cache keeps beside a compute stage's product (json values)."""
        return {}

    # ---- the backbone ----------------------------------------------------------------------------------
    def build_backbone(self, config, dataset):
        """The RecBole model named by ``backbone`` on this dataset, and its adapter."""
        self.backbone_name = config["backbone"]
        self.backbone = get_model(self.backbone_name)(config, dataset)
        self.adapter = BackboneAdapter(self.backbone, self.backbone_name)
        self.frozen = False

    def freeze_backbone(self):
        self.adapter.freeze()
        self.frozen = True

    def train(self, mode=True):
        super().train(mode)
        if getattr(self, "frozen", False):
            self.backbone.eval()  # RecBole's trainer calls model.train() every epoch; dropout stays off
        return self

    @contextmanager
    def evaluating(self, mode):
        """Score with another of ``EVAL_MODES`` inside the block (e.g. the backbone alone)."""
        if mode not in self.EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {self.EVAL_MODES}, got '{mode}'.")
        saved, self.eval_mode = self.eval_mode, mode
        try:
            yield self
        finally:
            self.eval_mode = saved


def is_plugin(model_class):
    """A model built around a backbone (a :class:`PluginRecommender`)."""
    return isinstance(model_class, type) and issubclass(model_class, PluginRecommender)


def sequential_model_names():
    """Models a plugin can take as its backbone: RecBole's sequential models and ours that are not plugins."""
    pkg = importlib.import_module("recbole.model.sequential_recommender")
    names = [
        name
        for name in dir(pkg)
        if isinstance(getattr(pkg, name), type)
        and getattr(getattr(pkg, name), "type", None) == ModelType.SEQUENTIAL
        and hasattr(getattr(pkg, name), "calculate_loss")
    ]
    for name in our_model_names():
        model = get_model(name)
        if model.type == ModelType.SEQUENTIAL and not is_plugin(model):
            names.append(name)
    return sorted(set(names))


def plugin_names():
    """Our plugins' names, in the registry's order."""
    return [name for name in our_model_names() if is_plugin(get_model(name))]
