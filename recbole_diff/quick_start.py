"""``run_recbole_diff`` and friends: RecBole's quick start, with recbole-diff's models, trainers and checks.

Importing this module does not import ray (RecBole's own ``recbole.quick_start`` does).
"""

import copy
import sys
from contextlib import contextmanager
from logging import getLogger

from recbole.data import create_dataset, data_preparation
from recbole.utils import init_seed, set_color

from recbole_diff.config import Config
from recbole_diff.data.loaders import fast_eval_loaders
from recbole_diff.evaluation import hold_out_last, long_term_evaluate
from recbole_diff.io import load_checkpoint
from recbole_diff.model.registry import get_model
from recbole_diff.runtime import autograd_anomaly_off, init_logger, set_threads
from recbole_diff.trainer.registry import get_trainer


def build_config(model=None, dataset=None, config_file_list=None, config_dict=None, backbone=None, cmd_line=True):
    config = Config(
        model=model,
        dataset=dataset,
        config_file_list=config_file_list,
        config_dict=config_dict,
        backbone=backbone,
        cmd_line=cmd_line,
    )
    set_threads(config["threads"])
    autograd_anomaly_off()
    return config


def prepare_data(config, logger=None, held_out=None):
    """Dataset and RecBole's train/valid/test loaders for ``config``. With ``long_term_eval`` each user's last
    ``long_term_horizon - 1`` interactions are held out first and stored in the ``held_out`` dict given."""
    logger = logger or getLogger()
    dataset = create_dataset(config)
    if config["long_term_eval"]:
        held = hold_out_last(dataset, int(config["long_term_horizon"]) - 1)
        if held_out is not None:
            held_out.update(held)
        logger.info(
            f"long-term evaluation: the last {int(config['long_term_horizon']) - 1} interactions of "
            f"{len(held)} users are held out as the targets for P >= 2"
        )
    logger.info(dataset)
    with _loader_model_name(config):
        train_data, valid_data, test_data = data_preparation(config, dataset)
    valid_data, test_data = fast_eval_loaders(config, valid_data, test_data)
    return dataset, train_data, valid_data, test_data


@contextmanager
def _loader_model_name(config):
    """RecBole chooses some data loaders by model name (DiffRec gets its user-level loader); a model of ours
    that needs the same names it with ``dataloader_as`` while the loaders are built."""
    alias = getattr(get_model(config["model"]), "dataloader_as", None)
    if alias is None:
        yield
        return
    name = config["model"]
    config["model"] = alias
    try:
        yield
    finally:
        config["model"] = name


def run_recbole_diff(
    model=None,
    dataset=None,
    config_file_list=None,
    config_dict=None,
    saved=True,
    backbone=None,
    cmd_line=True,
    queue=None,
):
    """Train and test one model, like ``recbole.quick_start.run_recbole``.

    Returns RecBole's result dict (``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
    ``test_result``) plus ``model`` (the model's name) and ``saved_model_file``; a plugin's trainer adds its
    backbone's results (see its docs).
    """
    config = build_config(model, dataset, config_file_list, config_dict, backbone, cmd_line)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)

    held_out = {}
    dataset, train_data, valid_data, test_data = prepare_data(config, logger, held_out)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    logger.info(model)

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"]
    )
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "saved_model_file": trainer.saved_model_file if saved else None,
    }
    result.update(extra_mode_results(config, trainer, config["show_progress"]))
    if hasattr(trainer, "extra_results"):
        result.update(trainer.extra_results(valid_data=valid_data, test_data=test_data))
    if config["long_term_eval"]:
        result.update(long_term_results(model, test_data, held_out))
        logger.info(set_color("long-term", "yellow") + f": {result['long_term_result']}")
    if queue is not None:
        queue.put(result)
    return result


def mode_config(config, mode):
    """A copy of ``config`` that evaluates valid and test with ``mode`` (``full``, ``uni100``, ``pop50``...)."""
    sub = copy.deepcopy(config)
    sub["eval_args"] = dict(sub["eval_args"], mode={"valid": mode, "test": mode})
    sub._set_eval_neg_sample_args("valid")
    sub._set_eval_neg_sample_args("test")
    return sub


def extra_mode_results(config, trainer, show_progress=False):
    """The trained model on the same test users under each of ``extra_test_modes`` (e.g. full ranking beside the
    paper's ``uni100``), as ``test_result_<mode>``: one training run reports both protocols. A plugin's backbone
    alone is scored on the same candidates too (``backbone_test_result_<mode>``), so its lift can be read under
    every protocol."""
    out = {}
    model = trainer.model
    has_backbone = "backbone" in getattr(model, "EVAL_MODES", ())
    for mode in config["extra_test_modes"] or []:
        sub = mode_config(config, mode)
        test_data = prepare_data(sub)[3]  # RecBole cannot split a built dataset twice; building again is cheap
        out[f"test_result_{mode}"] = trainer.evaluate(test_data, load_best_model=False, show_progress=show_progress)
        if has_backbone:
            with model.evaluating("backbone"):
                out[f"backbone_test_result_{mode}"] = trainer.evaluate(
                    test_data, load_best_model=False, show_progress=show_progress
                )
    return out


def long_term_results(model, test_data, held_out):
    """The P-th-next-item metrics of the model, and of its backbone alone for a plugin."""
    out = {"long_term_result": long_term_evaluate(model, test_data, held_out)}
    if hasattr(model, "evaluating"):
        with model.evaluating("backbone"):
            out["backbone_long_term_result"] = long_term_evaluate(model, test_data, held_out)
    return out


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """For RecBole's ``HyperTuning``: trains one configuration and returns the result dict. Unlike RecBole's
    version it reports nothing to Ray (use ``recbole-diff tune`` for Ray Tune)."""
    result = run_recbole_diff(config_dict=config_dict, config_file_list=config_file_list, saved=saved, cmd_line=False)
    return result


def load_data_and_model(model_file, config_dict=None):
    """Like RecBole's: rebuild the config, data and model of a checkpoint written by ``run_recbole_diff``.

    ``config_dict`` overrides saved keys that do not change the data (e.g. ``eval_batch_size``, ``device``).
    Returns ``(config, model, dataset, train_data, valid_data, test_data)``.
    """
    checkpoint = load_checkpoint(model_file)
    config = checkpoint["config"]
    # RecBole's metrics use numpy aliases (np.float in NDCG) that only a new Config puts back; an unpickled
    # one does not, so a fresh process that loads a checkpoint and evaluates would fail (RecBole's own loader too)
    config.compatibility_settings()
    for key, value in (config_dict or {}).items():
        config[key] = value
    set_threads(config["threads"])
    autograd_anomaly_off()
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    dataset, train_data, valid_data, test_data = prepare_data(config, logger)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    _check_state_dict(model, checkpoint["state_dict"], model_file)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


def _check_state_dict(model, state_dict, path):
    own = model.state_dict()
    bad = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise ValueError(
            f"Checkpoint '{path}' does not match the dataset it was rebuilt with: '{k}' has shape "
            f"{tuple(state_dict[k].shape)} in the file but {tuple(own[k].shape)} here (did the data files change?)."
        )
