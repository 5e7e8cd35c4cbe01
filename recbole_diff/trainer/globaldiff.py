"""GlobalDiffTrainer: the plugin trainer's walk (the backbone, then the diffusion stage on it through RecBole's
``Trainer.fit``), with the diffusion stage's own validation signal, and the diffusion model alone in the results.

The diffusion stage stops and picks its checkpoint on the diffusion model's own validation signal (its ranking
alone, ``diffusion_valid_signal: diffusion_only``): the ensemble's score is dominated by the frozen backbone and
hardly moves while the diffusion model still learns, so stopping on it ended training after a few dozen steps.
The ensemble's validation is still logged at every validation and is the run's ``best_valid_result`` (at the
checkpoint the diffusion signal chose)."""

import math

import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.utils import dict2str, set_color

from recbole_diff.trainer.plugin import PluginTrainer

VALID_SIGNALS = ("diffusion_only", "ensemble")


def validation_subset(valid_data, n_users, seed):
    """``valid_data`` restricted to ``n_users`` of its rows drawn with ``seed`` (in their order), or itself when
    it has no more rows than that or is not a full-ranking loader."""
    dataset = valid_data._dataset
    if not n_users or n_users >= len(dataset) or not isinstance(valid_data, FullSortEvalDataLoader):
        return valid_data
    generator = torch.Generator().manual_seed(int(seed))
    rows = torch.sort(torch.randperm(len(dataset), generator=generator)[: int(n_users)]).values
    subset = dataset.copy(dataset.inter_feat[rows])
    return FullSortEvalDataLoader(valid_data.config, subset, valid_data._sampler, shuffle=False)


class GlobalDiffTrainer(PluginTrainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.valid_signal = config["diffusion_valid_signal"]
        if self.valid_signal not in VALID_SIGNALS:
            raise ValueError(
                f"GlobalDiff: diffusion_valid_signal must be one of {VALID_SIGNALS}, got '{self.valid_signal}'."
            )

    def _diffusion_eval_step(self, batches_per_epoch):
        """Validate every ``diffusion_eval_step`` epochs; by default every ``diffusion_eval_every_steps``
        optimiser steps rounded up to whole epochs, so that a small dataset (ml-100k: 4 steps an epoch) is not
        validated, and stopped, after a handful of steps."""
        step = self.config["diffusion_eval_step"]
        if step is None:
            step = math.ceil(int(self.config["diffusion_eval_every_steps"]) / max(batches_per_epoch, 1))
        return max(1, min(int(step), self.epochs))

    def fit_final(self, stage, train_data, valid_data, flags, callback_fn=None):
        if valid_data is not None:  # scored as the ensemble is (history filtering), not by the backbone's trainer
            with self.model.evaluating("backbone"):
                self.valid_results["backbone"] = self.evaluate(valid_data, load_best_model=False)
            # the figure the ensemble's validations compare with (the backbone's own training validated unfiltered)
            self.logger.info(
                set_color("GlobalDiff: the backbone's validation, scored as the ensemble's", "blue")
                + f": {dict2str(self.valid_results['backbone'])}"
            )
            valid_data = validation_subset(valid_data, self.config["diffusion_valid_users"], self.config["seed"])
        loader = self.stage_loader(stage, train_data)
        self.eval_step = self._diffusion_eval_step(len(loader))
        self.logger.info(
            set_color("GlobalDiff: training the diffusion model on the frozen backbone", "green")
            + f" ({len(loader)} optimiser steps an epoch, <= {self.epochs} epochs, validated on "
            f"{self.valid_signal} every {self.eval_step} epochs"
            + (f" over {len(valid_data._dataset)} users" if valid_data is not None else "")
            + ")"
        )
        result = self.train_final(loader, valid_data, flags, callback_fn)
        self.logger.info(f"GlobalDiff: the diffusion stage took {self.optimiser_steps} optimiser steps")
        return result

    def _valid_epoch(self, valid_data, show_progress=False):
        """The score that stops and selects comes from ``diffusion_valid_signal``; the result kept (and logged as
        RecBole's valid result) is the ensemble's."""
        if self.valid_signal == "ensemble":
            return super()._valid_epoch(valid_data, show_progress)
        with self.model.evaluating("diffusion_only"):
            score, own = super()._valid_epoch(valid_data, show_progress)
        self.logger.info(
            set_color("diffusion alone, valid", "blue") + f" ({self.optimiser_steps} optimiser steps,"
            f" {self.valid_metric} {score:.4f}): {dict2str(own)}"
        )
        _, ensemble = super()._valid_epoch(valid_data, show_progress)
        return score, ensemble

    def extra_results(self, valid_data=None, test_data=None):
        """The plugin's results, and the diffusion model alone on the test split when asked."""
        out = super().extra_results(valid_data, test_data)
        if test_data is not None and self.config["report_diffusion_only"]:
            with self.model.evaluating("diffusion_only"):
                out["diffusion_only_test_result"] = self.evaluate(test_data, load_best_model=False)
        return out
