"""What the plugins built on a trained, frozen backbone share (GlobalDiff, DiffuASR)."""
from contextlib import contextmanager

from recbole_diff.model.backbone import BackboneAdapter
from recbole_diff.model.registry import get_model


class FrozenBackboneMixin:
    """Put before ``SequentialRecommender``. Needs ``self.adapter`` (the backbone's adapter), ``self.backbone``,
    ``self.eval_mode`` and the class attribute ``EVAL_MODES``; ``build_backbone`` sets up the first two."""

    EVAL_MODES = ()

    def build_backbone(self, config, dataset):
        """The RecBole model named by ``backbone`` on this dataset, and its adapter."""
        self.config = config
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
