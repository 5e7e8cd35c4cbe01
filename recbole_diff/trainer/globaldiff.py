"""GlobalDiffTrainer: backbone stage (RecBole's own recipe, or a checkpoint), then the diffusion stage on the
frozen backbone through RecBole's ``Trainer.fit``, then backbone-alone and ensemble results on one split.

The diffusion stage stops and picks its checkpoint on the diffusion model's own validation signal (its ranking
alone, ``diffusion_valid_signal: diffusion_only``): the ensemble's score is dominated by the frozen backbone and
hardly moves while the diffusion model still learns, so stopping on it ended training after a few dozen steps.
The ensemble's validation is still logged at every validation and is the run's ``best_valid_result`` (at the
checkpoint the diffusion signal chose)."""
import math

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import dict2str, set_color

from recbole_diff.trainer.backbone import BackboneStageMixin
from recbole_diff.trainer.trainer import Trainer

VALID_SIGNALS = ("diffusion_only", "ensemble")


def validation_subset(valid_data, n_users, seed):
    """``valid_data`` restricted to ``n_users`` of its rows drawn with ``seed`` (in their order), or itself when
    it has no more rows than that or is not a full-ranking loader."""
    dataset = valid_data._dataset
    if not n_users or n_users >= len(dataset) or not isinstance(valid_data, FullSortEvalDataLoader):
        return valid_data
    generator = torch.Generator().manual_seed(int(seed))
    rows = torch.sort(torch.randperm(len(dataset), generator=generator)[:int(n_users)]).values
    subset = dataset.copy(dataset.inter_feat[rows])
    return FullSortEvalDataLoader(valid_data.config, subset, valid_data._sampler, shuffle=False)


class GlobalDiffTrainer(BackboneStageMixin, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        # RecBole's epochs/learning_rate keys belong to the backbone's recipe; the diffusion stage has its own.
        self.epochs = config["diffusion_epochs"]
        self.stopping_step = config["diffusion_stopping_step"]
        self.valid_signal = config["diffusion_valid_signal"]
        if self.valid_signal not in VALID_SIGNALS:
            raise ValueError(f"GlobalDiff: diffusion_valid_signal must be one of {VALID_SIGNALS}, got "
                             f"'{self.valid_signal}'.")
        self.backbone_checkpoint = config["backbone_checkpoint"]
        self.backbone_valid_result = None
        self.optimiser_steps = 0

    def _build_optimizer(self, **kwargs):
        return torch.optim.AdamW(self.model.diffusion_parameters(), lr=self.config["diffusion_learning_rate"],
                                 weight_decay=self.config["diffusion_weight_decay"])

    def _diffusion_eval_step(self, batches_per_epoch):
        """Validate every ``diffusion_eval_step`` epochs; by default every ``diffusion_eval_every_steps``
        optimiser steps rounded up to whole epochs, so that a small dataset (ml-100k: 4 steps an epoch) is not
        validated, and stopped, after a handful of steps."""
        step = self.config["diffusion_eval_step"]
        if step is None:
            step = math.ceil(int(self.config["diffusion_eval_every_steps"]) / max(batches_per_epoch, 1))
        return max(1, min(int(step), self.epochs))

    # ---- stages 2 and 3 ------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.prepare_backbone(train_data, valid_data, verbose, saved, show_progress)
        if valid_data is not None:  # scored as the ensemble is (history filtering), not by the backbone's trainer
            with self.model.evaluating("backbone"):
                self.backbone_valid_result = super().evaluate(valid_data, load_best_model=False)
            # the figure the ensemble's validations compare with (the backbone's own training validated unfiltered)
            self.logger.info(set_color("GlobalDiff: the backbone's validation, scored as the ensemble's", "blue")
                             + f": {dict2str(self.backbone_valid_result)}")
            valid_data = validation_subset(valid_data, self.config["diffusion_valid_users"], self.config["seed"])
        loader = self.model.build_training_data(train_data, self.logger)
        self.eval_step = self._diffusion_eval_step(len(loader))
        self.logger.info(set_color("GlobalDiff: training the diffusion model on the frozen backbone", "green")
                         + f" ({len(loader)} optimiser steps an epoch, <= {self.epochs} epochs, validated on "
                           f"{self.valid_signal} every {self.eval_step} epochs"
                         + (f" over {len(valid_data._dataset)} users" if valid_data is not None else "") + ")")
        result = super().fit(loader, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                             callback_fn=callback_fn)
        self.logger.info(f"GlobalDiff: the diffusion stage took {self.optimiser_steps} optimiser steps")
        return result

    def _train_epoch(self, train_data, epoch_idx, *args, **kwargs):
        loss = super()._train_epoch(train_data, epoch_idx, *args, **kwargs)
        self.optimiser_steps += len(train_data)
        return loss

    def _restore(self, state, train_data):
        super()._restore(state, train_data)
        self.optimiser_steps = state["epoch"] * len(train_data)

    def _valid_epoch(self, valid_data, show_progress=False):
        """The score that stops and selects comes from ``diffusion_valid_signal``; the result kept (and logged as
        RecBole's valid result) is the ensemble's."""
        if self.valid_signal == "ensemble":
            return super()._valid_epoch(valid_data, show_progress)
        with self.model.evaluating("diffusion_only"):
            score, own = super()._valid_epoch(valid_data, show_progress)
        self.logger.info(set_color("diffusion alone, valid", "blue") + f" ({self.optimiser_steps} optimiser steps,"
                         f" {self.valid_metric} {score:.4f}): {dict2str(own)}")
        _, ensemble = super()._valid_epoch(valid_data, show_progress)
        return score, ensemble

    def extra_results(self, valid_data=None, test_data=None):
        """Backbone alone on the same split (and the diffusion model alone if asked), for the result dict."""
        out = {"backbone": self.model.backbone_name, "backbone_checkpoint": self.backbone_checkpoint,
               "backbone_best_valid_result": self.backbone_valid_result, "diffusion_steps_trained": self.optimiser_steps}
        if test_data is not None:
            with self.model.evaluating("backbone"):
                out["backbone_test_result"] = super().evaluate(test_data, load_best_model=False)
            if self.config["report_diffusion_only"]:
                with self.model.evaluating("diffusion_only"):
                    out["diffusion_only_test_result"] = super().evaluate(test_data, load_best_model=False)
        return out
