r"""DiffuASR (CIKM 2023): a diffusion model generates M pseudo items placed before each user's first item; the
backbone is trained on the augmented dataset and evaluated on the original targets.

The augmenter: item embeddings (d, a perfect square; from the trained backbone by default), x0 = the stacked
embeddings of the first M training items S_aug, condition c = mean (or sum) of the remaining ones S_raw, DDPM
with eps loss (T = 1000, linear), SU-Net noise predictor. Sampling: ancestral over all T steps (the paper) or
DDIM over ``sample_steps``; classifier guidance by the trained backbone's probability of the user's real first
item (``guide: cg``) or classifier-free guidance with condition dropout (``guide: cf``); cosine rounding.

This module holds the three networks (the backbone trained on the original data, the augmenter, the backbone
trained on the augmented data) and scores the original loaders' users by prepending their generated items, so
every variant (none, random, random_seq, CG, CF) is evaluated on the same users, targets and sampled candidates.
The pipeline is :class:`~recbole_diff.trainer.DiffuASRTrainer`; see ``docs/diffuasr.md``.
"""
from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_diff.data.augment import round_to_items
from recbole_diff.diffusion import ClassifierGuidance, GaussianDiffusion, StepOptions, classifier_free
from recbole_diff.model.plugin.frozen import FrozenBackboneMixin
from recbole_diff.model.plugin.sunet import SUNet, square_side
from recbole_diff.utils import get_model, predict_from_full_sort, require_keys

AUGMENTERS = ("diffusion", "random", "random_seq")
GUIDES = ("cg", "cf", "none")
EVAL_MODES = ("augmented", "backbone")
# Backbones that embed the item sequence position by position with item_embedding (classifier guidance hooks it).
CG_BACKBONES = ("SASRec", "LightSANs", "GRU4Rec", "NARM", "NextItNet", "STAMP", "BERT4Rec")


class Augmenter(nn.Module):
    """Item table + SU-Net + DDPM (eps) over [M, d] prefixes, conditioned on a pooled sequence embedding."""

    def __init__(self, n_items, m, d, config):
        super().__init__()
        self.m, self.d = m, d
        self.embedding = nn.Embedding(n_items, d, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.sunet = SUNet(m, d, tuple(config["unet_channels"]), int(config["unet_res_blocks"]),
                           dropout=float(config["unet_dropout"]))
        self.null = nn.Parameter(torch.zeros(d))  # classifier-free guidance's "no condition"
        self.diffusion = GaussianDiffusion(config["noise_schedule"], int(config["diffusion_steps"]),
                                           parameterization="eps", variance="fixed_small")
        self.pool = config["condition"]
        self.p_uncond = float(config["p_uncond"])
        self.guide = config["guide"]
        self.unit_scale = config["x0_scale"] == "unit"
        self.clip_x0 = bool(config["clip_x0"])

    def scale(self):
        """What the item table is divided by before the diffusion sees it. A trained backbone's table (std ~0.07
        for SASRec) against unit noise keeps the item signal in x_t for ~30 of 1000 steps; at unit per-element
        variance it stays for hundreds. Rounding is by cosine, so the scale changes no item."""
        if not self.unit_scale:
            return torch.ones((), device=self.embedding.weight.device)
        return self.embedding.weight[1:].std().clamp(min=1e-8)

    def embed(self, items):
        return self.embedding(items) / self.scale()

    def condition(self, flat_items, offsets):
        return F.embedding_bag(flat_items, self.embedding.weight, offsets, mode=self.pool) / self.scale()

    def clip(self):
        """x0 estimates kept inside the (scaled) table's range while sampling, as image diffusion clips to
        [-1, 1]: an unclipped estimate's error grows step by step (measured: x0 ~1000x the items' scale)."""
        if not self.clip_x0:
            return None
        bound = (self.embedding.weight[1:] / self.scale()).abs().max()  # kept on the device
        return lambda x0: x0.clamp(-bound, bound)

    def loss(self, s_aug, flat_raw, raw_offsets):
        x0 = self.embed(s_aug)
        c = self.condition(flat_raw, raw_offsets)
        if self.guide == "cf" and self.p_uncond > 0:
            drop = torch.rand(len(c), device=c.device) < self.p_uncond
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        t = torch.randint(self.diffusion.num_steps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(self.sunet(self.diffusion.q_sample(x0, t, noise), t, c), noise)

    def sample(self, c, gamma=0.0, sampler="ancestral", steps=None, eta=0.0, log_prob_fn=None, generator=None):
        """x0 [B, M, d] from noise, guided as configured: ``cf`` combines the conditional and null branches,
        ``cg`` shifts the noise by ``log_prob_fn(x_t, t)``'s gradient."""
        model_fn, guidance = self.sunet, ()
        if self.guide == "cf":
            model_fn = classifier_free(self.sunet, gamma, {"c": self.null[None]})
        elif self.guide == "cg" and gamma != 0:
            if log_prob_fn is None:
                raise ValueError("guide: cg needs a classifier (the trained backbone).")
            guidance = (ClassifierGuidance(log_prob_fn, gamma),)

        def fn(x, t, c):
            return model_fn(x, t, c=c) if self.guide == "cf" else self.sunet(x, t, c)

        x_T = torch.randn((len(c), self.m, self.d), device=c.device, generator=generator)
        options = StepOptions(model_kwargs={"c": c}, denoised_fn=self.clip(), guidance=guidance)
        return self.diffusion.sample(fn, x_T, steps=steps, sampler=sampler, eta=eta, generator=generator,
                                     options=options)


class DiffuASR(FrozenBackboneMixin, SequentialRecommender):
    """DiffuASR plugin; ``--backbone`` picks the RecBole sequential model trained on the augmented data."""

    # No input_type: RecBole then derives it from loss_type, as for the backbone the loaders are built for.
    is_plugin = True
    EVAL_MODES = EVAL_MODES
    default_backbone = "SASRec"

    REQUIRED = ("backbone", "augmenter", "M", "guide", "gamma", "p_uncond", "diffusion_steps", "noise_schedule",
                "sampler", "eta", "condition", "embedding_init", "freeze_embedding", "unet_channels", "unet_res_blocks",
                "unet_dropout", "augmenter_epochs", "augmenter_learning_rate",
                "augmenter_batch_size", "augmenter_min_raw", "exclude_history", "generation_batch_size",
                "eval_mode", "long_tail_bounds", "classifier_logprob", "x0_scale", "clip_x0")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        require_keys(config, self.REQUIRED, "DiffuASR")
        self._check_choices(config)
        self.build_backbone(config, dataset)
        self.final = get_model(self.backbone_name)(config, dataset)  # trained on the augmented dataset
        self.m = int(config["M"])
        self.d = self._embedding_size(config)
        square_side(self.d)
        self.augmenter_kind = config["augmenter"]
        self.augmenter = Augmenter(self.n_items, self.m, self.d, config) if self.augmenter_kind == "diffusion" else None
        if self.augmenter is not None and int(config["unet_channels"][0]) < self.m:
            # measured on ml-100k (M = 10, the authors' first width 8): the network cannot pass x_t through, its
            # eps loss stays ~0.24 even at large t where x_t is nearly eps, and the generated items are near random
            getLogger().warning(f"DiffuASR: unet_channels starts at {config['unet_channels'][0]} channels for "
                                f"M = {self.m} positions; the SU-Net cannot carry x_t through that first level. "
                                f"Use a first width >= M (the default [16, 16, 16, 16]).")
        if self.augmenter is not None and config["embedding_init"] == "backbone":
            own = self.adapter.item_embeddings().shape[1]
            if own != self.d:
                raise ValueError(f"DiffuASR embedding_init: backbone needs diffusion_embedding_size = the backbone's "
                                 f"item embedding size ({own}), got {self.d}; or use embedding_init: random.")
        if self.augmenter is not None and config["guide"] == "cg" and self.backbone_name not in CG_BACKBONES:
            raise ValueError(f"DiffuASR guide: cg feeds the generated prefix to the backbone through its item table; "
                             f"'{self.backbone_name}' embeds a graph of the session instead. Use guide: cf, or one of "
                             f"{', '.join(CG_BACKBONES)}.")
        if self.augmenter is not None and config["guide"] == "cg" and config["embedding_init"] != "backbone":
            raise ValueError("DiffuASR guide: cg reads the generated prefix with the trained backbone, so the "
                             "augmenter must live in its item space: set embedding_init: backbone.")
        if self.m + int(self.adapter.spec.mask_token) > self.max_seq_length:
            raise ValueError(f"DiffuASR: M = {self.m} does not fit MAX_ITEM_LIST_LENGTH = {self.max_seq_length}"
                             f"{' with the mask token' if self.adapter.spec.mask_token else ''}.")
        self.register_buffer("prefix", torch.zeros(dataset.user_num, self.m, dtype=torch.long))
        self.register_buffer("item_to_final", torch.arange(self.n_items))
        self.eval_mode = config["eval_mode"]

    def _embedding_size(self, config):
        """d as set, else the backbone's item embedding size when the augmenter starts from its table."""
        if config["diffusion_embedding_size"] is not None:
            return int(config["diffusion_embedding_size"])
        return self.adapter.item_embeddings().shape[1] if config["embedding_init"] == "backbone" else 64

    @staticmethod
    def _check_choices(config):
        for key, allowed in (("augmenter", AUGMENTERS), ("guide", GUIDES), ("eval_mode", EVAL_MODES),
                             ("sampler", ("ancestral", "ddim")), ("condition", ("mean", "sum")),
                             ("embedding_init", ("backbone", "random")),
                             ("classifier_logprob", ("auto", "sigmoid", "softmax")), ("x0_scale", ("unit", "raw"))):
            if config[key] not in allowed:
                raise ValueError(f"DiffuASR: {key} must be one of {allowed}, got '{config[key]}'.")
        if int(config["M"]) < 1:
            raise ValueError(f"DiffuASR: M (generated items per user) must be >= 1, got {config['M']}.")

    # ---- the backbone on the original data ---------------------------------------------------------------
    def init_embedding_from_backbone(self):
        with torch.no_grad():
            self.augmenter.embedding.weight.copy_(self.adapter.item_embeddings())
        self.augmenter.embedding.weight.requires_grad_(not bool(self.config["freeze_embedding"]))

    def classifier_uses_softmax(self):
        choice = self.config["classifier_logprob"]
        if choice == "auto":
            return str(self.config["loss_type"]).upper() == "CE"
        return choice == "softmax"

    def first_item_log_prob(self, first_items):
        """log p of each user's real first item after a prefix given as item embeddings [B, M, d], from the
        backbone's scores (sigmoid or softmax, ``classifier_logprob``): the classifier of ``guide: cg``. The
        embeddings enter through a forward hook on the backbone's item table, written where the input holds the
        placeholder item, so the backbone's own input handling (BERT4Rec's appended mask token and left shift)
        stays intact."""
        m, placeholder = self.m, 1
        softmax = self.classifier_uses_softmax()
        # BERT4Rec's evaluation input drops the first item to make room for the mask token: give it M + 1.
        length = m + 1 if self.adapter.spec.mask_token else m

        def log_prob(x, t):
            x = x * self.augmenter.scale()  # back in the backbone's item space
            # only the prefix's width: the backbone attends over M positions, not MAX_ITEM_LIST_LENGTH
            seq = torch.full((len(x), length), placeholder, dtype=torch.long, device=x.device)
            lens = torch.full((len(x),), length, dtype=torch.long, device=x.device)

            def replace(_module, inputs, out):
                where = inputs[0] == placeholder
                out = out.clone()
                out[where] = x[:, -int(where[0].sum()):].reshape(-1, x.shape[-1]).to(out.dtype)
                return out

            handle = self.backbone.item_embedding.register_forward_hook(replace)
            try:
                scores = self.backbone.full_sort_predict(Interaction({self.ITEM_SEQ: seq, self.ITEM_SEQ_LEN: lens}))
            finally:
                handle.remove()
            log_p = F.log_softmax(scores, dim=1) if softmax else F.logsigmoid(scores)
            return log_p.gather(1, first_items[:, None]).squeeze(1)

        return log_prob

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def round(self, x0, exclude=None):
        return round_to_items(x0, self.augmenter.embedding.weight, exclude)

    # ---- scoring the original loaders --------------------------------------------------------------------
    def augmented_input(self, interaction):
        """The user's generated items, then the history; the last ``MAX_ITEM_LIST_LENGTH`` kept (what the
        augmented dataset's loader gives for the same target), in the final backbone's item ids. A user without
        generated items (too short to keep their split, see DiffuASRTrainer) keeps the history as is."""
        seq, lens = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        prefix = self.prefix[interaction[self.USER_ID]]
        own = (prefix > 0).sum(1)  # M or 0
        full = torch.cat([prefix, seq], dim=1)
        total = own + lens
        start = (self.m - own) + (total - self.max_seq_length).clamp(min=0)
        positions = torch.arange(self.max_seq_length, device=seq.device)[None]
        out = full.gather(1, (start[:, None] + positions).clamp(max=full.shape[1] - 1))
        new_len = total.clamp(max=self.max_seq_length)
        out = out.masked_fill(positions >= new_len[:, None], 0)
        fields = {self.ITEM_SEQ: self.item_to_final[out], self.ITEM_SEQ_LEN: new_len}
        if self.ITEM_ID in interaction.interaction:
            fields[self.ITEM_ID] = self.item_to_final[interaction[self.ITEM_ID]]
        return Interaction(fields)

    def full_sort_predict(self, interaction):
        if self.eval_mode == "backbone":
            return self.backbone.full_sort_predict(interaction)
        scores = self.final.full_sort_predict(self.augmented_input(interaction))
        return scores[:, self.item_to_final]  # back to this dataset's item order

    def predict(self, interaction):
        # one pass per distinct (history, user), not one per sampled candidate
        return predict_from_full_sort(self, interaction, self.full_sort_predict)

    def calculate_loss(self, interaction):
        raise RuntimeError("DiffuASR is trained by DiffuASRTrainer (run_recbole_diff uses it): backbone, augmenter, "
                           "generation, augmented dataset, backbone on it.")
