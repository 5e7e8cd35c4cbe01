"""What the plugins built on a trained, frozen backbone share (GlobalDiff, DiffuASR)."""
from contextlib import contextmanager


class FrozenBackboneMixin:
    """Put before ``SequentialRecommender``. Needs ``self.adapter`` (the backbone's adapter), ``self.backbone``,
    ``self.eval_mode`` and the class attribute ``EVAL_MODES``; call ``self.frozen = False`` in ``__init__``."""

    EVAL_MODES = ()

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
