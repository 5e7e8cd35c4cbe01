"""DiffuASRTrainer: the plugin trainer's walk (backbone, augmenter, generation) and DiffuASR's last stage:

4. a new atomic dataset with the generated items before each user's first interaction (never overwriting one);
5. a fresh backbone trained on it with RecBole's recipe, early-stopped on its validation split (the same
   targets as the original's).

Evaluation scores the original loaders' users with their generated items prepended (see
:class:`~recbole_diff.model.plugin.diffuasr.DiffuASR`); the results add the long-tail groups.
"""

import copy
import os

import torch
from recbole.data import create_dataset, data_preparation
from recbole.utils import ModelType, init_seed, set_color

from recbole_diff.data.augment import augmented_name, write_augmented_dataset
from recbole_diff.data.loaders import fast_eval_loaders
from recbole_diff.evaluation import group_metrics
from recbole_diff.model.registry import get_model
from recbole_diff.trainer.plugin import PluginTrainer
from recbole_diff.trainer.registry import get_trainer
from recbole_diff.trainer.stage_cache import stage_key
from recbole_diff.trainer.trainer import unique_checkpoint_path

# the keys that shape the generated items, recorded (hashed) in the augmented dataset's name
_DIFFUSION_SETTINGS = (
    "embedding_init",
    "freeze_embedding",
    "condition",
    "p_uncond",
    "diffusion_steps",
    "noise_schedule",
    "eta",
    "diffusion_embedding_size",
    "unet_channels",
    "unet_res_blocks",
    "unet_dropout",
    "augmenter_epochs",
    "augmenter_train_steps",
    "augmenter_learning_rate",
    "augmenter_batch_size",
    "augmenter_min_raw",
    "classifier_logprob",
    "x0_scale",
    "clip_x0",
)


class DiffuASRTrainer(PluginTrainer):
    # ---- the last stage: the augmented dataset and the backbone on it ----------------------------------
    def fit_final(self, stage, train_data, valid_data, flags, callback_fn=None):
        name, root = self.augmented_location()
        users = self.model.generated_users
        if self.model.generation_reused and os.path.isdir(os.path.join(root, name)):
            self.info["augmented_dataset"] = os.path.join(root, name)  # written (atomically) from these items
            self.logger.info(
                set_color(f"resume_dir: using the augmented dataset {root}/{name} an earlier attempt wrote", "green")
            )
        else:
            self.write_dataset(train_data.dataset, self.model.prefix[users.to(self.model.prefix.device)].cpu(), users)
        score, result = self.train_on_augmented(name, root, train_data.dataset, **flags)
        self.best_valid_score, self.best_valid_result = score, result
        if flags["saved"]:
            self._save_checkpoint(0, verbose=flags["verbose"])
        return score, result

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
        path = write_augmented_dataset(
            c["data_path"],
            c["dataset"],
            root,
            name,
            list(user_tokens),
            [list(row) for row in item_tokens],
            uid,
            iid,
            train_dataset.time_field,
        )
        self.logger.info(set_color(f"DiffuASR: wrote the augmented dataset {path}", "green"))
        self.info["augmented_dataset"] = path
        return name, root

    def augmented_location(self):
        """(name, root) of this run's augmented dataset; the name records what made it."""
        c = self.config
        settings = {k: c[k] for k in ("exclude_history", "MAX_ITEM_LIST_LENGTH", "generation_batch_size")}
        if c["augmenter"] == "diffusion":
            settings.update({k: c[k] for k in _DIFFUSION_SETTINGS})
            # the backbone shapes what is generated (item space, classifier): two runs that differ only there
            # must not collide on one name
            settings["backbone"] = c["backbone_checkpoint"] or stage_key(c, self.model.backbone_name)["config"]
        name = augmented_name(
            c["dataset"],
            self.model.backbone_name,
            c["augmenter"],
            self.model.m,
            c["seed"],
            c["guide"],
            float(c["guidance_scale"]),
            c["sample_steps"],
            c["sampler"],
            settings,
        )
        return name, c["augmented_data_path"] or os.path.join(c["checkpoint_dir"], "augmented")

    def train_on_augmented(self, name, root, train_dataset, verbose=True, saved=True, show_progress=False):
        config = self.augmented_config(name, root)
        dataset = create_dataset(config)
        train, valid, _ = data_preparation(config, dataset)
        (valid,) = fast_eval_loaders(config, valid)
        iid = train_dataset.iid_field
        if dataset.item_num != train_dataset.item_num:
            raise ValueError(
                f"The augmented dataset has {dataset.item_num} items, the original "
                f"{train_dataset.item_num}; a filter in the config removed items. Drop it for DiffuASR."
            )
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

    def extra_results(self, valid_data=None, test_data=None):
        """The plugin's results, and the test metrics by user group of sequence length (``long_tail_bounds``)."""
        out = super().extra_results(valid_data, test_data)
        if test_data is not None and self.model.sequences is not None:
            lengths = self.model.sequences.lengths + 2  # the user's whole original sequence (valid and test too)
            bounds = tuple(self.config["long_tail_bounds"])
            out["long_tail_result"] = group_metrics(self, test_data, lengths, bounds)
            with self.model.evaluating("backbone"):
                out["backbone_long_tail_result"] = group_metrics(self, test_data, lengths, bounds)
        return out
