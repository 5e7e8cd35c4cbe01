"""PDRecTrainer: TI-DiffRec (stage 1), the preference store (stage 2), then the backbone's BCE training with
HBR/NNS/DPA through RecBole's ``Trainer.fit`` (stage 3). Nothing here reads validation or test items except
stage 1's validation-based early stopping."""
import os

import numpy as np
import torch
from recbole.data.dataloader import UserDataLoader
from recbole.data.interaction import Interaction
from recbole.utils import ModelType, init_seed, set_color

from recbole_diff.config import stage_config
from recbole_diff.data.interactions import training_interactions
from recbole_diff.data.pdrec import (
    STORE_VERSION,
    PreferenceStore,
    TrainingItems,
    check_store_meta,
    compute_preference_store,
    model_fingerprint,
    store_meta,
    store_path,
    timed,
)
from recbole_diff.io import load_checkpoint
from recbole_diff.model.plugin.pdrec import LAST_FIELD
from recbole_diff.model.registry import get_model
from recbole_diff.trainer.registry import get_trainer
from recbole_diff.trainer.stage_cache import Stage, claim_or_wait, shared_stage, stage_key
from recbole_diff.trainer.trainer import Trainer


class PDRecTrainer(Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.tidiffrec_checkpoint = config["tidiffrec_checkpoint"]
        self.tidiffrec, self.stage1 = None, None
        self.info = {}

    # ---- stage 1 -----------------------------------------------------------------------------------------
    def tidiffrec_config(self):
        overrides = dict(self.config["tidiffrec"] or {})
        overrides.setdefault("epochs", self.config["tidiffrec_epochs"])
        overrides["mask_history"] = True  # validated on the sequential split, which keeps the history
        return stage_config(self.config, "TIDiffRec", overrides)

    def prepare_tidiffrec(self, train_data, valid_data, verbose=True, saved=True, show_progress=False):
        config = self.tidiffrec_config()
        dataset = train_data.dataset
        model = get_model("TIDiffRec")(config, dataset).to(self.device)
        self.stage1 = get_trainer(ModelType.GENERAL, "TIDiffRec")(config, model)
        if self.tidiffrec_checkpoint:
            self.load_tidiffrec(model, self.tidiffrec_checkpoint)
        else:
            with shared_stage(config, "TIDiffRec", "TIDiffRec", self.logger) as stage:
                if stage.hit:
                    self.load_tidiffrec(model, stage.path)
                    self.tidiffrec_checkpoint = stage.path
                else:
                    stage.trainer(self.stage1)
                    self.train_tidiffrec(config, dataset, valid_data, verbose, saved, show_progress)
                    if self.tidiffrec_checkpoint and stage.store(self.tidiffrec_checkpoint):
                        self.tidiffrec_checkpoint = stage.path  # so that its preference store is shared too
        model.eval()
        self.tidiffrec = model
        # the next stages draw the same random numbers whether TI-DiffRec was trained here or loaded
        init_seed(self.config["seed"], self.config["reproducibility"])
        return model

    def train_tidiffrec(self, config, dataset, valid_data, verbose, saved, show_progress):
        self.logger.info(set_color("PDRec stage 1: training TI-DiffRec on the training split", "green"))
        loader = UserDataLoader(config, dataset, None, shuffle=True)
        self.stage1.fit(loader, valid_data, verbose=verbose, saved=saved, show_progress=show_progress)
        if saved:
            self.stage1.load_model_file()
            self.tidiffrec_checkpoint = self.stage1.saved_model_file

    def load_tidiffrec(self, model, path):
        self.logger.info(set_color(f"PDRec: loading TI-DiffRec from {path}", "green"))
        checkpoint = load_checkpoint(path, self.device)
        saved = checkpoint["config"]
        if saved["model"] != "TIDiffRec" or str(saved["dataset"]) != str(self.config["dataset"]):
            raise ValueError(f"tidiffrec_checkpoint '{path}' holds a {saved['model']} trained on '{saved['dataset']}'"
                             f", but this run needs a TIDiffRec on '{self.config['dataset']}'.")
        own = model.state_dict()
        bad = [k for k in own if k not in checkpoint["state_dict"] or checkpoint["state_dict"][k].shape != own[k].shape]
        if bad:
            raise ValueError(f"tidiffrec_checkpoint '{path}' does not match this dataset/config: '{bad[0]}' differs "
                             "(item count or dims_dnn changed?).")
        model.load_state_dict(checkpoint["state_dict"])

    # ---- stage 2 -----------------------------------------------------------------------------------------
    def prepare_preferences(self, train_data, valid_data, verbose=True, saved=True, show_progress=False):
        """Stages 1 and 2. With ``stage_cache`` the store is a stage of its own, keyed by stage 1's key and
        the store's settings: a stored one is used without TI-DiffRec's weights (a new machine resumes from the
        committed store alone); TI-DiffRec is still loaded when its stage is there too, to report its test result.
        With ``tidiffrec_checkpoint`` (or no cache) the store lives next to that checkpoint."""
        dataset = train_data.dataset
        users, items = training_interactions(dataset)
        training = TrainingItems.from_pairs(users, items, dataset.user_num, dataset.item_num)
        if self.tidiffrec_checkpoint or not self.config["stage_cache"]:
            tidiffrec = self.prepare_tidiffrec(train_data, valid_data, verbose, saved, show_progress)
            return self.prepare_store(tidiffrec, training, saved)
        with shared_stage(self.config, "PDRec-preferences", None, self.logger, key=self.store_stage_key()) as stage:
            if stage.hit:
                store = PreferenceStore.load(stage.path)
                check_store_meta(store.meta, self.store_meta(training, stage.meta["tidiffrec"]), stage.path)
                self.logger.info(set_color(f"PDRec stage 2: reusing the stored preference store {stage.path}", "green"))
                self.info.update(preference_store=stage.path, preference_store_reused=True)
                stage1 = Stage(self.config["stage_cache"], "TIDiffRec", self.tidiffrec_config(), "TIDiffRec")
                if stage1._load():
                    self.tidiffrec_checkpoint = stage1.path
                    self.prepare_tidiffrec(train_data, valid_data, verbose, saved, show_progress)
                return store
            tidiffrec = self.prepare_tidiffrec(train_data, valid_data, verbose, saved, show_progress)
            fingerprint = model_fingerprint(tidiffrec)
            store = self.compute_store(tidiffrec, training, self.store_meta(training, fingerprint))
            if saved:
                tmp = f"{stage.path}.store-{os.getpid()}"
                store.save(tmp)
                if stage.store(tmp, tidiffrec=fingerprint, store_mb=os.path.getsize(tmp) / 2 ** 20):
                    self.info["preference_store"] = stage.path
                os.remove(tmp)
            return store

    def store_stage_key(self):
        """Stage 1's key plus what only the store reads: another TI-DiffRec or setting is another stage."""
        key = stage_key(self.tidiffrec_config(), "TIDiffRec")
        key["stage_model"] = "PDRec-preferences"
        key["store"] = {"version": STORE_VERSION, "dpa_m": int(self.config["dpa_m"]),
                        "omega_m": float(self.config["omega_m"])}
        return key

    def store_meta(self, training, fingerprint):
        c = self.config
        return store_meta(c["dataset"], training, c["dpa_m"], c["omega_m"], fingerprint)

    def prepare_store(self, tidiffrec, training, saved=True):
        meta = self.store_meta(training, model_fingerprint(tidiffrec))
        path = store_path(self.tidiffrec_checkpoint, meta) if self.tidiffrec_checkpoint and saved else None
        if path is None:
            return self.compute_store(tidiffrec, training, meta)
        # runs sharing a stage-1 file share its store: one computes it, the others wait and load it
        mine = claim_or_wait(path + ".lock", lambda: os.path.isfile(path), self.logger, f"the preference store {path}")
        try:
            if not mine:
                return self.load_store(path, meta)
            store = self.compute_store(tidiffrec, training, meta)
            store.save(path)
            self.info["preference_store"] = path
            return store
        finally:
            if mine:
                os.remove(path + ".lock")

    def load_store(self, path, meta):
        store = PreferenceStore.load(path)
        check_store_meta(store.meta, meta, path)
        self.logger.info(set_color(f"PDRec stage 2: reusing the preference store {path}", "green"))
        self.info.update(preference_store=path, preference_store_reused=True)
        return store

    def compute_store(self, tidiffrec, training, meta):
        c = self.config
        self.logger.info(set_color(f"PDRec stage 2: preferences of {training.n_users} users over "
                                   f"{training.n_items} items", "green"))
        store, seconds = timed(compute_preference_store, tidiffrec.preferences, training, int(c["dpa_m"]),
                               float(c["omega_m"]), int(c["preference_batch_size"]), self.device,
                               bool(c["show_progress"]), meta)
        self.logger.info(f"PDRec stage 2: {training.n_users / seconds:.0f} users/s, store "
                         f"{store.nbytes() / 2 ** 20:.1f} MB (a dense users x items matrix: "
                         f"{training.n_users * training.n_items * 4 / 2 ** 20:.1f} MB)")
        self.info.update(preference_seconds=seconds, preference_store_mb=store.nbytes() / 2 ** 20,
                         preference_store_reused=False)
        return store

    # ---- stage 3 -----------------------------------------------------------------------------------------
    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self.model.needs_preferences:
            self.model.set_store(self.prepare_preferences(train_data, valid_data, verbose, saved, show_progress))
            self._report_hbr(train_data.dataset)
        if self.model.use_dpa and self.model.dpa_state == "last":
            mark_last_rows(train_data.dataset)
        parts = [name for name, on in (("HBR", self.model.use_hbr), ("NNS", self.model.use_nns),
                                       ("DPA", self.model.use_dpa)) if on]
        self.logger.info(set_color(f"PDRec stage 3: training {self.model.backbone_name} with BCE"
                                   f"{' + ' + ' + '.join(parts) if parts else ''}", "green"))
        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    def _report_hbr(self, train_dataset):
        """HBR's mean weight over the training rows: also the constant positive weight of the
        ``pos_weight_from_hbr`` baseline, which separates reweighting from a larger positive weight."""
        inter = train_dataset.inter_feat
        users, items = inter[train_dataset.uid_field].to(self.device), inter[train_dataset.iid_field].to(self.device)
        mean = float(self.model.hbr[self.model.store.lookup(users, items)].mean())
        self.info["hbr_mean_weight"] = mean
        if self.model.pos_weight_from_hbr and not self.model.use_hbr:
            self.model.pos_weight = mean
            self.logger.info(f"PDRec: constant positive weight {mean:.4f} (HBR's mean)")

    def extra_results(self, valid_data=None, test_data=None):
        out = {"backbone": self.model.backbone_name, "tidiffrec_checkpoint": self.tidiffrec_checkpoint,
               "positive_weight": None if self.model.use_hbr else self.model.pos_weight, **self.info}
        if self.stage1 is not None and test_data is not None:
            out["tidiffrec_test_result"] = self.stage1.evaluate(test_data, load_best_model=False)
        return out


def mark_last_rows(train_dataset):
    """Add ``LAST_FIELD`` to a sequential training split: True on each user's row whose prefix is the user's
    whole training history (the latest target; RecBole writes a user's rows in time order, so the last row)."""
    inter = train_dataset.inter_feat
    users = inter[train_dataset.uid_field].numpy()
    times = inter[train_dataset.time_field].numpy() if train_dataset.time_field in inter.columns else np.zeros(len(users))
    order = np.lexsort((np.arange(len(users)), times, users))
    last = np.zeros(len(users), dtype=bool)
    ends = np.r_[users[order][1:] != users[order][:-1], True]
    last[order[ends]] = True
    inter.update(Interaction({LAST_FIELD: torch.from_numpy(last)}))
