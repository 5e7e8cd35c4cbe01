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
Stages (walked by :class:`~recbole_diff.trainer.DiffuASRTrainer`): ``backbone`` (trained on the original data,
then frozen), ``augmenter`` (the eps loss through RecBole's ``Trainer.fit``; shared through ``stage_cache`` by runs
that differ only in sampling keys), ``generation`` (:meth:`DiffuASR.generate`), ``augmented`` (the backbone trained
on the augmented dataset). See ``docs/diffuasr.md``.
"""

import math
import time
from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recbole.utils import set_color
from tqdm import tqdm

from recbole_diff.data.augment import (
    augmenter_users,
    history_mask,
    random_prefix,
    random_seq_prefix,
    round_to_items,
    training_sequences,
)
from recbole_diff.diffusion import ClassifierGuidance, GaussianDiffusion, StepOptions, classifier_free
from recbole_diff.model.plugin.base import PluginRecommender, Stage
from recbole_diff.model.plugin.sunet import SUNet, square_side
from recbole_diff.model.registry import get_model
from recbole_diff.model.utils import predict_from_full_sort, require_keys

AUGMENTERS = ("diffusion", "random", "random_seq")
GUIDES = ("cg", "cf", "none")
EVAL_MODES = ("augmented", "backbone")
# Backbones that embed the item sequence position by position with item_embedding (classifier guidance hooks it).
CG_BACKBONES = ("SASRec", "LightSANs", "GRU4Rec", "NARM", "NextItNet", "STAMP", "BERT4Rec")
# keys read only when the trained augmenter is sampled or its items are used: runs that differ in these alone
# (a grid's samplers, step counts, guidance strengths) share one augmenter through ``stage_cache``
SAMPLING_KEYS = frozenset(
    {
        "guidance_scale",
        "guide",
        "p_uncond",
        "sampler",
        "sample_steps",
        "eta",
        "classifier_logprob",
        "clip_x0",
        "exclude_history",
        "generation_batch_size",
        "augmented_data_path",
        "eval_mode",
        "long_tail_bounds",
    }
)
# raised whenever what the augmenter's training does changes while its weights keep their shapes, so that a
# stored augmenter of older code is not loaded as if it were this code's
AUGMENTER_STAGE_VERSION = 2
# the augmenter's training batches: S_aug (the first M items) and S_raw (the rest, 0-padded)
AUG_HEADS, AUG_RAW = "diffuasr_s_aug", "diffuasr_s_raw"


class Augmenter(nn.Module):
    """Item table + SU-Net + DDPM (eps) over [M, d] prefixes, conditioned on a pooled sequence embedding."""

    def __init__(self, n_items, m, d, config):
        super().__init__()
        self.m, self.d = m, d
        self.embedding = nn.Embedding(n_items, d, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.sunet = SUNet(
            m, d, tuple(config["unet_channels"]), int(config["unet_res_blocks"]), dropout=float(config["unet_dropout"])
        )
        self.null = nn.Parameter(torch.zeros(d))  # classifier-free guidance's "no condition"
        self.diffusion = GaussianDiffusion(
            config["noise_schedule"], int(config["diffusion_steps"]), parameterization="eps", variance="fixed_small"
        )
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

    def condition(self, items, offsets=None):
        """The pooled embedding of each user's S_raw: flat items with bag ``offsets``, or [B, L] 0-padded rows."""
        return F.embedding_bag(items, self.embedding.weight, offsets, mode=self.pool, padding_idx=0) / self.scale()

    def clip(self):
        """x0 estimates kept inside the (scaled) table's range while sampling, as image diffusion clips to
        [-1, 1]: an unclipped estimate's error grows step by step (measured: x0 ~1000x the items' scale)."""
        if not self.clip_x0:
            return None
        bound = (self.embedding.weight[1:] / self.scale()).abs().max()  # kept on the device
        return lambda x0: x0.clamp(-bound, bound)

    def loss(self, s_aug, s_raw):
        x0 = self.embed(s_aug)
        c = self.condition(s_raw)
        if self.guide == "cf" and self.p_uncond > 0:
            drop = torch.rand(len(c), device=c.device) < self.p_uncond
            c = torch.where(drop[:, None], self.null.expand_as(c), c)
        t = torch.randint(self.diffusion.num_steps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        return F.mse_loss(self.sunet(self.diffusion.q_sample(x0, t, noise), t, c), noise)

    def sample(self, c, guidance_scale=0.0, sampler="ancestral", steps=None, eta=0.0, log_prob_fn=None, generator=None):
        """x0 [B, M, d] from noise, guided as configured: ``cf`` combines the conditional and null branches,
        ``cg`` shifts the noise by ``log_prob_fn(x_t, t)``'s gradient."""
        model_fn, guidance = self.sunet, ()
        if self.guide == "cf":
            model_fn = classifier_free(self.sunet, guidance_scale, {"c": self.null[None]})
        elif self.guide == "cg" and guidance_scale != 0:
            if log_prob_fn is None:
                raise ValueError("guide: cg needs a classifier (the trained backbone).")
            guidance = (ClassifierGuidance(log_prob_fn, guidance_scale),)

        def fn(x, t, c):
            return model_fn(x, t, c=c) if self.guide == "cf" else self.sunet(x, t, c)

        x_T = torch.randn((len(c), self.m, self.d), device=c.device, generator=generator)
        options = StepOptions(model_kwargs={"c": c}, denoised_fn=self.clip(), guidance=guidance)
        return self.diffusion.sample(
            fn, x_T, steps=steps, sampler=sampler, eta=eta, generator=generator, options=options
        )


class DiffuASR(PluginRecommender):
    """DiffuASR plugin; ``--backbone`` picks the RecBole sequential model trained on the augmented data."""

    # No input_type: RecBole then derives it from loss_type, as for the backbone the loaders are built for.
    EVAL_MODES = EVAL_MODES
    STAGES = (
        Stage("backbone", "backbone"),
        Stage("augmenter", "fit"),
        Stage("generation", "compute", cache=False),
        Stage("augmented", "fit", cache=False),
    )

    REQUIRED = (
        "backbone",
        "augmenter",
        "M",
        "guide",
        "guidance_scale",
        "p_uncond",
        "diffusion_steps",
        "noise_schedule",
        "sampler",
        "eta",
        "condition",
        "embedding_init",
        "freeze_embedding",
        "unet_channels",
        "unet_res_blocks",
        "unet_dropout",
        "augmenter_epochs",
        "augmenter_learning_rate",
        "augmenter_batch_size",
        "augmenter_min_raw",
        "exclude_history",
        "generation_batch_size",
        "eval_mode",
        "long_tail_bounds",
        "classifier_logprob",
        "x0_scale",
        "clip_x0",
    )

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
            getLogger().warning(
                f"DiffuASR: unet_channels starts at {config['unet_channels'][0]} channels for "
                f"M = {self.m} positions; the SU-Net cannot carry x_t through that first level. "
                f"Use a first width >= M (the default [16, 16, 16, 16])."
            )
        if self.augmenter is not None and config["embedding_init"] == "backbone":
            own = self.adapter.item_embeddings().shape[1]
            if own != self.d:
                raise ValueError(
                    f"DiffuASR embedding_init: backbone needs diffusion_embedding_size = the backbone's "
                    f"item embedding size ({own}), got {self.d}; or use embedding_init: random."
                )
        if self.augmenter is not None and config["guide"] == "cg" and self.backbone_name not in CG_BACKBONES:
            raise ValueError(
                f"DiffuASR guide: cg feeds the generated prefix to the backbone through its item table; "
                f"'{self.backbone_name}' embeds a graph of the session instead. Use guide: cf, or one of "
                f"{', '.join(CG_BACKBONES)}."
            )
        if self.augmenter is not None and config["guide"] == "cg" and config["embedding_init"] != "backbone":
            raise ValueError(
                "DiffuASR guide: cg reads the generated prefix with the trained backbone, so the "
                "augmenter must live in its item space: set embedding_init: backbone."
            )
        if self.m + int(self.adapter.spec.mask_token) > self.max_seq_length:
            raise ValueError(
                f"DiffuASR: M = {self.m} does not fit MAX_ITEM_LIST_LENGTH = {self.max_seq_length}"
                f"{' with the mask token' if self.adapter.spec.mask_token else ''}."
            )
        self.register_buffer("prefix", torch.zeros(dataset.user_num, self.m, dtype=torch.long))
        self.register_buffer("item_to_final", torch.arange(self.n_items))
        self.eval_mode = config["eval_mode"]
        self.sequences = None  # each user's training items, once the stages start

    def _embedding_size(self, config):
        """d as set, else the backbone's item embedding size when the augmenter starts from its table."""
        if config["diffusion_embedding_size"] is not None:
            return int(config["diffusion_embedding_size"])
        return self.adapter.item_embeddings().shape[1] if config["embedding_init"] == "backbone" else 64

    @staticmethod
    def _check_choices(config):
        for key, allowed in (
            ("augmenter", AUGMENTERS),
            ("guide", GUIDES),
            ("eval_mode", EVAL_MODES),
            ("sampler", ("ancestral", "ddim")),
            ("condition", ("mean", "sum")),
            ("embedding_init", ("backbone", "random")),
            ("classifier_logprob", ("auto", "sigmoid", "softmax")),
            ("x0_scale", ("unit", "raw")),
        ):
            if config[key] not in allowed:
                raise ValueError(f"DiffuASR: {key} must be one of {allowed}, got '{config[key]}'.")
        if int(config["M"]) < 1:
            raise ValueError(f"DiffuASR: M (generated items per user) must be >= 1, got {config['M']}.")

    # ---- stages ----------------------------------------------------------------------------------------
    def skip_stage(self, name):
        return name == "augmenter" and self.augmenter is None

    def stage_parameters(self, name):
        if name == "augmenter":
            return [p for p in self.augmenter.parameters() if p.requires_grad]
        return list(self.final.parameters())

    def training_sequences(self, train_data):
        if self.sequences is None:
            self.sequences = training_sequences(train_data.dataset)
        return self.sequences

    def stage_data(self, name, train_data, logger=None):
        """The augmenter's training batches (S_aug, S_raw) of every user long enough to teach it."""
        if name != "augmenter":
            return train_data
        sequences = self.training_sequences(train_data)
        if self.config["embedding_init"] == "backbone":
            self.init_embedding_from_backbone()
        users = augmenter_users(sequences, self.m, int(self.config["augmenter_min_raw"]))
        if len(users) == 0:
            raise ValueError(
                f"DiffuASR: no user has M + augmenter_min_raw = {self.m + int(self.config['augmenter_min_raw'])}"
                " training items to learn from; lower M or augmenter_min_raw."
            )
        (logger or getLogger()).info(
            set_color(
                f"DiffuASR: the augmenter learns from {len(users)} sequences (first "
                f"{self.m} items generated from the rest)",
                "green",
            )
        )
        return AugmenterLoader(train_data.dataset, sequences, users, self.m, int(self.config["augmenter_batch_size"]))

    def calculate_loss(self, interaction):
        if self.stage != "augmenter":
            raise RuntimeError(
                "DiffuASR trains its augmenter here; the backbones are trained by their own RecBole "
                "trainers in the plugin's stages (run_recbole_diff walks them)."
            )
        return self.augmenter.loss(interaction[AUG_HEADS], interaction[AUG_RAW])

    def stage_ignores(self, name):
        return SAMPLING_KEYS

    def stage_settings(self, name):
        """The condition dropout is the one thing ``guide`` changes in training (``cf`` drops the condition with
        ``p_uncond``; ``cg`` and ``none`` train the same network)."""
        dropout = float(self.config["p_uncond"]) if self.config["guide"] == "cf" else 0.0
        return {"condition_dropout": dropout, "version": AUGMENTER_STAGE_VERSION}

    def stage_state(self, name):
        """The augmenter's weights to store: without the item table when it is the backbone's, frozen (on a
        large catalogue it is ~90% of the file: sports' 18.4k x 64 table against the SU-Net's ~135k weights)."""
        state = self.augmenter.state_dict()
        if self.config["embedding_init"] == "backbone" and self.config["freeze_embedding"]:
            del state["embedding.weight"]
        return state

    def load_stage_state(self, name, state):
        if self.config["embedding_init"] == "backbone":
            self.init_embedding_from_backbone()  # the table's requires_grad, as training leaves it
        state.setdefault("embedding.weight", self.augmenter.embedding.weight.detach().clone())
        self.augmenter.load_state_dict(state)
        self.augmenter.eval()

    def compute_stage(self, name, train_data, valid_data, logger):
        """Generated items for every user whose split they cannot change: {users, prefix, info}."""
        sequences = self.training_sequences(train_data)
        users = self.augmentable_users(sequences, valid_data, logger)
        logger.info(
            set_color(f"DiffuASR: generating {self.m} items for {len(users)} users ({self.augmenter_kind})", "green")
        )
        prefix, seconds = self.generate(sequences, users, bool(self.config["show_progress"]))
        info = {
            "generation_seconds": seconds,
            "generation_users_per_s": len(users) / max(seconds, 1e-9),
            "users_not_augmented": self.stage_info.get("users_not_augmented", 0),
        }
        logger.info(f"DiffuASR: {info['generation_users_per_s']:.1f} users/s")
        return {"users": users, "prefix": prefix, "info": info}

    def set_stage_result(self, name, product, path, reused):
        self.prefix[product["users"].to(self.prefix.device)] = product["prefix"].to(self.prefix.device)
        self.stage_info.update(product["info"])
        self.generated_users, self.generation_reused = product["users"], reused

    def augmentable_users(self, sequences, valid_data, logger):
        """Users whose leave-one-out split the prepended items cannot change: RecBole holds out
        ``min(2, rows - 1)`` rows, so a user without a validation row (3 interactions or fewer) would see a
        training target move to validation. Those users keep their original data."""
        users = torch.nonzero(sequences.lengths > 0).flatten()
        if valid_data is None:
            return users
        held = torch.zeros(len(sequences.lengths), dtype=torch.bool)
        held[valid_data.dataset.inter_feat[valid_data.dataset.uid_field]] = True
        skipped = int((~held[users]).sum())
        if skipped:
            logger.info(f"DiffuASR: {skipped} users without a validation item keep their original data")
        self.stage_info["users_not_augmented"] = skipped
        return users[held[users]]

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, sequences, users, show_progress=False):
        """([len(users), M] generated items (this dataset's ids, on the CPU), seconds taken) for the given users,
        conditioned on their training items only."""
        c = self.config
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(c["seed"]))
        cpu_gen = torch.Generator().manual_seed(int(c["seed"]))
        batch = int(c["generation_batch_size"])
        chunks = range(0, len(users), batch)
        if show_progress:
            chunks = tqdm(
                chunks, total=math.ceil(len(users) / batch), ncols=100, desc=set_color("DiffuASR generation", "pink")
            )
        out, start = [], time.perf_counter()
        for lo in chunks:
            b = users[lo : lo + batch]
            exclude = history_mask(sequences, b, self.n_items) if c["exclude_history"] else None
            if self.augmenter_kind == "random":
                items = random_prefix(b, self.m, self.n_items, cpu_gen, exclude)
            elif self.augmenter_kind == "random_seq":
                items = random_seq_prefix(sequences, b, self.m, cpu_gen)
            else:
                items = self.diffusion_prefix(sequences, b, exclude, generator)
            out.append(items.cpu())
        prefix = torch.cat(out) if out else torch.empty(0, self.m, dtype=torch.long)
        return prefix, time.perf_counter() - start

    def diffusion_prefix(self, sequences, users, exclude, generator):
        """One generation batch: the augmenter sampled from each user's condition, rounded to items."""
        c, aug = self.config, self.augmenter
        flat, offsets = sequences.bags(users)
        cond = aug.condition(flat.to(self.device), offsets.to(self.device))
        log_prob = None
        if c["guide"] == "cg":
            log_prob = self.first_item_log_prob(sequences.heads(users, 1)[:, 0].to(self.device))
        x0 = aug.sample(
            cond, float(c["guidance_scale"]), c["sampler"], c["sample_steps"], float(c["eta"]), log_prob, generator
        )
        return self.round(x0, None if exclude is None else exclude.to(self.device))

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
                out[where] = x[:, -int(where[0].sum()) :].reshape(-1, x.shape[-1]).to(out.dtype)
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
        generated items (too short to keep their split, see ``augmentable_users``) keeps the history as is."""
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


class AugmenterLoader:
    """The augmenter's training batches as RecBole Interactions, users reshuffled every epoch: each user's first
    M training items (S_aug) and the rest, 0-padded to the batch's longest (S_raw)."""

    def __init__(self, dataset, sequences, users, m, batch_size):
        self._dataset = self.dataset = dataset  # RecBole's Trainer.fit reads train_data.dataset
        self.shuffle = True
        self.sequences, self.users, self.m, self.batch_size = sequences, users, m, batch_size

    def __len__(self):
        return math.ceil(len(self.users) / self.batch_size)

    def __iter__(self):
        order = self.users[torch.randperm(len(self.users))]
        for lo in range(0, len(order), self.batch_size):
            b = order[lo : lo + self.batch_size]
            flat, offsets = self.sequences.bags(b, start=self.m)
            counts = torch.diff(offsets, append=torch.tensor([len(flat)]))
            raw = torch.zeros(len(b), int(counts.max()), dtype=torch.long)
            rows = torch.repeat_interleave(torch.arange(len(b)), counts)
            raw[rows, torch.arange(len(flat)) - torch.repeat_interleave(offsets, counts)] = flat
            yield Interaction({AUG_HEADS: self.sequences.heads(b, self.m), AUG_RAW: raw})
