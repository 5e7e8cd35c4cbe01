"""RecBole ``Config`` that knows recbole-diff's models and yamls.

Layering, lowest priority first: RecBole's overall, model, dataset and model-type yamls (RecBole's own
hook), then ``properties/overall.yaml``, then for a plugin the backbone's RecBole yaml and ours, then
``properties/model/<Model>.yaml``, then the user's files, dict and command line.
"""
import copy
import os

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_diff import properties_dir
from recbole_diff.utils import get_model, read_yaml

RECBOLE_PROPERTIES = os.path.join(os.path.dirname(os.path.realpath(__import__("recbole").__file__)), "properties")

# RecBole keys that accept more than one type; everything else must keep the type of its default.
_FLEXIBLE_KEYS = {
    "topk", "metrics", "gpu_id", "train_neg_sample_args", "load_col", "unload_col", "unused_col",
    "eval_args", "additional_feat_suffix", "val_interval", "threshold", "seq_len", "clip_grad_norm",
    "benchmark_filename", "numerical_features", "transform", "normalize_field", "data_path",
    "checkpoint_dir", "dataset_save_path", "dataloaders_save_path", "mask_ratio", "layer_norm_eps",
    "user_inter_num_interval", "item_inter_num_interval", "rm_dup_inter",
}


def _type_name(value):
    return type(value).__name__


def model_yamls(model_name, model_class):
    """(yamls of the RecBole models ``model_class`` subclasses, base first; ``properties/model/<name>.yaml``).
    A model of ours that subclasses a RecBole model (TIDiffRec < DiffRec) starts from its parent's yaml."""
    parents = [os.path.join(RECBOLE_PROPERTIES, "model", f"{base.__name__}.yaml")
               for base in reversed(model_class.__mro__[1:]) if base.__module__.startswith("recbole.model.")]
    return parents, os.path.join(properties_dir(), "model", f"{model_name}.yaml")


def stage_config(config, model_name, overrides=None):
    """A config for a model that a plugin trains as one of its stages (PDRec's TI-DiffRec): a copy of
    ``config`` (data, split, evaluation, seed, device, checkpoints stay), then the stage model's own yamls,
    then ``overrides`` (the user's per-stage keys). The plugin's config is not changed."""
    import yaml

    model_class = get_model(model_name)
    sub = copy.deepcopy(config)
    parents, own_yaml = model_yamls(model_name, model_class)
    for path in parents + [own_yaml]:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for key, value in (yaml.load(f.read(), Loader=config.yaml_loader) or {}).items():
                    sub[key] = value
    for key, value in (overrides or {}).items():
        sub[key] = value
    sub["model"] = model_name
    sub["MODEL_TYPE"] = model_class.type
    return sub


class Config(RecBoleConfig):
    """RecBole's Config, with recbole-diff's model lookup, yaml layering and early input checks.

    Args:
        model, dataset, config_file_list, config_dict: as in RecBole.
        backbone (str, optional): the backbone of a plugin model (also read from the config as ``backbone``).
        cmd_line (bool): read ``--key=value`` words from ``sys.argv`` like RecBole does. Pass ``False`` when
            building a config inside tests, trainables or any program with foreign arguments.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, backbone=None,
                 cmd_line=True):
        self._backbone_arg = backbone
        self._read_cmd_line = cmd_line
        self._check_config_files(config_file_list)
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
        self._check_types()
        self._check_dataset_files()

    # ---- RecBole hooks -------------------------------------------------------------------------------
    def _load_cmd_line(self):
        return super()._load_cmd_line() if self._read_cmd_line else dict()

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
        if model is None:
            raise KeyError("No model given: pass --model=<name> (e.g. --model=SASRec) or set `model` in a yaml.")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
        if dataset is None:
            raise KeyError("No dataset given: pass --dataset=<name> (e.g. --dataset=ml-100k) or set `dataset`.")
        model_class = model if not isinstance(model, str) else get_model(model)
        model_name = model if isinstance(model, str) else model.__name__

        self.backbone, self.backbone_class = None, None
        if getattr(model_class, "is_plugin", False):
            backbone = self._backbone_arg or self.external_config_dict.get("backbone") or model_class.default_backbone
            self.backbone_class = get_model(backbone)
            if self.backbone_class.type != ModelType.SEQUENTIAL:
                raise ValueError(
                    f"{model_name} needs a sequential RecBole backbone, but '{backbone}' is a "
                    f"{self.backbone_class.type.name.lower()} model."
                )
            self.backbone = backbone
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        own = properties_dir()
        layers = [os.path.join(own, "overall.yaml")]
        parents, own_yaml = model_yamls(model, model_class)
        layers += parents
        if self.backbone is not None:
            layers += [
                os.path.join(RECBOLE_PROPERTIES, "model", f"{self.backbone}.yaml"),
                os.path.join(own, "model", f"{self.backbone}.yaml"),
            ]
        layers.append(own_yaml)
        for path in layers:
            if os.path.isfile(path):
                self._update_internal_config_dict(path)
        if self.backbone is not None:
            self.internal_config_dict["backbone"] = self.backbone
        self._default_neg_sampling()

    def _default_neg_sampling(self):
        # RecBole refuses CE with negative sampling, yet its overall.yaml turns sampling on; a user who asks
        # for CE and says nothing about sampling means "no sampling".
        loss = self.external_config_dict.get("loss_type", self.internal_config_dict.get("loss_type"))
        if loss == "CE" and "train_neg_sample_args" not in self.external_config_dict:
            self.internal_config_dict["train_neg_sample_args"] = None

    # ---- early checks --------------------------------------------------------------------------------
    @staticmethod
    def _check_config_files(config_file_list):
        for path in config_file_list or []:
            content = read_yaml(path, "Config file (from --config_files)")
            if content is not None and not isinstance(content, dict):
                raise ValueError(f"Config file '{path}' must hold a mapping of key: value, not {_type_name(content)}.")

    def _check_types(self):
        """A user value must have the type of the key's default (an int is fine where a float is expected)."""
        for key, value in self.external_config_dict.items():
            default = self.internal_config_dict.get(key)
            if default is None or value is None or key in _FLEXIBLE_KEYS:
                continue
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(default, float):
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif isinstance(default, str):
                ok = isinstance(value, str)
            elif isinstance(default, (list, dict)):
                ok = isinstance(value, type(default))
            else:
                ok = True
            if not ok:
                raise TypeError(
                    f"Config key '{key}' must be a {_type_name(default)} (default: {default!r}), "
                    f"got {value!r} ({_type_name(value)})."
                )

    def _check_dataset_files(self):
        """Fail before RecBole tries to download or dies deep inside loading."""
        path = self.final_config_dict["data_path"]
        name = self.dataset
        benchmark = self.final_config_dict.get("benchmark_filename")
        wanted = [f"{name}.{part}.inter" for part in benchmark] if benchmark else [f"{name}.inter"]
        missing = [f for f in wanted if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(
                f"Dataset '{name}' has no {', '.join(missing)} under '{os.path.abspath(path)}'. "
                f"Set --data_path to the folder that contains '{name}/' (RecBole atomic files); "
                "recbole-diff never downloads datasets."
            )
        needs_time = (
            self.final_config_dict.get("MODEL_TYPE") == ModelType.SEQUENTIAL
            and self.final_config_dict["eval_args"].get("order") == "TO"
        ) or getattr(self.model_class, "needs_timestamp", False)
        if needs_time:
            self._check_time_field(os.path.join(path, wanted[0]))

    def _check_time_field(self, inter_file):
        time_field = self.final_config_dict.get("TIME_FIELD") or "timestamp"
        with open(inter_file, encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split(self.final_config_dict.get("field_separator") or "\t")
        columns = [h.split(":")[0] for h in header]
        why = (f"{self.model} orders interactions by time" if getattr(self.model_class, "needs_timestamp", False)
               else "eval_args order 'TO' sorts each user's interactions by time")
        if time_field not in columns:
            raise ValueError(
                f"'{inter_file}' has no '{time_field}' column (columns: {', '.join(columns)}), but {why}. "
                "Add a timestamp column, or set TIME_FIELD to the column that holds time."
            )
        load_col = self.final_config_dict.get("load_col")
        if isinstance(load_col, dict) and "inter" in load_col and time_field not in load_col["inter"]:
            raise ValueError(
                f"load_col.inter {load_col['inter']} leaves out '{time_field}', but {why}. "
                f"Add it: load_col: {{inter: [user_id, item_id, {time_field}]}}."
            )
