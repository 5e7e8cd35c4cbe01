"""Uniform access to any RecBole sequential model, for the plugins.

``BackboneAdapter(model)`` exposes, for a batch (a RecBole ``Interaction``):

* ``last_hidden(interaction) -> [B, H]``: the state the model's own ``forward`` returns;
* ``position_hidden(interaction) -> [B, L, H]``: one state per position (GlobalDiff needs them);
* ``item_scores(interaction) -> [B, n_items]``: the model's ``full_sort_predict``;
* ``item_embeddings() -> [n_items, H]``.

Per-position states are captured with a forward hook on the sub-module that produces them while the model's
own ``forward`` runs, so the adapter never re-implements a backbone. Models without per-position states
(CORE, STAMP, ...) still get ``last_hidden`` and ``item_scores``; ``position_hidden`` refuses them.
"""

from dataclasses import dataclass
from typing import Callable, Optional


def _forward_seq_len(model, seq, seq_len):
    return model.forward(seq, seq_len)


def _forward_seq(model, seq, seq_len):
    return model.forward(seq)


def _bert4rec_last(model, seq, seq_len):
    # BERT4Rec predicts the next item at an appended mask token (its full_sort_predict convention).
    out = model.forward(model.reconstruct_test_data(seq, seq_len))
    return model.gather_indexes(out, seq_len - 1)


def _last_layer(output, model):
    return output[-1]


def _identity(output, model):
    return output


def _gru_output(output, model):
    return output[0]


def _nextitnet_states(output, model):
    return model.final_layer(output)


@dataclass(frozen=True)
class BackboneSpec:
    """How to reach one RecBole model's states.

    ``last``: computes ``forward``'s [B, H] result; ``states_module``: attribute whose output, passed through
    ``states_pick``, is the [B, L, H'] per-position states; ``causal``: whether the state at position j saw
    only items 0..j; ``mask_token``: whether the model has a mask token (bidirectional cloze models).
    """

    last: Callable
    states_module: Optional[str] = None
    states_pick: Callable = _identity
    causal: bool = True
    mask_token: bool = False


BACKBONES = {
    "SASRec": BackboneSpec(_forward_seq_len, "trm_encoder", _last_layer),
    "LightSANs": BackboneSpec(_forward_seq_len, "trm_encoder", _last_layer),
    "GRU4Rec": BackboneSpec(_forward_seq_len, "dense"),
    "NARM": BackboneSpec(_forward_seq_len, "gru", _gru_output),
    "NextItNet": BackboneSpec(_forward_seq, "residual_blocks", _nextitnet_states),
    "BERT4Rec": BackboneSpec(_bert4rec_last, "output_ln", causal=False, mask_token=True),
    "CORE": BackboneSpec(_forward_seq),
    "STAMP": BackboneSpec(_forward_seq_len),
    "SRGNN": BackboneSpec(_forward_seq_len),
    "GCSAN": BackboneSpec(_forward_seq_len),
}


def supported_backbones(per_position=False):
    return sorted(n for n, s in BACKBONES.items() if s.states_module is not None or not per_position)


class BackboneAdapter:
    """Wraps a built RecBole sequential model (see the module docstring)."""

    def __init__(self, model, name=None):
        self.model = model
        self.name = name or type(model).__name__
        if self.name not in BACKBONES:
            raise ValueError(
                f"recbole-diff cannot adapt the backbone '{self.name}'. Supported backbones: "
                f"{', '.join(supported_backbones())}."
            )
        self.spec = BACKBONES[self.name]
        self.ITEM_SEQ, self.ITEM_SEQ_LEN = model.ITEM_SEQ, model.ITEM_SEQ_LEN
        self.n_items = model.n_items

    @property
    def has_position_states(self):
        return self.spec.states_module is not None

    @property
    def causal(self):
        return self.spec.causal

    def require_position_states(self, who):
        if not self.has_position_states:
            raise ValueError(
                f"{who} needs per-position states, which the backbone '{self.name}' does not have (it pools the "
                f"sequence into one vector). Use one of: {', '.join(supported_backbones(per_position=True))}."
            )

    def _seq(self, interaction):
        return interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]

    def last_hidden(self, interaction):
        seq, seq_len = self._seq(interaction)
        return self.spec.last(self.model, seq, seq_len)

    def forward_with_states(self, item_seq, item_seq_len):
        """Run the model's own forward once; return (last hidden [B, H], per-position states [B, L, H'])."""
        self.require_position_states(f"{self.name} adapter")
        captured = {}
        module = getattr(self.model, self.spec.states_module)
        handle = module.register_forward_hook(lambda _m, _inp, out: captured.__setitem__("out", out))
        try:
            last = self.spec.last(self.model, item_seq, item_seq_len)
        finally:
            handle.remove()
        return last, self.spec.states_pick(captured["out"], self.model)

    def states(self, item_seq, item_seq_len):
        """Per-position states of exactly this input (no evaluation-time rewriting: a BERT4Rec input keeps
        whatever mask tokens the caller put in)."""
        self.require_position_states(f"{self.name} adapter")
        if self.spec.mask_token:
            return self.model.forward(item_seq)
        return self.forward_with_states(item_seq, item_seq_len)[1]

    @property
    def mask_token(self):
        return getattr(self.model, "mask_token", None) if self.spec.mask_token else None

    def eval_input(self, item_seq, item_seq_len):
        """The input whose state at position len-1 predicts the next item (BERT4Rec: shifted, mask token last)."""
        if self.spec.mask_token:
            return self.model.reconstruct_test_data(item_seq, item_seq_len)
        return item_seq

    def position_hidden(self, interaction):
        """[B, L, H'] states; position j of a causal model has seen items 0..j. For BERT4Rec these are the
        states of the evaluation input (history shifted left, mask token at the last position)."""
        seq, seq_len = self._seq(interaction)
        return self.forward_with_states(seq, seq_len)[1]

    def item_scores(self, interaction):
        return self.model.full_sort_predict(interaction)

    def scores_and_states(self, interaction):
        """``full_sort_predict`` and the per-position states of the input it read, from one forward pass (for
        BERT4Rec the states of its evaluation input, history shifted left with the mask token last)."""
        self.require_position_states(f"{self.name} adapter")
        captured = {}
        module = getattr(self.model, self.spec.states_module)
        handle = module.register_forward_hook(lambda _m, _inp, out: captured.__setitem__("out", out))
        try:
            scores = self.model.full_sort_predict(interaction)
        finally:
            handle.remove()
        return scores, self.spec.states_pick(captured["out"], self.model)

    def item_embeddings(self):
        weight = self.model.item_embedding.weight
        return weight[: self.n_items]

    def freeze(self):
        """Eval mode and no gradients: a frozen backbone is never changed by a plugin."""
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self
