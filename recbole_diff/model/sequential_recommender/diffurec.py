r"""DiffuRec (Li, Sun, Li, TOIS 2023) and DiffuRecSys (RecSys'24 ROEGEN workshop).

Diffusion over the target item's embedding: the target embedding is noised to x_t, and a Transformer
approximator reads the history together with x_t and the step to predict x0; the prediction is scored by inner
product with every item embedding (cross-entropy in training, RecBole's full sort at test time).

* ``approximator: add`` (DiffuRec): the approximator input is ``e_i + lambda_i * (x_t + d_t)`` at every
  history position, ``lambda ~ N(lambda_mean, lambda_std)`` element-wise.
* ``approximator: cross_attention`` (DiffuRecSys): every block first lets the noised target
  (``lambda_i * (x_t + d_t)``, one query per position) attend over the history, then self-attention, then FFN;
  blocks are chained.
* ``offset_noise_mode`` (DiffuRecSys): training noise ``N(offset_scale * offset_constant, I)`` (``constant``,
  the paper's Eq. 17), or ``random`` / ``iid`` / ``none`` for comparison.

Padding is never computed on the CPU: every batch is cut to its longest real sequence (in groups of similar
length), and a key-padding mask keeps padded positions out of attention, so results do not depend on
``MAX_ITEM_LIST_LENGTH``'s padding. Cutting needs the lengths on the host; on a GPU, where that read would stall
the device on every batch and padded positions cost parallel work only, batches run at full width under the
same mask (:func:`recbole_diff.device.host_fast_path`).
"""

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_diff.device import host_fast_path
from recbole_diff.diffusion import OFFSET_MODES, GaussianDiffusion, StepEmbedding, make_noise
from recbole_diff.model.padding import length_groups
from recbole_diff.model.utils import eval_generator, predict_from_full_sort, require_keys

APPROXIMATORS = ("add", "cross_attention")
SAMPLERS = ("ancestral", "ddim")


class ApproximatorBlock(nn.Module):
    """Pre-LN Transformer block; with ``cross=True`` a cross-attention sublayer (queries from the noised
    target, keys and values from the history) runs before self-attention."""

    def __init__(self, hidden, heads, dropout, cross=False):
        super().__init__()
        if cross:
            self.ln_query = nn.LayerNorm(hidden)
            self.ln_memory = nn.LayerNorm(hidden)
            self.cross_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        else:
            self.cross_attn = None
        self.ln_attn = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ln_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, h, pad_mask, query=None):
        if self.cross_attn is not None:
            memory = self.ln_memory(h)
            attended = self.cross_attn(
                self.ln_query(query), memory, memory, key_padding_mask=pad_mask, need_weights=False
            )[0]
            h = h + self.dropout(attended)
        x = self.ln_attn(h)
        h = h + self.dropout(self.self_attn(x, x, x, key_padding_mask=pad_mask, need_weights=False)[0])
        # the authors' blocks end with a dropout of the whole stream, residual included
        return self.dropout(h + self.dropout(self.ffn(self.ln_ffn(h))))

    def init_weights(self):
        """As the authors' code: xavier on the FFN and on the attention output layers, torch's defaults
        elsewhere."""
        attention = [self.self_attn] + ([self.cross_attn] if self.cross_attn is not None else [])
        for layer in [self.ffn[0], self.ffn[3]] + [a.out_proj for a in attention]:
            nn.init.xavier_normal_(layer.weight)


class DiffuRec(SequentialRecommender):
    r"""DiffuRec; see the module docstring. ``DiffuRecSys`` is the same model with other defaults."""

    input_type = InputType.POINTWISE

    REQUIRED = (
        "hidden_size",
        "n_blocks",
        "n_heads",
        "dropout_prob",
        "emb_dropout_prob",
        "diffusion_steps",
        "noise_schedule",
        "lambda_mean",
        "lambda_std",
        "approximator",
        "offset_noise_mode",
        "offset_scale",
        "offset_constant",
        "inference_samples",
        "position_embedding",
        "trim_padding",
        "length_buckets",
        "item_init",
        "x0_scale",
        "sampler",
    )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        require_keys(config, self.REQUIRED, type(self).__name__)
        self._check_choices(config)
        self.hidden_size = config["hidden_size"]
        self.lambda_mean, self.lambda_std = float(config["lambda_mean"]), float(config["lambda_std"])
        self.offset_noise_mode = config["offset_noise_mode"]
        self.offset_scale, self.offset_constant = float(config["offset_scale"]), float(config["offset_constant"])
        self.inference_samples = int(config["inference_samples"])
        self.trim_padding = bool(config["trim_padding"])
        self.length_buckets = int(config["length_buckets"])
        self.eval_seed = int(config["seed"])
        steps = int(config["diffusion_steps"])
        # reverse steps at inference: None runs all T; k < T runs k evenly spaced ones (the respaced process)
        self.sample_steps = None if config["sample_steps"] is None else int(config["sample_steps"])
        self.sampler = config["sampler"]

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = (
            nn.Embedding(self.max_seq_length, self.hidden_size) if config["position_embedding"] else None
        )
        self.emb_dropout = nn.Dropout(config["emb_dropout_prob"])
        self.emb_norm = nn.LayerNorm(self.hidden_size)
        self.step_embedding = StepEmbedding(self.hidden_size, t_scale=1000.0 / steps)
        cross = config["approximator"] == "cross_attention"
        self.blocks = nn.ModuleList(
            ApproximatorBlock(self.hidden_size, config["n_heads"], config["dropout_prob"], cross)
            for _ in range(config["n_blocks"])
        )
        self.out_dropout = nn.Dropout(config["dropout_prob"])  # the authors' dropout before the last LayerNorm
        self.out_norm = nn.LayerNorm(self.hidden_size)
        self.cross = cross
        # x0-parameterised with sigma_t^2 = beta_t, as DiffuRec samples.
        self.diffusion = GaussianDiffusion(
            config["noise_schedule"], steps, parameterization="x0", variance="fixed_large"
        )
        self.loss_fct = nn.CrossEntropyLoss()
        for block in self.blocks:
            block.init_weights()
        # The authors' N(0, 1) item table gives x0 = E[target] the noise's scale, but learns slowly (their
        # budget: hundreds of epochs). A xavier table learns in a few epochs but is ~30x smaller than the
        # noise, which leaves x_t nearly pure noise at every step: x0_scale: unit diffuses E[target] / std(E).
        if config["item_init"] == "xavier":
            nn.init.xavier_normal_(self.item_embedding.weight)
            with torch.no_grad():
                self.item_embedding.weight[0].zero_()
        self.unit_x0 = config["x0_scale"] == "unit"

    @staticmethod
    def _check_choices(config):
        if config["approximator"] not in APPROXIMATORS:
            raise ValueError(f"approximator must be one of {APPROXIMATORS}, got '{config['approximator']}'.")
        if config["offset_noise_mode"] not in OFFSET_MODES:
            raise ValueError(f"offset_noise_mode must be one of {OFFSET_MODES}, got '{config['offset_noise_mode']}'.")
        if config["item_init"] not in ("xavier", "normal") or config["x0_scale"] not in ("unit", "raw"):
            raise ValueError(
                f"item_init must be xavier or normal and x0_scale unit or raw, got "
                f"'{config['item_init']}' and '{config['x0_scale']}'."
            )
        if config["inference_samples"] < 1:
            raise ValueError("inference_samples must be >= 1.")
        if config["sampler"] not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got '{config['sampler']}'.")
        steps = config["sample_steps"]
        if steps is not None and not (isinstance(steps, int) and 1 <= steps <= int(config["diffusion_steps"])):
            raise ValueError(
                f"sample_steps must be an integer in [1, diffusion_steps = {config['diffusion_steps']}] "
                f"or ~ (all steps), got {steps!r}."
            )
        if config["hidden_size"] % config["n_heads"]:
            raise ValueError(
                f"hidden_size ({config['hidden_size']}) must be divisible by n_heads ({config['n_heads']})."
            )

    # ---- the denoiser --------------------------------------------------------------------------------
    def _trim(self, item_seq, item_seq_len):
        if not self.trim_padding or not host_fast_path(item_seq_len):
            return item_seq
        return item_seq[:, : int(item_seq_len.max())]

    def _groups(self, item_seq_len):
        """Row groups of similar length, each later cut to its own longest sequence (see
        ``recbole_diff.model.padding``)."""
        if (
            not self.trim_padding
            or self.length_buckets <= 1
            or item_seq_len.shape[0] < 2 * self.length_buckets
            or not host_fast_path(item_seq_len)
        ):
            return [None]
        return length_groups(item_seq_len, self.length_buckets)

    def encode_history(self, item_seq):
        """[B, L] item ids -> ([B, L, H] history states, [B, L] padding mask)."""
        h = self.item_embedding(item_seq)
        if self.position_embedding is not None:
            # Right padding: real items sit at 0..len-1 < max_seq_length; extra padding columns, which the
            # mask hides anyway, reuse the last position.
            positions = torch.arange(item_seq.shape[1], device=item_seq.device).clamp(max=self.max_seq_length - 1)
            h = h + self.position_embedding(positions)[None]
        return self.emb_norm(self.emb_dropout(h)), item_seq.eq(0)

    def _lambda(self, shape, device, generator=None):
        noise = torch.randn(shape, device=device, generator=generator)
        return self.lambda_mean + self.lambda_std * noise

    def denoise(self, history, pad_mask, item_seq_len, x_t, t, generator=None):
        """Predict x0 [B, H] from the encoded history, the noised target x_t [B, H] and the step t [B]."""
        signal = x_t + self.step_embedding(t)  # [B, H]
        noised = self._lambda(history.shape, history.device, generator) * signal[:, None, :]  # [B, L, H]
        if self.cross:
            h = history
            for block in self.blocks:
                h = block(h, pad_mask, query=noised)
        else:
            h = history + noised
            for block in self.blocks:
                h = block(h, pad_mask)
        return self.gather_indexes(self.out_norm(self.out_dropout(h)), item_seq_len - 1)

    def target_embedding(self, items):
        """x0: the items' embeddings, at unit per-element scale with ``x0_scale: unit`` (the scale of the noise,
        and of the LayerNorm-ed x0 estimates the reverse process feeds back)."""
        e = self.item_embedding(items)
        return e / self.item_embedding.weight[1:].std().clamp(min=1e-8) if self.unit_x0 else e

    # ---- training ------------------------------------------------------------------------------------
    def training_noise(self, shape, device):
        return make_noise(shape, device, self.offset_noise_mode, self.offset_scale, self.offset_constant)

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        target = interaction[self.POS_ITEM_ID]
        t = torch.randint(0, self.diffusion.num_steps, (target.shape[0],), device=target.device)
        x0 = self.target_embedding(target)
        x_t = self.diffusion.q_sample(x0, t, self.training_noise(x0.shape, x0.device))
        predictions, targets = [], []
        for rows in self._groups(item_seq_len):
            pick = (lambda v: v) if rows is None else (lambda v: v[rows])  # noqa: B023 (used in this iteration only)
            lengths = pick(item_seq_len)
            history, pad_mask = self.encode_history(self._trim(pick(item_seq), lengths))
            predictions.append(self.denoise(history, pad_mask, lengths, pick(x_t), pick(t)))
            targets.append(pick(target))
        logits = torch.cat(predictions) @ self.item_embedding.weight.t()
        return self.loss_fct(logits, torch.cat(targets))

    # ---- inference -----------------------------------------------------------------------------------
    def reverse(self, item_seq, item_seq_len, generator):
        """One reverse run (``sample_steps`` of the T steps; all by default) -> x0_hat [B, H]."""
        history, pad_mask = self.encode_history(item_seq)
        x_T = torch.randn(item_seq.shape[0], self.hidden_size, device=item_seq.device, generator=generator)

        def model_fn(x_t, t):
            return self.denoise(history, pad_mask, item_seq_len, x_t, t, generator)

        return self.diffusion.sample(
            model_fn, x_T=x_T, steps=self.sample_steps, sampler=self.sampler, generator=generator
        )

    def _reverse_grouped(self, item_seq, item_seq_len, generator):
        groups = self._groups(item_seq_len)
        if groups == [None]:
            return self.reverse(self._trim(item_seq, item_seq_len), item_seq_len, generator)
        parts = [
            self.reverse(self._trim(item_seq[rows], item_seq_len[rows]), item_seq_len[rows], generator)
            for rows in groups
        ]
        x0_hat = torch.empty(item_seq.shape[0], self.hidden_size, device=item_seq.device, dtype=parts[0].dtype)
        for rows, part in zip(groups, parts):
            x0_hat[rows] = part
        return x0_hat

    def item_distribution(self, interaction):
        """Scores over all items [B, n_items]: logits for one reverse run, or with ``inference_samples`` S > 1
        the log of the average of the S runs' softmax distributions (the DiffuRecSys paper's Algorithm 3)."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        generator = eval_generator(self.eval_seed, interaction, self.USER_ID, item_seq.device)
        if self.inference_samples == 1:
            return self._item_scores(self._reverse_grouped(item_seq, item_seq_len, generator))
        probs = 0
        for _ in range(self.inference_samples):
            scores = self._item_scores(self._reverse_grouped(item_seq, item_seq_len, generator))
            probs = probs + F.softmax(scores, dim=-1)
        return torch.log(probs / self.inference_samples)

    def _item_scores(self, x0_hat):
        # fp32 even under bf16 autocast: bf16's 8-bit mantissa would tie many items' scores and blur the ranking
        with torch.autocast(x0_hat.device.type, enabled=False):
            return x0_hat.float() @ self.item_embedding.weight.float().t()

    def full_sort_predict(self, interaction):
        return self.item_distribution(interaction)

    def predict(self, interaction):
        """Sampled evaluation: one reverse run per distinct user history."""
        return predict_from_full_sort(self, interaction, self.item_distribution)


class DiffuRecSys(DiffuRec):
    r"""DiffuRecSys: DiffuRec with the cross-attention approximator and offset noise (defaults in
    ``properties/model/DiffuRecSys.yaml``; ``offset_noise_mode: none`` gives the paper's V1)."""
