"""GlobalDiffTrainer: backbone stage (RecBole's own recipe, or a checkpoint), then the diffusion stage on the
frozen backbone through RecBole's ``Trainer.fit``, then backbone-alone and ensemble results on one split."""
import torch
from recbole.utils import ModelType, set_color

from recbole_diff.trainer.trainer import Trainer, unique_checkpoint_path
from recbole_diff.utils import get_trainer, load_checkpoint


class GlobalDiffTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        # RecBole's epochs/learning_rate keys belong to the backbone's recipe; the diffusion stage has its own.
        self.epochs = config["diffusion_epochs"]
        self.eval_step = min(config["eval_step"], self.epochs)
        self.backbone_checkpoint = config["backbone_checkpoint"]
        self.backbone_valid_result = None

    def _build_optimizer(self, **kwargs):
        return torch.optim.AdamW(self.model.diffusion_parameters(), lr=self.config["diffusion_learning_rate"],
                                 weight_decay=self.config["diffusion_weight_decay"])

    # ---- stage 1 -------------------------------------------------------------------------------------
    def prepare_backbone(self, train_data, valid_data, verbose=True, saved=True, show_progress=False):
        name = self.model.backbone_name
        if self.backbone_checkpoint:
            self.logger.info(set_color(f"GlobalDiff: loading the {name} backbone from {self.backbone_checkpoint}", "green"))
            self.load_backbone(self.backbone_checkpoint)
        else:
            self.logger.info(set_color(f"GlobalDiff: training the {name} backbone with RecBole's recipe", "green"))
            trainer = get_trainer(ModelType.SEQUENTIAL, name)(self.config, self.model.backbone)
            trainer.saved_model_file = unique_checkpoint_path(self.config, tag=f"{name}-backbone")
            _, self.backbone_valid_result = trainer.fit(train_data, valid_data, verbose=verbose, saved=saved,
                                                        show_progress=show_progress)
            if saved:
                trainer.load_model_file()
                self.backbone_checkpoint = trainer.saved_model_file
        self.model.freeze_backbone()

    def load_backbone(self, path):
        checkpoint = load_checkpoint(path, self.device)
        saved, name = checkpoint["config"], self.model.backbone_name
        trained_for = saved["backbone"] if saved["model"] in ("GlobalDiff", "PDRec", "DiffuASR") else saved["model"]
        if trained_for != name or str(saved["dataset"]) != str(self.config["dataset"]):
            raise ValueError(
                f"backbone_checkpoint '{path}' holds a {trained_for} trained on '{saved['dataset']}', but this run "
                f"needs a {name} on '{self.config['dataset']}'."
            )
        state = checkpoint["state_dict"]
        if any(k.startswith("backbone.") for k in state):
            state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        own = self.model.backbone.state_dict()
        bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"backbone_checkpoint '{path}' does not match this dataset/config: '{bad[0]}' differs "
                             "(item count, hidden size or sequence length changed?).")
        self.model.backbone.load_state_dict(state)

    # ---- stages 2 and 3 ------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.prepare_backbone(train_data, valid_data, verbose, saved, show_progress)
        if valid_data is not None and self.backbone_valid_result is None:
            with self.model.evaluating("backbone"):
                self.backbone_valid_result = super().evaluate(valid_data, load_best_model=False)
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
