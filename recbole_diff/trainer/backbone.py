"""The backbone stage shared by the plugins that build on a trained, frozen backbone (GlobalDiff, DiffuASR):
train it with RecBole's own recipe, or load ``backbone_checkpoint`` after checking it fits this run, or the
same backbone another run stored in ``stage_cache``."""
from recbole.utils import ModelType, init_seed, set_color

from recbole_diff.io import load_checkpoint
from recbole_diff.trainer.registry import get_trainer
from recbole_diff.trainer.stage_cache import shared_stage
from recbole_diff.trainer.trainer import unique_checkpoint_path


class BackboneStageMixin:
    """Put before :class:`~recbole_diff.trainer.Trainer`; needs ``self.backbone_checkpoint`` and
    ``self.backbone_valid_result`` set, and a model with ``backbone``, ``backbone_name``, ``freeze_backbone()``."""

    def prepare_backbone(self, train_data, valid_data, verbose=True, saved=True, show_progress=False):
        name = self.model.backbone_name
        if self.backbone_checkpoint:
            self.load_backbone(self.backbone_checkpoint)
        else:
            with shared_stage(self.config, f"{name}-backbone", name, self.logger) as stage:
                if stage.hit:
                    self.load_backbone(stage.path)
                    self.backbone_checkpoint, self.backbone_valid_result = stage.path, stage.meta.get("valid_result")
                else:
                    self.train_backbone(train_data, valid_data, verbose, saved, show_progress, stage)
                    if self.backbone_checkpoint:
                        stage.store(self.backbone_checkpoint, drop=("optimizer",), valid_result=self.backbone_valid_result)
        self.model.freeze_backbone()
        # the next stages draw the same random numbers whether the backbone was trained here or loaded
        init_seed(self.config["seed"], self.config["reproducibility"])

    def train_backbone(self, train_data, valid_data, verbose, saved, show_progress, stage=None):
        name, plugin = self.model.backbone_name, type(self.model).__name__
        self.logger.info(set_color(f"{plugin}: training the {name} backbone with RecBole's recipe", "green"))
        trainer = get_trainer(ModelType.SEQUENTIAL, name)(self.config, self.model.backbone)
        if stage is not None:
            stage.trainer(trainer)
        trainer.saved_model_file = unique_checkpoint_path(self.config, tag=f"{name}-backbone")
        _, self.backbone_valid_result = trainer.fit(train_data, valid_data, verbose=verbose, saved=saved,
                                                    show_progress=show_progress)
        if saved:
            trainer.load_model_file()
            self.backbone_checkpoint = trainer.saved_model_file

    def load_backbone(self, path):
        self.logger.info(set_color(f"{type(self.model).__name__}: loading the {self.model.backbone_name} backbone "
                                   f"from {path}", "green"))
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

