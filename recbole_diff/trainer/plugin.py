"""PluginTrainer: the one trainer of every :class:`~recbole_diff.model.plugin.base.PluginRecommender`.

``fit`` walks the plugin's stages in order (``model.stages()``):

* ``backbone`` / ``model``: loaded from ``<stage>_checkpoint`` (checked to hold that model on this dataset), else
  from ``stage_cache``, else trained by the stage model's own RecBole trainer (and stored in the cache);
* ``fit``: the plugin's stage parameters trained through RecBole's ``Trainer.fit``, stored in the cache when
  the stage allows it;
* ``compute``: what the next stages read, kept in the stage cache, beside the checkpoint of the model stage it
  is computed from, or in a resume point (``resume_dir``).

After each stage the random generators restart from the run's seed, so the next stage draws the same numbers
whether this one was trained or loaded. The last stage is the run's own training (a ``fit`` stage on this
trainer): its best checkpoint and validation result are the run's. A stage that only a later stage reads
(``Stage.only_for``) is not trained when that stage is stored already: a new machine resumes from the latest
stored stage.
"""

import hashlib
import json
import math
import os
import time

import torch
from recbole.data.dataloader import UserDataLoader
from recbole.utils import ModelType, init_seed, set_color

from recbole_diff.config import stage_config
from recbole_diff.io import load_checkpoint
from recbole_diff.model.plugin.base import COMPUTE_HOOKS, STAGE_KEYS, is_plugin
from recbole_diff.model.registry import get_model
from recbole_diff.trainer.registry import get_trainer
from recbole_diff.trainer.resume import plain_settings, point_name, resume_point, run_settings
from recbole_diff.trainer.settings import data_files, plain
from recbole_diff.trainer.stage_cache import Stage as CacheEntry
from recbole_diff.trainer.stage_cache import claim_or_wait, shared_stage, stage_key
from recbole_diff.trainer.trainer import Trainer, unique_checkpoint_path

# a built RecBole trainer's attribute for each training key a stage may set
_TRAINER_ATTRS = ("epochs", "learning_rate", "weight_decay", "stopping_step", "eval_step", "learner")


def stage_overrides(config, stage):
    """``{RecBole key: value}`` from the ``<stage>_<key>`` keys that are set (see ``STAGE_KEYS``)."""
    return {
        key: config[stage.key(suffix)] for suffix, key in STAGE_KEYS.items() if config[stage.key(suffix)] is not None
    }


def apply_stage_keys(trainer, overrides, params):
    """A built RecBole trainer set to a stage's training keys, its optimiser rebuilt over ``params``."""
    for attr in _TRAINER_ATTRS:
        if attr in overrides:
            setattr(trainer, attr, overrides[attr])
    trainer.eval_step = min(trainer.eval_step, trainer.epochs)
    trainer.optimizer = trainer._build_optimizer(params=params)
    return trainer


def _digest(value):
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=plain).encode()).hexdigest()[:12]


def check_stages(model):
    """A plugin's stage list, checked before anything trains: some stages, and the methods its compute stages
    need."""
    name = type(model).__name__
    if not model.stages():
        raise ValueError(f"{name} declares no stages: list them in STAGES (recbole_diff/model/plugin/base.py).")
    for stage in model.stages():
        if stage.kind != "compute":
            continue
        hooks = COMPUTE_HOOKS if stage.cache else tuple(h for h in COMPUTE_HOOKS if h != "load_stage")
        missing = [hook for hook in hooks if not callable(getattr(model, hook, None))]
        if missing:
            raise ValueError(
                f"{name} declares the compute stage '{stage.name}' but does not define {', '.join(missing)}."
            )


class StageTrainer(Trainer):
    """The trainer of a ``fit`` stage before the last one: the plugin's stage parameters, the stage's keys."""

    def __init__(self, config, model, stage):
        self.stage = stage
        super().__init__(config, model)
        self.point_kind = f"{type(model).__name__}-{stage.name}"
        apply_stage_keys(self, stage_overrides(config, stage), model.stage_parameters(stage.name))

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """No file per epoch: a stage without validation ends with its last epoch's weights, in the model (and,
        with ``resume_dir``, in its resume point)."""


class PluginTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        check_stages(model)
        self.final = model.stages()[-1]
        if self.final.kind != "fit":
            raise ValueError(
                f"{type(model).__name__}: the last stage is the run's own training and must be a 'fit' "
                f"stage, got '{self.final.kind}'."
            )
        apply_stage_keys(self, stage_overrides(config, self.final), model.stage_parameters(self.final.name))
        self.checkpoints = {}  # stage name -> the checkpoint it was loaded from or trained into
        self.valid_results = {}  # stage name -> its best validation result
        self.stage_trainers = {}  # model stages' trainers (their test results are reported)
        self.info = {}  # what the stages report, for the result dict
        self.optimiser_steps = 0  # of the last stage

    # ---- the walk ----------------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        flags = dict(verbose=verbose, saved=saved, show_progress=show_progress)
        *before, final = [s for s in self.model.stages() if not self.model.skip_stage(s.name)]
        stored = {s.name for s in before if s.cache and self.stored(s)}
        for stage in before:
            self._run(stage, train_data, valid_data, flags, stage.only_for is None or stage.only_for not in stored)
        self.model.set_stage(final.name)
        return self.fit_final(final, train_data, valid_data, flags, callback_fn)

    def run_stage(self, name, train_data, valid_data=None, verbose=True, saved=True, show_progress=False):
        """Run the stage ``name`` (one before the last) on its own: ``fit`` runs them all in order; benchmarks
        that time or vary one stage run them one by one."""
        stages = {s.name: s for s in self.model.stages()[:-1]}
        if name not in stages:
            raise ValueError(
                f"{type(self.model).__name__} has no stage '{name}' before its last; its stages: "
                f"{', '.join(s.name for s in self.model.stages())}."
            )
        self._run(stages[name], train_data, valid_data, dict(verbose=verbose, saved=saved, show_progress=show_progress))

    def _run(self, stage, train_data, valid_data, flags, needed=True):
        self.model.set_stage(stage.name)
        getattr(self, f"_{stage.kind}_stage")(stage, train_data, valid_data, flags, needed)
        init_seed(self.config["seed"], self.config["reproducibility"])

    def fit_final(self, stage, train_data, valid_data, flags, callback_fn=None):
        """The run's own training: the last stage, on this trainer."""
        return self.train_final(self.stage_loader(stage, train_data), valid_data, flags, callback_fn)

    def train_final(self, loader, valid_data, flags, callback_fn=None):
        """RecBole's ``fit`` (with resume points) of this trainer on the last stage's loader."""
        return Trainer.fit(self, loader, valid_data, callback_fn=callback_fn, **flags)

    def stage_loader(self, stage, train_data):
        return self.set_step_budget(stage, self.model.stage_data(stage.name, train_data, self.logger), self)

    def set_step_budget(self, stage, loader, trainer):
        """``<stage>_train_steps``, when set, is the stage's budget in optimiser steps instead of epochs (an epoch of a
        small dataset is one or two of them)."""
        steps = self.config[stage.key("train_steps")]
        if steps:
            trainer.epochs = math.ceil(int(steps) / max(len(loader), 1))
            trainer.eval_step = min(trainer.eval_step, trainer.epochs)
        return loader

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        loss = super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        self.optimiser_steps += len(train_data)
        return loss

    def _restore(self, state, train_data):
        super()._restore(state, train_data)
        self.optimiser_steps = state["epoch"] * len(train_data)

    # ---- backbone and model stages -----------------------------------------------------------------------
    def stage_model_name(self, stage):
        return self.model.backbone_name if stage.kind == "backbone" else stage.model

    def stage_model_config(self, stage):
        """The config a ``backbone`` or ``model`` stage trains with: the run's for the backbone; for another model,
        the run's with that model's yamls on top, then ``<stage>: {key: value}`` and the ``<stage>_<key>`` keys,
        then what the plugin fixes (``stage_config_overrides``)."""
        if stage.kind == "backbone":
            return self.config
        overrides = dict(self.config[stage.name] or {})
        for key, value in stage_overrides(self.config, stage).items():
            overrides.setdefault(key, value)
        overrides.update(self.model.stage_config_overrides(stage.name))
        return stage_config(self.config, stage.model, overrides)

    def _entry(self, stage, config=None):
        """The stage's place in the cache (without claiming it)."""
        config = config or self.stage_model_config(stage)
        name = self.stage_model_name(stage)
        label = f"{name}-backbone" if stage.kind == "backbone" else name
        return label, name, config

    def _backbone_stage(self, stage, train_data, valid_data, flags, needed=True):
        self._model_stage(stage, train_data, valid_data, flags, needed)
        self.model.freeze_backbone()

    def _model_stage(self, stage, train_data, valid_data, flags, needed=True):
        label, name, config = self._entry(stage)
        if stage.kind == "backbone":
            module = self.model.backbone
            trainer = get_trainer(ModelType.SEQUENTIAL, name)(config, module)
        else:
            module = get_model(name)(config, train_data.dataset).to(self.device)
            trainer = get_trainer(config["MODEL_TYPE"], name)(config, module)
        given = self.config[stage.key("checkpoint")]
        if given:
            self.load_stage_model(stage, module, given)
            checkpoint = given
        else:
            with shared_stage(config, label, name, self.logger) as entry:
                if entry.hit:
                    self.load_stage_model(stage, module, entry.path)
                    checkpoint, self.valid_results[stage.name] = entry.path, entry.meta.get("valid_result")
                elif not needed:
                    self.logger.info(
                        f"{type(self.model).__name__}: stage '{stage.name}' is not needed (the stage "
                        f"'{stage.only_for}' is stored)"
                    )
                    return
                else:
                    entry.trainer(trainer)
                    checkpoint = self._train_stage_model(stage, trainer, train_data, valid_data, flags)
                    if checkpoint and entry.store(
                        checkpoint, drop=("optimizer",), valid_result=self.valid_results[stage.name]
                    ):
                        checkpoint = entry.path if stage.kind == "model" else checkpoint
        self.checkpoints[stage.name] = checkpoint
        if stage.kind == "model":
            module.eval()
            self.stage_trainers[stage.name] = trainer
            self.model.set_stage_model(stage.name, module)

    def _train_stage_model(self, stage, trainer, train_data, valid_data, flags):
        name = self.stage_model_name(stage)
        self.logger.info(
            set_color(
                f"{type(self.model).__name__}: training {name} (stage '{stage.name}') with RecBole's recipe", "green"
            )
        )
        if stage.kind == "backbone":
            overrides = stage_overrides(self.config, stage)
            if overrides:
                apply_stage_keys(trainer, overrides, trainer.model.parameters())
            loader = train_data
        elif getattr(get_model(name), "dataloader_as", None) == "DiffRec":  # RecBole feeds DiffRec by user
            loader = UserDataLoader(trainer.config, train_data.dataset, None, shuffle=True)
        else:
            loader = train_data
        trainer.saved_model_file = unique_checkpoint_path(self.config, tag=f"{name}-{stage.name}")
        _, self.valid_results[stage.name] = trainer.fit(loader, valid_data, **flags)
        if not flags["saved"]:
            return None
        trainer.load_model_file()
        return trainer.saved_model_file

    def load_stage_model(self, stage, module, path):
        """Load ``path`` into ``module`` after checking that it holds the stage's model on this dataset (a
        plugin's checkpoint gives its backbone)."""
        name, key = self.stage_model_name(stage), stage.key("checkpoint")
        self.logger.info(
            set_color(f"{type(self.model).__name__}: loading {name} (stage '{stage.name}') from {path}", "green")
        )
        checkpoint = load_checkpoint(path, self.device)
        saved = checkpoint["config"]
        plugin = is_plugin(get_model(saved["model"]))
        trained_for = saved["backbone"] if plugin else saved["model"]
        if trained_for != name or str(saved["dataset"]) != str(self.config["dataset"]):
            raise ValueError(
                f"{key} '{path}' holds a {trained_for} trained on '{saved['dataset']}', but this run "
                f"needs a {name} on '{self.config['dataset']}'."
            )
        state = checkpoint["state_dict"]
        if plugin and any(k.startswith("backbone.") for k in state):  # a plugin run's checkpoint: its backbone
            state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        own = module.state_dict()
        bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise ValueError(
                f"{key} '{path}' does not match this dataset/config: '{bad[0]}' differs (item count, "
                "hidden size or sequence length changed?)."
            )
        module.load_state_dict(state)

    # ---- fit stages before the last ----------------------------------------------------------------------
    def fit_stage_key(self, stage):
        """What makes two runs' ``fit`` stage the same: every setting but those only later stages read
        (``stage_ignores``), the backbone's stage, the data files and the plugin's additions (``stage_settings``)."""
        ignored = self.model.stage_ignores(stage.name)
        values = {k: v for k, v in plain_settings(self.config).items() if k not in ignored}
        values.update(self.model.stage_settings(stage.name))
        if hasattr(self.model, "backbone_name"):
            values["backbone_stage"] = (
                self.config["backbone_checkpoint"] or stage_key(self.config, self.model.backbone_name)["config"]
            )
        return {
            "stage_model": f"{type(self.model).__name__}-{stage.name}",
            "config": values,
            "data_files": data_files(self.config),
        }

    def _fit_stage(self, stage, train_data, valid_data, flags, needed=True):
        key = self.fit_stage_key(stage) if stage.cache and self.config["stage_cache"] else None
        label = f"{type(self.model).__name__}-{stage.name}"
        with shared_stage(self.config, label, None, self.logger, key=key) as entry:
            if entry.hit:
                self.model.load_stage_state(stage.name, load_checkpoint(entry.path, self.device))
                # this run spent no time on it: cost tables would count the training twice
                self.info.update(
                    {
                        f"{stage.name}_seconds": 0.0,
                        f"{stage.name}_stage": entry.path,
                        f"{stage.name}_trained_seconds": entry.meta[f"{stage.name}_seconds"],
                        f"{stage.name}_final_loss": entry.meta[f"{stage.name}_final_loss"],
                    }
                )
                return
            loader = self.model.stage_data(stage.name, train_data, self.logger)  # may freeze parameters: first
            trainer = StageTrainer(self.config, self.model, stage)
            self.set_step_budget(stage, loader, trainer)
            entry.trainer(trainer)  # its resume point beside the stage: whichever run claims it goes on
            trainer.saved_model_file = unique_checkpoint_path(self.config, tag=stage.name)
            self.logger.info(
                set_color(
                    f"{type(self.model).__name__}: training its {stage.name} ({len(loader)} "
                    f"optimiser steps an epoch, {trainer.epochs} epochs)",
                    "green",
                )
            )
            start = time.perf_counter()
            trainer.fit(loader, None, **flags)
            self.model.eval()
            last = trainer.train_loss_dict.get(trainer.epochs - 1)
            meta = {
                f"{stage.name}_seconds": time.perf_counter() - start,
                f"{stage.name}_final_loss": None if last is None else last / max(len(loader), 1),
            }
            self.info.update(meta)
            if entry.folder is not None:
                tmp = f"{entry.path}.{os.getpid()}.src"
                torch.save(self.model.stage_state(stage.name), tmp)
                try:
                    entry.store(tmp, **meta)
                finally:
                    os.remove(tmp)

    # ---- compute stages ----------------------------------------------------------------------------------
    def source_stage(self, stage):
        """The model stage a compute stage is computed from (the nearest one before it), or None."""
        source = None
        for s in self.model.stages():
            if s.name == stage.name:
                return source
            if s.kind in ("backbone", "model"):
                source = s
        return None

    def compute_cache_key(self, stage):
        """The stage-cache key of a compute stage, or None when it is not kept there: the key of the model stage
        it is computed from plus the settings only it reads. A model given as ``<stage>_checkpoint`` is not
        described by its key: what is computed from it goes beside that file instead."""
        source = self.source_stage(stage)
        if (
            not (stage.cache and self.config["stage_cache"] and source is not None)
            or self.config[source.key("checkpoint")]
        ):
            return None
        _, name, config = self._entry(source)
        key = stage_key(config, name)
        key["stage_model"] = f"{type(self.model).__name__}-{stage.name}"
        key["store"] = self.model.stage_settings(stage.name)
        return key

    def _compute_stage(self, stage, train_data, valid_data, flags, needed=True):
        key = self.compute_cache_key(stage)
        if key is not None:
            with shared_stage(
                self.config, f"{type(self.model).__name__}-{stage.name}", None, self.logger, key=key
            ) as entry:
                if entry.hit:
                    product = self.model.load_stage(stage.name, entry.path, train_data, entry.meta)
                    self.model.set_stage_result(stage.name, product, entry.path, reused=True)
                    return
                product = self.model.compute_stage(stage.name, train_data, valid_data, self.logger)
                path = None
                if flags["saved"]:
                    tmp = f"{entry.path}.{stage.name}-{os.getpid()}"
                    product.save(tmp)
                    if entry.store(tmp, **self.model.stage_meta(stage.name, product)):
                        path = entry.path
                    os.remove(tmp)
                self.model.set_stage_result(stage.name, product, path, reused=False)
            return
        source = self.source_stage(stage)
        checkpoint = self.checkpoints.get(source.name) if stage.cache and source is not None else None
        if checkpoint and flags["saved"]:
            self._compute_beside(stage, train_data, valid_data, checkpoint)
        elif self.resume_dir and flags["saved"]:
            self._compute_in_point(stage, train_data, valid_data)
        else:
            product = self.model.compute_stage(stage.name, train_data, valid_data, self.logger)
            self.model.set_stage_result(stage.name, product, None, reused=False)

    def _compute_beside(self, stage, train_data, valid_data, checkpoint):
        """Runs sharing a model stage's checkpoint share what is computed from it: one computes it, the others
        wait for it and load it."""
        settings = dict(self.model.stage_settings(stage.name), dataset=os.path.basename(str(self.config["dataset"])))
        path = f"{os.path.splitext(checkpoint)[0]}.{stage.name}-{_digest(settings)}.pth"
        mine = claim_or_wait(path + ".lock", lambda: os.path.isfile(path), self.logger, f"{stage.name} {path}")
        try:
            if not mine:
                self.model.set_stage_result(
                    stage.name, self.model.load_stage(stage.name, path, train_data, None), path, reused=True
                )
                return
            product = self.model.compute_stage(stage.name, train_data, valid_data, self.logger)
            product.save(path)
            self.model.set_stage_result(stage.name, product, path, reused=False)
        finally:
            if mine:
                os.remove(path + ".lock")

    def _compute_in_point(self, stage, train_data, valid_data):
        """A stage computed per run, kept in the run's resume point so that a killed run does not compute it
        again."""
        point = resume_point(
            self.resume_dir,
            point_name(self.config, f"{type(self.model).__name__}-{stage.name}"),
            run_settings(self.config),
        )
        state = point.load()
        if state is not None:
            self.logger.info(f"resume_dir: stage '{stage.name}' of an earlier attempt, from {point.path}")
            self.model.set_stage_result(stage.name, state["product"], point.path, reused=True)
            return
        product = self.model.compute_stage(stage.name, train_data, valid_data, self.logger)
        point.save(product=product)
        self.model.set_stage_result(stage.name, product, None, reused=False)

    # ---- what is stored already ------------------------------------------------------------------------------
    def stored(self, stage):
        """Whether ``stage`` can be loaded without training: given as a checkpoint or in the stage cache."""
        if stage.kind in ("backbone", "model"):
            if self.config[stage.key("checkpoint")]:
                return True
            label, name, config = self._entry(stage)
            return bool(config["stage_cache"]) and CacheEntry(config["stage_cache"], label, config, name)._load()
        if stage.kind == "compute":
            key = self.compute_cache_key(stage)
        else:
            key = self.fit_stage_key(stage) if self.config["stage_cache"] else None
        if key is None:
            return False
        return CacheEntry(
            self.config["stage_cache"], f"{type(self.model).__name__}-{stage.name}", self.config, None, key=key
        )._load()

    # ---- results -----------------------------------------------------------------------------------------
    def extra_results(self, valid_data=None, test_data=None):
        """Each stage's checkpoint (and validation result), the backbone alone and each model stage on the test
        split, the last stage's optimiser steps and what the stages reported."""
        out = {}
        if hasattr(self.model, "backbone_name"):
            out["backbone"] = self.model.backbone_name
        for stage in self.model.stages():
            if stage.kind == "backbone":
                out["backbone_checkpoint"] = self.checkpoints.get(stage.name)
                out["backbone_best_valid_result"] = self.valid_results.get(stage.name)
            elif stage.kind == "model":
                out[stage.key("checkpoint")] = self.checkpoints.get(stage.name)
                if stage.name in self.stage_trainers and test_data is not None:
                    out[stage.key("test_result")] = self.stage_trainers[stage.name].evaluate(
                        test_data, load_best_model=False
                    )
        if self.optimiser_steps:  # the last stage trained on this trainer (DiffuASR's trains in its own)
            out[self.final.key("steps_trained")] = self.optimiser_steps
        if test_data is not None and "backbone" in self.model.EVAL_MODES:
            with self.model.evaluating("backbone"):
                out["backbone_test_result"] = self.evaluate(test_data, load_best_model=False)
        out.update(self.info)
        out.update(self.model.stage_info)
        return out
