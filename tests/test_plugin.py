"""The plugin contract: a model that lists its stages is trained by PluginTrainer without a trainer of its own."""

import glob

import pytest
import torch
import torch.nn.functional as F
from helpers import SLICE, TINY
from recbole.data import create_dataset, data_preparation
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import init_seed

from recbole_diff.config import Config
from recbole_diff.model.plugin.base import PluginRecommender, Stage
from recbole_diff.trainer import PluginTrainer


class Head(PluginRecommender):
    """The smallest plugin: a frozen SASRec and a linear re-scorer of its last state trained on top."""

    EVAL_MODES = ("plugin", "backbone")
    STAGES = (Stage("backbone", "backbone"), Stage("head", "fit", cache=False))

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.build_backbone(config, dataset)
        d = self.adapter.item_embeddings().shape[1]
        self.head = torch.nn.Linear(d, d)
        self.eval_mode = "plugin"

    def stage_parameters(self, name):
        return list(self.head.parameters())

    def full_sort_predict(self, interaction):
        h = self.adapter.last_hidden(interaction)
        if self.eval_mode == "plugin":
            h = self.head(h)
        return h @ self.adapter.item_embeddings().T

    def calculate_loss(self, interaction):
        return F.cross_entropy(self.full_sort_predict(interaction), interaction[self.ITEM_ID])


def setup(tmp_path, **overrides):
    cfg = dict(TINY, checkpoint_dir=str(tmp_path / "saved"), loss_type="CE", train_neg_sample_args=None)
    config = Config(model="SASRec", dataset=SLICE, config_dict=cfg, cmd_line=False)
    # what the plugin's own yaml would hold
    for key, value in dict(backbone="SASRec", **overrides).items():
        config[key] = value
    init_seed(config["seed"], True)
    train, valid, test = data_preparation(config, create_dataset(config))
    init_seed(config["seed"], True)
    return config, Head(config, train.dataset), train, valid, test


@pytest.fixture
def epochs(monkeypatch):
    seen = []
    train_epoch = RecBoleTrainer._train_epoch

    def counted(self, train_data, epoch_idx, *args, **kwargs):
        seen.append((type(self.model).__name__, epoch_idx))
        return train_epoch(self, train_data, epoch_idx, *args, **kwargs)

    monkeypatch.setattr(RecBoleTrainer, "_train_epoch", counted)
    return seen


def test_a_plugin_needs_only_its_stage_list(tmp_path, epochs):
    config, model, train, valid, test = setup(
        tmp_path, stage_cache=str(tmp_path / "stages"), head_epochs=3, head_learning_rate=0.01
    )
    trainer = PluginTrainer(config, model)
    assert trainer.epochs == 3 and trainer.optimizer.param_groups[0]["lr"] == 0.01  # <stage>_<key>
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.head.parameters()
    }
    trainer.fit(train, valid, saved=True)
    # the backbone trained with the run's keys, then the head with its own
    assert epochs == [("SASRec", 0), ("SASRec", 1), ("Head", 0), ("Head", 1), ("Head", 2)]
    assert all(not p.requires_grad for p in model.backbone.parameters())
    result = trainer.extra_results(valid, test)
    assert result["backbone"] == "SASRec" and result["head_steps_trained"] == 3 * len(train)
    assert result["backbone_checkpoint"] and result["backbone_best_valid_result"] is not None
    plugin, alone = trainer.evaluate(test, load_best_model=False), result["backbone_test_result"]
    assert plugin != alone  # two scorings of the same users

    # a second run finds the backbone in the stage cache: it loads it and trains the head only
    del epochs[:]
    config, model2, train, valid, test = setup(
        tmp_path, stage_cache=str(tmp_path / "stages"), head_epochs=3, head_learning_rate=0.01
    )
    PluginTrainer(config, model2).fit(train, valid, saved=True)
    assert epochs == [("Head", 0), ("Head", 1), ("Head", 2)]
    assert len(glob.glob(str(tmp_path / "stages" / "SASRec-backbone-*.pth"))) == 1
    for (name, a), b in zip(model.backbone.state_dict().items(), model2.backbone.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_backbone_stays_bit_identical_while_the_last_stage_trains(tmp_path):
    config, model, train, valid, _ = setup(tmp_path)
    trainer = PluginTrainer(config, model)
    trainer.run_stage("backbone", train, valid, verbose=False, saved=False)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    trainer.fit_final(trainer.final, train, valid, dict(verbose=False, saved=False, show_progress=False))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())


def test_stage_declarations_are_checked(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        Stage("x", "train")
    with pytest.raises(ValueError, match="model class"):
        Stage("x", "model")
    config, model, *_ = setup(tmp_path)
    model.STAGES = (Stage("backbone", "backbone"),)
    with pytest.raises(ValueError, match="'fit' stage"):
        PluginTrainer(config, model)
    model.STAGES = ()
    with pytest.raises(ValueError, match="declares no stages"):
        PluginTrainer(config, model)
    model.STAGES = (Stage("backbone", "backbone"), Stage("counts", "compute"), Stage("head", "fit"))
    with pytest.raises(ValueError, match="compute_stage, load_stage, set_stage_result"):
        PluginTrainer(config, model)
    model.STAGES = Head.STAGES
    with pytest.raises(ValueError, match="no stage 'head' before its last"):
        PluginTrainer(config, model).run_stage("head", None)
