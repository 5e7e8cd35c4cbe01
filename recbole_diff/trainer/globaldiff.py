"""GlobalDiffTrainer: backbone stage (RecBole's own recipe, or a checkpoint), then the diffusion stage on the
frozen backbone through RecBole's ``Trainer.fit``, then backbone-alone and ensemble results on one split."""
import torch
from recbole.utils import dict2str, set_color

from recbole_diff.trainer.backbone import BackboneStageMixin
from recbole_diff.trainer.trainer import Trainer


class GlobalDiffTrainer(BackboneStageMixin, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        # RecBole's epochs/learning_rate keys belong to the backbone's recipe; the diffusion stage has its own.
        self.epochs = config["diffusion_epochs"]
        # an ensemble validation runs the reverse process for every user: on sports it costs ~10 diffusion epochs
        self.eval_step = min(config["diffusion_eval_step"] or config["eval_step"], self.epochs)
        self.stopping_step = config["diffusion_stopping_step"]
        self.backbone_checkpoint = config["backbone_checkpoint"]
        self.backbone_valid_result = None

    def _build_optimizer(self, **kwargs):
        return torch.optim.AdamW(self.model.diffusion_parameters(), lr=self.config["diffusion_learning_rate"],
                                 weight_decay=self.config["diffusion_weight_decay"])

    # ---- stages 2 and 3 ------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.prepare_backbone(train_data, valid_data, verbose, saved, show_progress)
        if valid_data is not None:  # scored as the ensemble is (history filtering), not by the backbone's trainer
            with self.model.evaluating("backbone"):
                self.backbone_valid_result = super().evaluate(valid_data, load_best_model=False)
            # the figure the ensemble's validations compare with (the backbone's own training validated unfiltered)
            self.logger.info(set_color("GlobalDiff: the backbone's validation, scored as the ensemble's", "blue")
                             + f": {dict2str(self.backbone_valid_result)}")
        loader = self.model.build_training_data(train_data, self.logger)
        self.logger.info(set_color("GlobalDiff: training the diffusion model on the frozen backbone", "green"))
        return super().fit(loader, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    def extra_results(self, valid_data=None, test_data=None):
        """Backbone alone on the same split (and the diffusion model alone if asked), for the result dict."""
        out = {"backbone": self.model.backbone_name, "backbone_checkpoint": self.backbone_checkpoint,
               "backbone_best_valid_result": self.backbone_valid_result}
        if test_data is not None:
            with self.model.evaluating("backbone"):
                out["backbone_test_result"] = super().evaluate(test_data, load_best_model=False)
            if self.config["report_diffusion_only"]:
                with self.model.evaluating("diffusion_only"):
                    out["diffusion_only_test_result"] = super().evaluate(test_data, load_best_model=False)
        return out
