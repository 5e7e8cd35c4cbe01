"""DiffuASRTrainer: the whole augmentation pipeline in ``fit``.

1. the backbone on the original data (RecBole's recipe, or ``backbone_checkpoint``): the baseline, the
   classifier of ``guide: cg`` and the item space of ``embedding_init: backbone``;
2. the augmenter on (S_aug, S_raw) pairs of training sequences (``augmenter: diffusion``);
3. M items for every user, conditioned on the training part only;
4. a new atomic dataset with those items before each user's first interaction (never overwriting one);
5. a fresh backbone trained on it with RecBole's recipe, early-stopped on its validation split (the same
   targets as the original's).

Evaluation scores the original loaders' users with their generated items prepended (see
:class:`~recbole_diff.model.plugin.diffuasr.DiffuASR`).
"""
import copy
import math
import os
import time

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import ModelType, init_seed, set_color
from tqdm import tqdm

from recbole_diff.data.augment import (
    augmented_name,
    augmenter_users,
    history_mask,
    random_prefix,
    random_seq_prefix,
    training_sequences,
    write_augmented_dataset,
)
from recbole_diff.evaluation import group_metrics
from recbole_diff.io import load_checkpoint
from recbole_diff.model.registry import get_model
from recbole_diff.trainer.backbone import BackboneStageMixin
from recbole_diff.trainer.registry import get_trainer
from recbole_diff.trainer.resume import plain_settings, point_name, resume_point, rng_state, run_settings, set_rng_state
from recbole_diff.trainer.settings import data_files
from recbole_diff.trainer.stage_cache import shared_stage, stage_key
from recbole_diff.trainer.trainer import Trainer, unique_checkpoint_path

# keys read only when the trained augmenter is sampled or its items are used: runs that differ in these alone
# (a grid's samplers, step counts, guidance strengths) share one augmenter through ``stage_cache``
SAMPLING_KEYS = frozenset({
    "gamma", "guide", "p_uncond", "sampler", "sample_steps", "eta", "classifier_logprob", "clip_x0",
    "exclude_history", "generation_batch_size", "augmented_data_path", "eval_mode", "long_tail_bounds",
})


# raised whenever what the augmenter's training does changes while its weights keep their shapes, so that a
# stored augmenter of older code is not loaded as if it were this code's
AUGMENTER_STAGE_VERSION = 1


def augmenter_stage_key(config):
    """What makes two runs' augmenters the same model: every other setting (the backbone's too, since its item
    table is the augmenter's), the data files, and the condition dropout, the one thing ``guide`` changes in
    training (``cf`` drops the condition with ``p_uncond``; ``cg`` and ``none`` train the same network)."""
    values = {k: v for k, v in plain_settings(config).items() if k not in SAMPLING_KEYS}
    values["condition_dropout"] = float(config["p_uncond"]) if config["guide"] == "cf" else 0.0
    # the backbone's whole key (a backbone may read a key named like a sampling one, e.g. KSR's gamma)
    values["backbone_stage"] = config["backbone_checkpoint"] or stage_key(config, config["backbone"])["config"]
    values["version"] = AUGMENTER_STAGE_VERSION
    return {"stage_model": "DiffuASR-augmenter", "config": values, "data_files": data_files(config)}


class DiffuASRTrainer(BackboneStageMixin, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.backbone_checkpoint = config["backbone_checkpoint"]
        self.backbone_valid_result = None
        self.sequences = None
        self.info = {}

    # ---- stage 2: the augmenter --------------------------------------------------------------------------
    def prepare_augmenter(self, sequences, show_progress=False):
        """Train the augmenter, or load the one an earlier run with the same training settings stored in
        ``stage_cache``."""
        model = self.model
        key = augmenter_stage_key(self.config) if self.config["stage_cache"] else None  # hashes the data files
        with shared_stage(self.config, "DiffuASR-augmenter", None, self.logger, key=key) as stage:
            if stage.hit:
                if self.config["embedding_init"] == "backbone":
                    model.init_embedding_from_backbone()  # the table's requires_grad, as training leaves it
                state = load_checkpoint(stage.path, self.device)
                # a frozen table is the backbone's, stored with the backbone and not again (see below)
                state.setdefault("embedding.weight", model.augmenter.embedding.weight.detach().clone())
                model.augmenter.load_state_dict(state)
                model.augmenter.eval()
                # this run spent no time on it: cost tables would count the training twice
                self.info.update(augmenter_final_loss=stage.meta["augmenter_final_loss"], augmenter_seconds=0.0,
                                 augmenter_trained_seconds=stage.meta["augmenter_seconds"], augmenter_stage=stage.path)
                return
            point = None
            if stage.folder is not None and self.resume_dir:  # beside the stage: whichever run claims it goes on
                dataset = os.path.basename(str(self.config["dataset"]))
                settings = dict(key["config"], data_files=key["data_files"])
                point = resume_point(stage.resume_dir, f"DiffuASR-augmenter-{dataset}", settings)
            self.train_augmenter(sequences, show_progress, point if point is not None else self._point("augmenter"))
            if stage.folder is not None:
                tmp = f"{stage.path}.{os.getpid()}.src"
                torch.save(self._augmenter_weights(), tmp)
                try:
                    stage.store(tmp, augmenter_seconds=self.info["augmenter_seconds"],
                                augmenter_final_loss=self.info["augmenter_final_loss"])
                finally:
                    os.remove(tmp)

    def _augmenter_weights(self):
        """The augmenter's weights to store: without the item table when it is the backbone's, frozen (on a
        large catalogue it is ~90% of the file: sports' 18.4k x 64 table against the SU-Net's ~135k weights)."""
        state = self.model.augmenter.state_dict()
        if self.config["embedding_init"] == "backbone" and self.config["freeze_embedding"]:
            del state["embedding.weight"]
        return state

    def train_augmenter(self, sequences, show_progress=False, point=None):
        """The eps-loss training; ``point``: its resume point (default: the run's own, under ``resume_dir``)."""
        model, c = self.model, self.config
        aug = model.augmenter
        if c["embedding_init"] == "backbone":
            model.init_embedding_from_backbone()
        users = augmenter_users(sequences, model.m, int(c["augmenter_min_raw"]))
        if len(users) == 0:
            raise ValueError(f"DiffuASR: no user has M + augmenter_min_raw = {model.m + int(c['augmenter_min_raw'])} "
                             "training items to learn from; lower M or augmenter_min_raw.")
        self.logger.info(set_color(f"DiffuASR: training the augmenter on {len(users)} sequences "
                                   f"(first {model.m} items generated from the rest)", "green"))
        opt = torch.optim.Adam([p for p in aug.parameters() if p.requires_grad], lr=float(c["augmenter_learning_rate"]))
        batch, epochs = int(c["augmenter_batch_size"]), int(c["augmenter_epochs"])
        if c["augmenter_steps"]:  # a budget in updates: an epoch of a small dataset is one or two of them
            epochs = math.ceil(int(c["augmenter_steps"]) / math.ceil(len(users) / batch))
        point = point if point is not None else self._point("augmenter")
        first, total = self._resume_augmenter(point, opt)
        aug.train()
        start = time.perf_counter()
        bar = range(first, epochs)
        if show_progress:
            bar = tqdm(bar, ncols=100, desc=set_color("DiffuASR augmenter", "pink"), initial=first, total=epochs)
        for epoch in bar:
            if point is not None and epoch > first:
                point.save(epoch=epoch, augmenter=aug.state_dict(), optimizer=opt.state_dict(), total=total,
                           rng=rng_state())
            total, order = 0.0, users[torch.randperm(len(users))]
            for lo in range(0, len(order), batch):
                b = order[lo:lo + batch]
                flat, offsets = sequences.bags(b, start=model.m)
                loss = aug.loss(sequences.heads(b, model.m).to(self.device), flat.to(self.device), offsets.to(self.device))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:
                self.logger.info(f"DiffuASR augmenter epoch {epoch}: eps loss {total / len(users):.4f}")
        aug.eval()
        self.info["augmenter_seconds"] = time.perf_counter() - start
        self.info["augmenter_final_loss"] = total / len(users)

    def _point(self, what):
        """Resume point of one of this pipeline's own stages (the trainings through ``fit`` keep theirs)."""
        return resume_point(self.resume_dir, point_name(self.config, f"DiffuASR-{what}"), run_settings(self.config))

    def _resume_augmenter(self, point, opt):
        """The epoch to start at and the running loss, from the resume point when there is one."""
        state = point.load() if point is not None else None
        if state is None:
            return 0, 0.0
        self.model.augmenter.load_state_dict(state["augmenter"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.logger.info(f"resume_dir: the augmenter goes on at epoch {state['epoch']} from {point.path}")
        return state["epoch"], state["total"]

    # ---- stage 3: generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, sequences, users=None, show_progress=False):
        """[len(users), M] generated items (this dataset's ids) for the given users (default: every user with
        training items); also writes them into ``model.prefix``."""
        model, c = self.model, self.config
        if users is None:
            users = torch.nonzero(sequences.lengths > 0).flatten()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(c["seed"]))
        cpu_gen = torch.Generator().manual_seed(int(c["seed"]))
        batch = int(c["generation_batch_size"])
        chunks = range(0, len(users), batch)
        if show_progress:
            chunks = tqdm(chunks, total=math.ceil(len(users) / batch), ncols=100,
                          desc=set_color("DiffuASR generation", "pink"))
        out = []
        start = time.perf_counter()
        for lo in chunks:
            b = users[lo:lo + batch]
            exclude = history_mask(sequences, b, model.n_items) if c["exclude_history"] else None
            if model.augmenter_kind == "random":
                items = random_prefix(b, model.m, model.n_items, cpu_gen, exclude)
            elif model.augmenter_kind == "random_seq":
                items = random_seq_prefix(sequences, b, model.m, cpu_gen)
            else:
                items = self._diffusion_prefix(sequences, b, exclude, generator)
            out.append(items.cpu())
        prefix = torch.cat(out) if out else torch.empty(0, model.m, dtype=torch.long)
        seconds = time.perf_counter() - start
        self.info.update(generation_seconds=seconds, generation_users_per_s=len(users) / max(seconds, 1e-9))
        model.prefix[users.to(model.prefix.device)] = prefix.to(model.prefix.device)
        return prefix

    def _diffusion_prefix(self, sequences, users, exclude, generator):
        model, c = self.model, self.config
        aug = model.augmenter
        flat, offsets = sequences.bags(users)
        cond = aug.condition(flat.to(self.device), offsets.to(self.device))
        log_prob = None
        if c["guide"] == "cg":
            log_prob = model.first_item_log_prob(sequences.heads(users, 1)[:, 0].to(self.device))
        x0 = aug.sample(cond, float(c["gamma"]), c["sampler"], c["sample_steps"], float(c["eta"]), log_prob, generator)
        return model.round(x0, None if exclude is None else exclude.to(self.device))

    def augmentable_users(self, sequences, valid_data):
        """Users whose leave-one-out split the prepended items cannot change: RecBole holds out
        ``min(2, rows - 1)`` rows, so a user without a validation row (3 interactions or fewer) would see a
        training target move to validation. Those users keep their original data."""
        users = torch.nonzero(sequences.lengths > 0).flatten()
        if valid_data is None:
            return users
        held = torch.zeros(len(sequences.lengths), dtype=torch.bool)
        held[valid_data.dataset.inter_feat[valid_data.dataset.uid_field]] = True
        skipped = int((~held[users]).sum())
        if skipped:
            self.logger.info(f"DiffuASR: {skipped} users without a validation item keep their original data")
        self.info["users_not_augmented"] = skipped
        return users[held[users]]

    # ---- stages 4 and 5: the augmented dataset and the backbone on it -----------------------------------
    def augmented_config(self, name, root):
        sub = copy.deepcopy(self.config)
        backbone = get_model(self.model.backbone_name)
        sub["dataset"], sub["data_path"] = name, os.path.join(root, name)
        sub["model"], sub["MODEL_TYPE"] = self.model.backbone_name, ModelType.SEQUENTIAL
        sub["MODEL_INPUT_TYPE"] = getattr(backbone, "input_type", self.config["MODEL_INPUT_TYPE"])
        return sub

    def write_dataset(self, train_dataset, prefix, users):
        name, root = self.augmented_location()
        c = self.config
        uid, iid = train_dataset.uid_field, train_dataset.iid_field
        user_tokens = train_dataset.field2id_token[uid][users.numpy()]
        item_tokens = train_dataset.field2id_token[iid][prefix.numpy()]
        path = write_augmented_dataset(c["data_path"], c["dataset"], root, name, list(user_tokens),
                                       [list(row) for row in item_tokens], uid, iid, train_dataset.time_field)
        self.logger.info(set_color(f"DiffuASR: wrote the augmented dataset {path}", "green"))
        self.info["augmented_dataset"] = path
        return name, root

    def augmented_location(self):
        """(name, root) of this run's augmented dataset; the name records what made it."""
        c = self.config
        settings = {k: c[k] for k in ("exclude_history", "MAX_ITEM_LIST_LENGTH", "generation_batch_size")}
        if c["augmenter"] == "diffusion":
            settings.update({k: c[k] for k in (
                "embedding_init", "freeze_embedding", "condition", "p_uncond", "diffusion_steps", "noise_schedule",
                "eta", "diffusion_embedding_size", "unet_channels", "unet_res_blocks", "unet_dropout",
                "augmenter_epochs", "augmenter_steps", "augmenter_learning_rate", "augmenter_batch_size",
                "augmenter_min_raw", "classifier_logprob", "x0_scale", "clip_x0")})
            # the backbone shapes what is generated (item space, classifier): two runs that differ only there
            # must not collide on one name
            settings["backbone"] = c["backbone_checkpoint"] or stage_key(c, self.model.backbone_name)["config"]
        name = augmented_name(c["dataset"], self.model.backbone_name, c["augmenter"], self.model.m, c["seed"],
                              c["guide"], float(c["gamma"]), c["sample_steps"], c["sampler"], settings)
        return name, c["augmented_data_path"] or os.path.join(c["checkpoint_dir"], "augmented")

    def train_on_augmented(self, name, root, train_dataset, verbose=True, saved=True, show_progress=False):
        config = self.augmented_config(name, root)
        dataset = create_dataset(config)
        train, valid, _ = data_preparation(config, dataset)
        iid = train_dataset.iid_field
        if dataset.item_num != train_dataset.item_num:
            raise ValueError(f"The augmented dataset has {dataset.item_num} items, the original "
                             f"{train_dataset.item_num}; a filter in the config removed items. Drop it for DiffuASR.")
        tokens = train_dataset.field2id_token[iid]
        mapping = torch.as_tensor([0] + [dataset.field2token_id[iid][t] for t in tokens[1:]], dtype=torch.long)
        self.model.item_to_final.copy_(mapping.to(self.model.item_to_final.device))
        self.logger.info(set_color(f"DiffuASR: training {self.model.backbone_name} on the augmented dataset", "green"))
        trainer = get_trainer(ModelType.SEQUENTIAL, self.model.backbone_name)(config, self.model.final)
        trainer.saved_model_file = unique_checkpoint_path(self.config, tag=f"{self.model.backbone_name}-augmented")
        # every augmenter's backbone then sees the same shuffles and dropout, whatever the earlier stages drew
        init_seed(self.config["seed"], self.config["reproducibility"])
        score, result = trainer.fit(train, valid, verbose=verbose, saved=saved, show_progress=show_progress)
        if saved:
            trainer.load_model_file()
            self.info["augmented_backbone_checkpoint"] = trainer.saved_model_file
        return score, result

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.prepare_backbone(train_data, valid_data, verbose, saved, show_progress)
        self.sequences = training_sequences(train_data.dataset)
        # the generated items are kept before the dataset is written, so that a killed run writes them (or
        # finds them written) instead of generating again and then refusing to overwrite its own dataset
        point = self._point("generated")
        resumed = self._generated_before(point)
        users = resumed if resumed is not None else self.augment(valid_data, show_progress)
        if resumed is None and point is not None:
            point.save(users=users, prefix=self.model.prefix.cpu(), info=self.info,
                       augmenter=None if self.model.augmenter is None else self.model.augmenter.state_dict())
        name, root = self.augmented_location()
        if resumed is not None and os.path.isdir(os.path.join(root, name)):
            self.info["augmented_dataset"] = os.path.join(root, name)  # written (atomically) from these items
            self.logger.info(set_color(f"resume_dir: using the augmented dataset {root}/{name} an earlier attempt "
                                       "wrote", "green"))
        else:
            self.write_dataset(train_data.dataset, self.model.prefix[users].cpu(), users)
        score, result = self.train_on_augmented(name, root, train_data.dataset, verbose, saved, show_progress)
        self.best_valid_score, self.best_valid_result = score, result
        if saved:
            self._save_checkpoint(0, verbose=verbose)
        return score, result

    def augment(self, valid_data, show_progress):
        """Stages 2-3: train the augmenter and generate (into ``model.prefix``); the users given items."""
        if self.model.augmenter is not None:
            self.prepare_augmenter(self.sequences, show_progress)
        users = self.augmentable_users(self.sequences, valid_data)
        self.logger.info(set_color(f"DiffuASR: generating {self.model.m} items for {len(users)} users "
                                   f"({self.config['augmenter']})", "green"))
        self.generate(self.sequences, users, show_progress)
        self.logger.info(f"DiffuASR: {self.info['generation_users_per_s']:.1f} users/s")
        return users

    def _generated_before(self, point):
        """The users an earlier, killed attempt of these settings generated items for, with the items back in
        ``model.prefix`` (and the augmenter's weights, for this run's checkpoint); None when there is none."""
        state = point.load() if point is not None else None
        if state is None:
            return None
        self.model.prefix.copy_(state["prefix"].to(self.model.prefix.device))
        if state["augmenter"] is not None:
            self.model.augmenter.load_state_dict(state["augmenter"])
        self.info.update(state["info"])
        self.logger.info(f"resume_dir: the generated items of an earlier attempt, from {point.path}")
        return state["users"]

    def extra_results(self, valid_data=None, test_data=None):
        out = {"backbone": self.model.backbone_name, "backbone_checkpoint": self.backbone_checkpoint,
               "backbone_best_valid_result": self.backbone_valid_result, **self.info}
        if test_data is not None:
            with self.model.evaluating("backbone"):
                out["backbone_test_result"] = super().evaluate(test_data, load_best_model=False)
            if self.sequences is not None:
                lengths = self.sequences.lengths + 2  # the user's whole original sequence (valid and test too)
                bounds = tuple(self.config["long_tail_bounds"])
                out["long_tail_result"] = group_metrics(self, test_data, lengths, bounds)
                with self.model.evaluating("backbone"):
                    out["backbone_long_tail_result"] = group_metrics(self, test_data, lengths, bounds)
        return out
