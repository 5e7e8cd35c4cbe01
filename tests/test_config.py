"""Config layering, registration and early errors on bad input."""

import os
import sys

import pytest
import yaml
from helpers import DATA_PATH, SLICE, TINY
from recbole.utils import InputType

from recbole_diff import get_model, get_trainer, properties_dir
from recbole_diff.config import Config, UnknownKeyError, stage_config
from recbole_diff.model.plugin.base import PluginRecommender
from recbole_diff.trainer import CompatMixin


def make(model="SASRec", **overrides):
    return Config(model=model, dataset=SLICE, config_dict=dict(TINY, **overrides), cmd_line=False)


class ToyPlugin(PluginRecommender):
    """A minimal plugin-shaped model: only what the Config looks at."""

    input_type = InputType.POINTWISE


def test_our_overall_yaml_is_layered_over_recboles():
    config = make()
    assert config["metrics"] == ["Hit", "NDCG", "MRR"] and config["topk"] == [5, 10, 20]
    assert config["eval_args"]["order"] == "TO" and config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["threads"] == 1
    assert config["inner_size"] == 32  # user dict beats every yaml
    assert config["hidden_act"] == "gelu"  # RecBole's SASRec.yaml is still there
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE without sampling, no RecBole error


def test_plugin_gets_its_backbones_recbole_yaml():
    config = Config(model=ToyPlugin, dataset=SLICE, config_dict=dict(TINY), backbone="GRU4Rec", cmd_line=False)
    assert config["backbone"] == "GRU4Rec"
    assert config["num_layers"] == 1 and config["dropout_prob"] == 0.3
    default = Config(model=ToyPlugin, dataset=SLICE, config_dict=dict(TINY), cmd_line=False)
    assert default["backbone"] == "SASRec"


def test_plugin_backbone_errors_name_the_choices():
    with pytest.raises(ValueError, match="Unknown backbone .NoSuchRec.*SASRec"):
        Config(model=ToyPlugin, dataset=SLICE, config_dict=dict(TINY), backbone="NoSuchRec", cmd_line=False)
    with pytest.raises(ValueError, match="sequential RecBole backbone.*'BPR' is a general"):
        Config(model=ToyPlugin, dataset=SLICE, config_dict=dict(TINY), backbone="BPR", cmd_line=False)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError) as err:
        make("SASRecc")
    assert "Unknown model 'SASRecc'" in str(err.value) and "GRU4Rec" in str(err.value)


def test_command_line_is_read_only_when_asked(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "--tb=short", "--epochs=7"])
    assert make()["tb"] is None and make()["epochs"] == 2
    with_cmd = Config(model="SASRec", dataset=SLICE, config_dict=dict(TINY), cmd_line=True)
    assert with_cmd["epochs"] == 7


def test_missing_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Config(model="SASRec", dataset="no-such-data", config_dict={"data_path": str(tmp_path)}, cmd_line=False)
    msg = str(err.value)
    assert "no-such-data.inter" in msg and str(tmp_path) in msg and "never downloads" in msg


def _write_dataset(root, name, header, rows):
    os.makedirs(root / name)
    with open(root / name / f"{name}.inter", "w") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(map(str, r)) + "\n")


def test_missing_timestamp_field_is_refused_before_training(tmp_path):
    _write_dataset(tmp_path, "notime", ["user_id:token", "item_id:token"], [(1, 2), (1, 3)])
    with pytest.raises(ValueError, match="no 'timestamp' column"):
        Config(model="SASRec", dataset="notime", config_dict={"data_path": str(tmp_path)}, cmd_line=False)
    with pytest.raises(ValueError, match="leaves out 'timestamp'"):
        make(load_col={"inter": ["user_id", "item_id"]})


def test_wrong_types_are_refused_with_the_key():
    with pytest.raises(TypeError, match="'epochs' must be of type int"):
        make(epochs="ten")
    with pytest.raises(TypeError, match="'show_progress' must be of type bool"):
        make(show_progress=1)
    assert make(learning_rate=1)["learning_rate"] == 1  # an int is a fine float


def test_config_files_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Config(model="SASRec", dataset=SLICE, config_file_list=[str(tmp_path / "nope.yaml")], cmd_line=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        Config(model="SASRec", dataset=SLICE, config_file_list=[str(bad)], cmd_line=False)
    good = tmp_path / "good.yaml"
    good.write_text(f"data_path: {DATA_PATH}\nepochs: 3\n")
    assert Config(model="SASRec", dataset=SLICE, config_file_list=[str(good)], cmd_line=False)["epochs"] == 3


def _model_yaml(name):
    with open(os.path.join(properties_dir(), "model", f"{name}.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_a_model_of_ours_inherits_its_parents_yaml():
    parent, own = _model_yaml("DiffuRec"), _model_yaml("DiffuRecSys")
    assert own and all(own[k] != parent.get(k) for k in own)  # DiffuRecSys.yaml states only what differs
    expected = dict(parent, **own)
    config = Config(model="DiffuRecSys", dataset=SLICE, config_dict={"data_path": DATA_PATH}, cmd_line=False)
    assert {k: config.internal_config_dict[k] for k in expected} == expected
    stage = stage_config(make(), "DiffuRecSys")
    assert {k: stage[k] for k in expected} == expected
    as_backbone = Config(
        model="GlobalDiff", backbone="DiffuRecSys", dataset=SLICE, config_dict=dict(TINY), cmd_line=False
    )
    plugin_own = _model_yaml("GlobalDiff")
    assert all(as_backbone[k] == v for k, v in expected.items() if k not in plugin_own and k not in TINY)


def test_inherited_keys_are_still_checked():
    with pytest.raises(UnknownKeyError, match="did you mean 'lambda_mean'"):
        make("DiffuRecSys", lamda_mean=0.01)
    with pytest.raises(TypeError, match="'sample_steps' must be of type int"):  # inherited from DiffuRec.yaml
        make("DiffuRecSys", sample_steps="all")
    assert make("DiffuRecSys", sample_steps=4)["sample_steps"] == 4


def test_get_model_prefers_ours_then_recbole():
    from recbole.model.sequential_recommender import SASRec

    assert get_model("SASRec") is SASRec


def test_recbole_trainers_get_the_checkpoint_shim():
    from recbole.trainer import Trainer as RecBoleTrainer
    from recbole.utils import ModelType

    seq = get_trainer(ModelType.SEQUENTIAL, "SASRec")
    assert issubclass(seq, CompatMixin) and issubclass(seq, RecBoleTrainer)
    special = get_trainer(ModelType.SEQUENTIAL, "S3Rec")  # RecBole's own S3RecTrainer
    assert issubclass(special, CompatMixin) and special.__mro__[2].__name__ == "S3RecTrainer"
    assert get_trainer(ModelType.SEQUENTIAL, "S3Rec") is special
