r"""PDRec (AAAI 2024): TI-DiffRec's preferences over all items steer a sequential backbone's BCE training.

Stage 1 trains :class:`~recbole_diff.model.plugin.tidiffrec.TIDiffRec` on the training split (or loads
``tidiffrec_checkpoint``); stage 2 keeps a compact preference store (:mod:`recbole_diff.data.pdrec`); stage 3
trains the backbone with, per training row (user u, target i, state h):

``w * BCE(s(h, i), 1) + 1/2 BCE(s(h, j_uniform), 0) + 1/2 BCE(s(h, j_nns), 0) + omega_d * mean_n BCE(s(h, k), 1)``

* HBR: ``w`` from the preferences of u's training items (``omega_r``, ``c_w``, ``omega_f``);
* NNS: ``j_nns`` a fresh item of u's low-preference band of non-interacted items (``omega_m``) for every row
  of every epoch, as the authors sample: each user's pool in the store (``nns_pool_epochs`` epochs of its draws,
  uniform without replacement from the band) is walked in order;
* DPA: k runs over the ``dpa_n`` items of u's top-``dpa_m`` non-interacted ones that the current backbone
  scores highest; applied at u's last-behaviour state (``dpa_state: last``, the paper's h_u: the training row
  whose prefix is u's whole training history, once per user and epoch, averaged over those rows of the batch)
  or at every row's own state (``dpa_state: prefix``).

With ``use_hbr``, ``use_nns`` and ``use_dpa`` all off this is the backbone trained with BCE and one uniform
negative (``pos_weight`` scales the positive), and stages 1 and 2 are skipped. The stages (``tidiffrec``,
``preferences``, ``backbone``) run in :class:`~recbole_diff.trainer.PluginTrainer`; see ``docs/pdrec.md``.
"""

from logging import getLogger

import numpy as np
import torch
import torch.nn.functional as F
from recbole.data.interaction import Interaction
from recbole.utils import InputType, set_color

from recbole_diff.data.interactions import training_interactions
from recbole_diff.data.pdrec import (
    STORE_VERSION,
    PreferenceStore,
    TrainingItems,
    check_store_meta,
    compute_preference_store,
    draw_pool,
    hbr_weights,
    model_fingerprint,
    store_meta,
    timed,
)
from recbole_diff.model.backbone import BackboneAdapter
from recbole_diff.model.plugin.base import PluginRecommender, Stage
from recbole_diff.model.registry import get_model
from recbole_diff.model.utils import predict_from_full_sort, require_keys

SCORES = ("dot", "cosine")
DPA_STATES = ("last", "prefix")
# training rows whose prefix is the user's whole training history; stage_data adds it to the training data
LAST_FIELD = "pdrec_last_row"
# Next-item models whose own score is the dot product of forward()'s state with item_embedding.
BACKBONES = ("SASRec", "GRU4Rec", "NARM", "NextItNet", "LightSANs", "STAMP", "SRGNN", "GCSAN")


class PDRec(PluginRecommender):
    """PDRec plugin; ``--backbone`` picks the RecBole sequential model it trains."""

    input_type = InputType.PAIRWISE  # RecBole's loader samples the uniform negative (NEG_ITEM_ID)
    needs_timestamp = True  # stage 1 is TI-DiffRec (checked at config time)
    STAGES = (
        Stage("tidiffrec", "model", model="TIDiffRec", only_for="preferences"),
        Stage("preferences", "compute"),
        Stage("backbone", "fit", cache=False),
    )

    REQUIRED = (
        "backbone",
        "use_hbr",
        "use_dpa",
        "use_nns",
        "omega_r",
        "c_w",
        "omega_f",
        "omega_m",
        "dpa_m",
        "dpa_n",
        "omega_d",
        "dpa_state",
        "pos_weight",
        "pos_weight_from_hbr",
        "score",
        "temperature",
        "tidiffrec_epochs",
        "preference_batch_size",
        "nns_pool_epochs",
    )

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        require_keys(config, self.REQUIRED, "PDRec")
        self.backbone_name = config["backbone"]
        if self.backbone_name not in BACKBONES:
            raise ValueError(
                f"PDRec trains a next-item backbone scored by dot product; '{self.backbone_name}' is "
                f"not one. Use one of: {', '.join(BACKBONES)}."
            )
        if config["score"] not in SCORES:
            raise ValueError(f"PDRec: score must be one of {SCORES}, got '{config['score']}'.")
        if not 0 <= float(config["omega_m"]) < 0.99:
            raise ValueError(f"PDRec: omega_m must be in [0, 0.99), got {config['omega_m']}.")
        if config["dpa_state"] not in DPA_STATES:
            raise ValueError(
                f"PDRec: dpa_state must be one of {DPA_STATES} (last: the user's last-behaviour state, "
                f"the paper's; prefix: every training row's), got '{config['dpa_state']}'."
            )
        if not 0 < int(config["dpa_n"]) <= int(config["dpa_m"]):
            raise ValueError(f"PDRec needs 0 < dpa_n <= dpa_m, got dpa_n={config['dpa_n']}, dpa_m={config['dpa_m']}.")
        self.backbone = get_model(self.backbone_name)(config, dataset)
        self.adapter = BackboneAdapter(self.backbone, self.backbone_name)
        self.use_hbr, self.use_dpa, self.use_nns = (bool(config[k]) for k in ("use_hbr", "use_dpa", "use_nns"))
        self.omega_r, self.c_w, self.omega_f = float(config["omega_r"]), float(config["c_w"]), float(config["omega_f"])
        self.omega_d, self.dpa_n, self.dpa_state = float(config["omega_d"]), int(config["dpa_n"]), config["dpa_state"]
        self.pos_weight = float(config["pos_weight"])
        self.pos_weight_from_hbr = bool(config["pos_weight_from_hbr"])
        self.score_kind, self.temperature = config["score"], float(config["temperature"])
        if int(config["nns_pool_epochs"]) < 1:
            raise ValueError(f"PDRec: nns_pool_epochs must be >= 1, got {config['nns_pool_epochs']}.")
        self.store, self.hbr = None, None
        if self.use_nns:
            # draws per user so far: a buffer, so a resumed run walks on where it stopped
            self.register_buffer("nns_cursor", torch.zeros(dataset.user_num, dtype=torch.long))

    @property
    def needs_preferences(self):
        return self.use_hbr or self.use_dpa or self.use_nns or self.pos_weight_from_hbr

    # ---- stages ----------------------------------------------------------------------------------------
    def skip_stage(self, name):
        return name in ("tidiffrec", "preferences") and not self.needs_preferences

    def stage_config_overrides(self, name):
        return {"mask_history": True}  # TI-DiffRec is validated on the sequential split, which keeps the history

    def stage_settings(self, name):
        c = self.config
        return {
            "version": STORE_VERSION,
            "dpa_m": int(c["dpa_m"]),
            "omega_m": float(c["omega_m"]),
            "nns_pool_epochs": int(c["nns_pool_epochs"]),
        }

    def _training_items(self, train_data):
        dataset = train_data.dataset
        users, items = training_interactions(dataset)
        return TrainingItems.from_pairs(users, items, dataset.user_num, dataset.item_num)

    @staticmethod
    def _training_rows(train_data):
        """Training rows per user in an epoch (one NNS draw each)."""
        dataset = train_data.dataset
        return torch.bincount(dataset.inter_feat[dataset.uid_field].long(), minlength=dataset.user_num)

    def _store_meta(self, training, rows, fingerprint):
        c = self.config
        return store_meta(c["dataset"], training, c["dpa_m"], c["omega_m"], fingerprint, rows, c["nns_pool_epochs"])

    def compute_stage(self, name, train_data, valid_data, logger):
        """Stage 2: the preference store from TI-DiffRec's preferences over the training split."""
        c, tidiffrec = self.config, self.stage_models["tidiffrec"]
        training, rows = self._training_items(train_data), self._training_rows(train_data)
        meta = self._store_meta(training, rows, model_fingerprint(tidiffrec))
        logger.info(
            set_color(f"PDRec stage 2: preferences of {training.n_users} users over {training.n_items} items", "green")
        )
        store, seconds = timed(
            compute_preference_store,
            tidiffrec.preferences,
            training,
            int(c["dpa_m"]),
            float(c["omega_m"]),
            int(c["preference_batch_size"]),
            self.device,
            bool(c["show_progress"]),
            meta,
            rows,
            int(c["nns_pool_epochs"]),
        )
        logger.info(
            f"PDRec stage 2: {training.n_users / seconds:.0f} users/s, store {store.nbytes() / 2**20:.1f} "
            f"MB (a dense users x items matrix: {training.n_users * training.n_items * 4 / 2**20:.1f} MB)"
        )
        self.stage_info.update(preference_seconds=seconds, preference_store_mb=store.nbytes() / 2**20)
        return store

    def load_stage(self, name, path, train_data, meta):
        """A stored preference store, refused when made for another dataset, split, TI-DiffRec or setting."""
        store = PreferenceStore.load(path)
        tidiffrec = self.stage_models.get("tidiffrec")
        fingerprint = meta["tidiffrec"] if meta else model_fingerprint(tidiffrec)
        expected = self._store_meta(self._training_items(train_data), self._training_rows(train_data), fingerprint)
        check_store_meta(store.meta, expected, path)
        return store

    def stage_meta(self, name, product):
        return {"tidiffrec": product.meta["tidiffrec"], "store_mb": product.nbytes() / 2**20}

    def set_stage_result(self, name, product, path, reused):
        if reused:
            getLogger().info(set_color(f"PDRec stage 2: reusing the preference store {path}", "green"))
        self.stage_info.update(preference_store=path, preference_store_reused=reused)
        self.set_store(product)

    def stage_data(self, name, train_data, logger=None):
        """Stage 3's training rows: the run's, with each user's last row marked for DPA at the last state; HBR's
        mean weight is reported (and is the constant weight of ``pos_weight_from_hbr``)."""
        if self.needs_preferences:
            self._report_hbr(train_data.dataset, logger or getLogger())
        if self.use_dpa and self.dpa_state == "last":
            mark_last_rows(train_data.dataset)
        parts = [name for name, on in (("HBR", self.use_hbr), ("NNS", self.use_nns), ("DPA", self.use_dpa)) if on]
        (logger or getLogger()).info(
            set_color(
                f"PDRec stage 3: training {self.backbone_name} with BCE{' + ' + ' + '.join(parts) if parts else ''}",
                "green",
            )
        )
        self.stage_info["positive_weight"] = None if self.use_hbr else self.pos_weight
        return train_data

    def _report_hbr(self, train_dataset, logger):
        """HBR's mean weight over the training rows: also the constant positive weight of the
        ``pos_weight_from_hbr`` baseline, which separates reweighting from a larger positive weight."""
        inter = train_dataset.inter_feat
        users, items = inter[train_dataset.uid_field].to(self.device), inter[train_dataset.iid_field].to(self.device)
        mean = float(self.hbr[self.store.lookup(users, items)].mean())
        self.stage_info["hbr_mean_weight"] = mean
        if self.pos_weight_from_hbr and not self.use_hbr:
            self.pos_weight = mean
            logger.info(f"PDRec: constant positive weight {mean:.4f} (HBR's mean)")

    def set_store(self, store):
        """Stage 2's store; HBR's weights follow from it and the config's omega_r, c_w, omega_f."""
        self.store = store.to(self.device)
        self.hbr = hbr_weights(store, self.omega_r, self.c_w, self.omega_f).to(self.device)
        if self.use_nns:
            sizes = store.pool_sizes
            whole = int((sizes == store.band_size).sum())
            getLogger().info(
                f"PDRec NNS: {len(store.pool)} pooled band items ({store.pool.numel() * 4 / 2**20:.1f} MB): each "
                f"user draws a new item for {int(self.config['nns_pool_epochs'])} epochs, then its pool repeats "
                f"({whole} of {len(sizes)} users, whose band is smaller, cycle through their whole band)"
            )

    # ---- scores ----------------------------------------------------------------------------------------
    def score(self, h, items):
        """s(h, j) for items [B] or [B, k]."""
        e = self.backbone.item_embedding(items)
        if self.score_kind == "cosine":
            h, e = F.normalize(h, dim=-1), F.normalize(e, dim=-1)
        h = h if items.dim() == 1 else h[:, None]
        s = (h * e).sum(-1)
        return s * self.temperature if self.score_kind == "cosine" else s

    def full_sort_predict(self, interaction):
        h = self.adapter.last_hidden(interaction)
        e = self.adapter.item_embeddings()
        if self.score_kind == "cosine":
            return self.temperature * F.normalize(h, dim=-1) @ F.normalize(e, dim=-1).T
        return h @ e.T

    def predict(self, interaction):
        # one backbone pass per distinct history, not one per sampled candidate (RecBole's way: 101x the work)
        return predict_from_full_sort(self, interaction, self.full_sort_predict)

    # ---- training --------------------------------------------------------------------------------------
    def positive_weights(self, users, items):
        if not self.use_hbr:
            return torch.full(items.shape, self.pos_weight, device=items.device)
        return self.hbr[self.store.lookup(users, items)]

    def soft_positives(self, h, users):
        """DPA: of each user's top-m non-interacted items by preference, the ``dpa_n`` the current backbone
        scores highest: (items [B, n], their scores [B, n])."""
        candidates = self.store.topm[users]
        s_cand = self.score(h, candidates)
        best = torch.topk(s_cand.detach(), self.dpa_n, dim=1).indices
        return candidates.gather(1, best), s_cand.gather(1, best)

    def nns_negatives(self, users):
        """One fresh negative per row from its user's band: the user's next pool entries (new at every call,
        so every epoch)."""
        return draw_pool(self.store, users, self.nns_cursor)

    def dpa_loss(self, h, users, interaction):
        """Per row: omega_d * mean_n BCE(s_soft, 1) on the rows DPA applies to (all, or each user's last row,
        whose mean over the batch is spread over its rows so that it adds up to that mean)."""
        _, s_soft = self.soft_positives(h, users)
        loss = F.binary_cross_entropy_with_logits(s_soft, torch.ones_like(s_soft), reduction="none").mean(1)
        if self.dpa_state == "prefix":
            return self.omega_d * loss
        if LAST_FIELD not in interaction:
            raise RuntimeError(
                f"PDRec with dpa_state: last needs the '{LAST_FIELD}' field of the training data; "
                "train it with run_recbole_diff (its PluginTrainer adds it)."
            )
        last = interaction[LAST_FIELD].to(loss.dtype)
        # no host sync: an empty selection divides 0 by 1
        return self.omega_d * (loss * last).sum() / last.sum().clamp(min=1) * torch.ones_like(loss)

    def _require_store(self):
        if self.needs_preferences and self.store is None:
            raise RuntimeError(
                "PDRec with use_hbr/use_nns/use_dpa needs its preference store: train it with "
                "run_recbole_diff (its PluginTrainer runs stages 1 and 2 first)."
            )

    def calculate_loss(self, interaction):
        self._require_store()
        users, pos = interaction[self.USER_ID], interaction[self.ITEM_ID]
        h = self.adapter.last_hidden(interaction)
        bce = F.binary_cross_entropy_with_logits
        s_pos, s_neg = self.score(h, pos), self.score(h, interaction[self.NEG_ITEM_ID])
        loss = self.positive_weights(users, pos) * bce(s_pos, torch.ones_like(s_pos), reduction="none")
        neg_loss = bce(s_neg, torch.zeros_like(s_neg), reduction="none")
        if self.use_nns:
            s_nns = self.score(h, self.nns_negatives(users))
            neg_loss = 0.5 * neg_loss + 0.5 * bce(s_nns, torch.zeros_like(s_nns), reduction="none")
        loss = loss + neg_loss
        if self.use_dpa:
            loss = loss + self.dpa_loss(h, users, interaction)
        return loss.mean()


def mark_last_rows(train_dataset):
    """Add ``LAST_FIELD`` to a sequential training split: True on each user's row whose prefix is the user's
    whole training history (the latest target; RecBole writes a user's rows in time order, so the last row)."""
    inter = train_dataset.inter_feat
    users = inter[train_dataset.uid_field].numpy()
    times = (
        inter[train_dataset.time_field].numpy() if train_dataset.time_field in inter.columns else np.zeros(len(users))
    )
    order = np.lexsort((np.arange(len(users)), times, users))
    last = np.zeros(len(users), dtype=bool)
    ends = np.r_[users[order][1:] != users[order][:-1], True]
    last[order[ends]] = True
    inter.update(Interaction({LAST_FIELD: torch.from_numpy(last)}))
