"""RecBole ``Config`` that knows recbole-diff's models and yamls.

Layering, lowest priority first: RecBole's overall, model, dataset and model-type yamls (RecBole's own
hook), then ``properties/overall.yaml``, then the yamls of the models ``<Model>`` subclasses (``model_yamls``),
then for a plugin its backbone's (the same way), then ``properties/model/<Model>.yaml``, then the user's files,
dict and command line.
"""

import copy
import difflib
import glob
import os
import re
import warnings

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_diff.io import read_yaml
from recbole_diff.model.plugin.base import is_plugin, plugin_names, sequential_model_names
from recbole_diff.model.registry import get_model
from recbole_diff.paths import properties_dir

RECBOLE_PROPERTIES = os.path.join(os.path.dirname(os.path.realpath(__import__("recbole").__file__)), "properties")

# RecBole keys that accept more than one type; everything else must keep the type of its default.
_FLEXIBLE_KEYS = {
    "topk",
    "metrics",
    "gpu_id",
    "train_neg_sample_args",
    "load_col",
    "unload_col",
    "unused_col",
    "eval_args",
    "additional_feat_suffix",
    "val_interval",
    "threshold",
    "seq_len",
    "clip_grad_norm",
    "benchmark_filename",
    "numerical_features",
    "transform",
    "normalize_field",
    "data_path",
    "checkpoint_dir",
    "dataset_save_path",
    "dataloaders_save_path",
    "mask_ratio",
    "layer_norm_eps",
    "user_inter_num_interval",
    "item_inter_num_interval",
    "rm_dup_inter",
}


# Keys RecBole reads that no yaml defines: its multi-GPU run() passes them in, its Config derives the others.
_RECBOLE_RUNTIME_KEYS = {
    "model",
    "dataset",
    "nproc",
    "world_size",
    "offset",
    "ip",
    "port",
    "local_rank",
    "single_spec",
    "verbose",
    "device",
    "eval_type",
    "MODEL_TYPE",
    "MODEL_INPUT_TYPE",
    "neg_sampling",
    "valid_neg_sample_args",
    "test_neg_sample_args",
    "eval_neg_sample_args",
}

# `key: value  # (type) ...`: the type our yamls and RecBole's state in the comment of each top-level key
_ANNOTATION = re.compile(r"^([A-Za-z_]\w*)\s*:[^#\n]*#\s*\(([^)]*)\)")
_TYPE_WORDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "list": (list,), "dict": (dict,)}


class UnknownKeyWarning(UserWarning):
    """A config key that nothing in this run reads (see ``strict_keys``)."""


class UnknownKeyError(KeyError):
    """A config key that nothing in this run reads: a near-miss of a known key, or any with ``strict_keys``."""

    def __str__(self):
        return str(self.args[0])  # KeyError would quote the message


def _type_name(value):
    return type(value).__name__


def annotated_types(paths):
    """{key: accepted python types} from the ``# (type)`` comments of the top-level keys in ``paths`` (later
    files win). A key whose comment names something else (``(dict or None)`` is fine, ``(module)`` is not) is
    left out."""
    out = {}
    for path in paths:
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                match = _ANNOTATION.match(line)
                if not match:
                    continue
                words = [w.strip().split(" ")[0].lower() for w in re.split(r",|\bor\b|\|", match.group(2))]
                words = [w for w in words if w and w != "none"]
                if words and all(w in _TYPE_WORDS for w in words):
                    out[match.group(1)] = tuple(t for w in words for t in _TYPE_WORDS[w])
                else:
                    out.pop(match.group(1), None)
    return out


def _has_type(value, types):
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types)


_ALL_YAML_KEYS = []


def all_yaml_keys():
    """Every top-level key of every yaml RecBole and recbole-diff ship: keys of some model, read or not here."""
    if not _ALL_YAML_KEYS:
        import yaml

        keys = set()
        for path in (
            glob.glob(os.path.join(RECBOLE_PROPERTIES, "**", "*.yaml"), recursive=True)
            + glob.glob(os.path.join(properties_dir(), "*.yaml"))
            + glob.glob(os.path.join(properties_dir(), "model", "*.yaml"))
        ):
            with open(path, encoding="utf-8") as f:
                content = yaml.safe_load(f)
            if isinstance(content, dict):
                keys.update(content)
        _ALL_YAML_KEYS.append(frozenset(keys))
    return _ALL_YAML_KEYS[0]


def model_yamls(model_name, model_class):
    """(yamls of the models ``model_class`` subclasses, base first; ``properties/model/<name>.yaml``).
    A model of ours starts from its parents' yamls: RecBole's for a RecBole parent (TIDiffRec < DiffRec), ours
    for one of ours (DiffuRecSys < DiffuRec), so that its own yaml states only what differs."""
    parents = []
    for base in reversed(model_class.__mro__[1:]):
        if base.__module__.startswith("recbole.model."):
            parents.append(os.path.join(RECBOLE_PROPERTIES, "model", f"{base.__name__}.yaml"))
        elif base.__module__.startswith("recbole_diff.model."):
            parents.append(os.path.join(properties_dir(), "model", f"{base.__name__}.yaml"))
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

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, backbone=None, cmd_line=True):
        self._backbone_arg = backbone
        self._read_cmd_line = cmd_line
        self._check_config_files(config_file_list)
        self._layers = []
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
        self._check_keys()
        self._check_types()
        self._check_output_dirs()
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
        asked = self._backbone_arg or self.external_config_dict.get("backbone")
        if asked and not is_plugin(model_class):
            raise ValueError(
                f"backbone '{asked}' was given, but {model_name} is not a plugin model and has no "
                f"backbone; drop --backbone, or pick a plugin ({', '.join(plugin_names())})."
            )
        if is_plugin(model_class):
            backbone = asked or model_class.default_backbone
            self.backbone_class = self._backbone_model(backbone)
            if self.backbone_class.type != ModelType.SEQUENTIAL:
                raise ValueError(
                    f"{model_name} needs a sequential RecBole backbone, but '{backbone}' is a "
                    f"{self.backbone_class.type.name.lower()} model."
                )
            self.backbone = backbone
        return model_name, model_class, dataset

    @staticmethod
    def _backbone_model(name):
        try:
            return get_model(name)
        except ValueError:
            names = sequential_model_names()
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(
                f"Unknown backbone '{name}': {hint}Backbones are sequential models: {', '.join(names)}."
            ) from None

    def _update_internal_config_dict(self, file):
        self._layers.append(file)  # the yamls read, for their keys' stated types
        return super()._update_internal_config_dict(file)

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        own = properties_dir()
        layers = [os.path.join(own, "overall.yaml")]
        parents, own_yaml = model_yamls(model, model_class)
        layers += parents
        if self.backbone is not None:
            backbone_parents, backbone_yaml = model_yamls(self.backbone, self.backbone_class)
            layers += backbone_parents + [
                os.path.join(RECBOLE_PROPERTIES, "model", f"{self.backbone}.yaml"),
                backbone_yaml,
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
            if content is None:
                raise ValueError(
                    f"Config file '{path}' is empty; write key: value lines in it (e.g. epochs: 20), "
                    "or leave it out of --config_files."
                )
            if not isinstance(content, dict):
                raise ValueError(f"Config file '{path}' must hold a mapping of key: value, not {_type_name(content)}.")

    def known_keys(self):
        """Every key this run can read: the yamls layered for it (RecBole's, ours, the model's and its backbone's,
        the dataset's), RecBole's argument lists and the keys RecBole derives itself."""
        known = set(self.internal_config_dict) | set(_RECBOLE_RUNTIME_KEYS) | {"backbone"}
        known.update(k for group in self.parameters.values() for k in group)
        known.update(set(self.final_config_dict) - set(self.external_config_dict))
        return known

    def _check_keys(self):
        """A user key nothing reads: an error when it looks like a typo of a key this run reads, else a warning
        (an error with ``strict_keys``)."""
        known = self.known_keys()
        unknown = [k for k in self.external_config_dict if k not in known]
        if not unknown:
            return
        elsewhere = all_yaml_keys()  # a real key of another model is not a typo
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
            if close and key not in elsewhere:
                raise UnknownKeyError(
                    f"Unknown config key '{key}' for {self.model}: did you mean '{close[0]}'? "
                    "Nothing reads a misspelled key; fix its name."
                )
        message = (
            f"Config key(s) {', '.join(repr(k) for k in unknown)} are not read by {self.model}"
            f"{f' with backbone {self.backbone}' if self.backbone else ''} on {self.dataset}; they have no "
            "effect"
        )
        if self.final_config_dict.get("strict_keys"):
            raise UnknownKeyError(f"{message} (strict_keys: True). Remove them or fix their names.")
        warnings.warn(f"{message}. Set strict_keys: True to make this an error.", UnknownKeyWarning, stacklevel=3)

    def _check_types(self):
        """A user value must have the type of the key's default (an int is fine where a float is expected); a key
        whose default is ``~`` must have the type its yaml comment states (``# (int) ...``)."""
        stated = annotated_types(self._layers)
        for key, value in self.external_config_dict.items():
            default = self.internal_config_dict.get(key)
            if value is None or key in _FLEXIBLE_KEYS:
                continue
            if default is None:
                if key in stated and not _has_type(value, stated[key]):
                    names = " or ".join(
                        dict.fromkeys(t.__name__ for t in stated[key] if t is not int or float not in stated[key])
                    )
                    raise TypeError(
                        f"Config key '{key}' must be of type {names} (default: ~), got {value!r} ({_type_name(value)})."
                    )
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
                    f"Config key '{key}' must be of type {_type_name(default)} (default: {default!r}), "
                    f"got {value!r} ({_type_name(value)})."
                )

    def output_dirs(self):
        """{key: folder} of every folder this run writes to: checkpoints, resume points, the stage cache and a
        plugin's generated data."""
        out = {}
        for key in ("checkpoint_dir", "resume_dir", "stage_cache", "augmented_data_path"):
            if self.final_config_dict.get(key):
                out[key] = str(self.final_config_dict[key])
        return out

    def _check_output_dirs(self):
        for key, folder in self.output_dirs().items():
            check_writable(folder, key)

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
        # RecBole's split in time order ('TO') sorts by TIME_FIELD for every model type
        needs_time = self.final_config_dict["eval_args"].get("order") == "TO" or getattr(
            self.model_class, "needs_timestamp", False
        )
        for f in wanted:
            self._check_atomic_file(os.path.join(path, f))
        if needs_time:
            self._check_time_field(os.path.join(path, wanted[0]))

    def _header(self, inter_file):
        with open(inter_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n").split(self.final_config_dict.get("field_separator") or "\t")

    def _check_atomic_file(self, inter_file):
        """An empty file, a header without ``:type`` and a header without rows fail here, naming the file."""
        fix = (
            "RecBole atomic files start with a header of name:type columns separated by the field_separator "
            "(e.g. user_id:token<TAB>item_id:token<TAB>timestamp:float), then one interaction per line"
        )
        with open(inter_file, encoding="utf-8") as f:
            header, first_row = f.readline(), f.readline()
        if not header.strip():
            raise ValueError(f"'{inter_file}' is empty. {fix}.")
        untyped = [h for h in self._header(inter_file) if ":" not in h]
        if untyped:
            raise ValueError(
                f"'{inter_file}': header column(s) {', '.join(repr(h) for h in untyped)} have no ':type' "
                f"(token, float, token_seq...). {fix}."
            )
        if not first_row.strip():
            raise ValueError(f"'{inter_file}' has a header but no interactions. {fix}.")

    def _check_time_field(self, inter_file):
        time_field = self.final_config_dict.get("TIME_FIELD") or "timestamp"
        columns = [h.split(":")[0] for h in self._header(inter_file)]
        why = (
            f"{self.model} orders interactions by time"
            if getattr(self.model_class, "needs_timestamp", False)
            else "eval_args order 'TO' sorts each user's interactions by time"
        )
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


def check_writable(folder, what):
    """Fail now, naming ``what``, when ``folder`` cannot be created or written to (not after an epoch)."""
    path = os.path.abspath(folder)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"{what} '{folder}' cannot be created: '{probe}' is a file. Point {what} at a folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{what} '{folder}' is not writable ('{probe}' refuses writes). Point {what} at a folder you can write to."
        )
