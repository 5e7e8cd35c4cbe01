"""Ray Tune search: ``recbole-diff tune --model ... --dataset ... --space <file> --samples N [--address ...]``.

The only module of recbole-diff that imports ray. Each trial builds its config and data itself, runs on one
CPU with one torch thread, reports flat metric names (``valid/ndcg@10``, ``test/ndcg@10``) once per epoch
through ``Trainer.fit(callback_fn=...)`` so that ASHA can stop weak trials, and keeps its checkpoints in its
own folder. The best configuration is written as a yaml that ``run_recbole_diff.py --config_files`` accepts.

A search space file maps config keys to one distribution each::

    learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
    gamma: {uniform: [0.2, 0.8]}
    hidden_size: {choice: [32, 64]}
    diffusion_steps: {randint: [10, 31]}     # upper bound excluded
    zeta: {grid: [0.5, 1.5]}                 # every value, for each sample
"""

import argparse
import json
import os
import time

import yaml

from recbole_diff.io import read_yaml
from recbole_diff.runtime import parse_key_values

# ray, RecBole and the rest of recbole-diff are imported where a search or a trial needs them: reading and checking
# a search space stays light.

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")


class SearchSpaceError(ValueError):
    pass


def load_space(path):
    """Read and check a search-space yaml; returns {key: (distribution, args)}."""
    raw = read_yaml(path, "Search space file", SearchSpaceError, SearchSpaceError)
    if not isinstance(raw, dict) or not raw:
        raise SearchSpaceError(
            f"Search space file '{path}' must map config keys to distributions, "
            "e.g. `learning_rate: {loguniform: [1.0e-4, 1.0e-2]}`."
        )
    space = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SearchSpaceError(
                f"{path}: '{key}' needs exactly one distribution, one of {DISTRIBUTIONS}; got {spec!r}."
            )
        ((dist, args),) = spec.items()
        if dist not in DISTRIBUTIONS:
            raise SearchSpaceError(
                f"{path}: '{key}' uses unknown distribution '{dist}'; choose one of {DISTRIBUTIONS}."
            )
        if not isinstance(args, list) or not args:
            raise SearchSpaceError(f"{path}: '{key}: {dist}' needs a list of arguments, got {args!r}.")
        if dist in ("uniform", "loguniform", "randint") and len(args) != 2:
            raise SearchSpaceError(f"{path}: '{key}: {dist}' needs [low, high], got {args!r}.")
        if dist == "quniform" and len(args) != 3:
            raise SearchSpaceError(f"{path}: '{key}: quniform' needs [low, high, q], got {args!r}.")
        if dist in ("uniform", "loguniform", "quniform", "randint") and not args[0] < args[1]:
            raise SearchSpaceError(f"{path}: '{key}: {dist}' needs low < high, got {args!r}.")
        if dist == "loguniform" and args[0] <= 0:
            raise SearchSpaceError(f"{path}: '{key}: loguniform' needs a positive lower bound, got {args[0]}.")
        space[key] = (dist, args)
    return space


def to_ray(space):
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform, "randint": tune.randint}
    out = {}
    for key, (dist, args) in space.items():
        if dist == "choice":
            out[key] = tune.choice(args)
        elif dist == "grid":
            out[key] = tune.grid_search(args)
        else:
            out[key] = make[dist](*args)
    return out


def report(metrics):
    """ray 2.6: ``ray.air.session.report``; newer ray: ``ray.train.report``."""
    try:
        from ray.air import session

        session.report(metrics)
    except (ImportError, AttributeError):
        from ray import train

        train.report(metrics)


def _flat(prefix, result):
    return {f"{prefix}/{k}": float(v) for k, v in (result or {}).items()}


def trainable(params, base):
    """One trial: train with ``base`` + ``params``, report validation metrics every epoch, test at the end."""
    import torch

    torch.set_num_threads(1)
    from recbole.utils import init_seed

    from recbole_diff.model.registry import get_model
    from recbole_diff.quick_start import build_config, prepare_data
    from recbole_diff.runtime import init_logger
    from recbole_diff.trainer.registry import get_trainer

    trial_dir = os.getcwd()  # Tune runs each trial in its own folder
    # each trial trains once, reporting every validation to the scheduler: no resume points shared by trials
    config_dict = dict(
        base["config_dict"],
        **params,
        checkpoint_dir=os.path.join(trial_dir, "saved"),
        show_progress=False,
        threads=1,
        resume_dir=None,
    )
    config = build_config(
        base["model"], base["dataset"], base["config_files"], config_dict, base["backbone"], cmd_line=False
    )
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    _, train_data, valid_data, test_data = prepare_data(config)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    last = {}
    valid_epoch = trainer._valid_epoch

    def recording_valid_epoch(data, show_progress=False):
        score, result = valid_epoch(data, show_progress=show_progress)
        last["valid"] = result
        return score, result

    trainer._valid_epoch = recording_valid_epoch  # the callback only gets the score; keep the whole result

    def callback(epoch_idx, valid_score):
        report(dict(_flat("valid", last.get("valid")), valid_score=float(valid_score), epoch=epoch_idx))

    _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=callback)
    test_result = trainer.evaluate(test_data, load_best_model=True)
    report(
        dict(
            _flat("valid", best_valid),
            **_flat("test", test_result),
            valid_score=float(best_valid[config["valid_metric"].lower()]),
            done_test=True,
        )
    )


def peak(result, metric, bigger):
    """A trial's best reported value of ``metric`` (what ``scope='all'`` selects by), or None."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or frame[metric].dropna().empty:
        return None
    values = frame[metric].dropna()
    return float(values.max() if bigger else values.min())


def trial_summary(results, metric, scheduler, wall, bigger=True):
    """What a search cost: wall time, validations run per trial, trials the scheduler cut short, and each
    trial's best and last value of the metric."""
    trials = []
    for result in results:
        m = result.metrics or {}
        finished = bool(m.get("done_test"))
        trials.append(
            {
                "config": result.config,
                "validations": int(m.get("training_iteration", 0)) - finished,
                "finished": finished,
                "best": peak(result, metric, bigger),
                "last": m.get(metric),
                "error": str(result.error) if result.error else None,
            }
        )
    return {
        "scheduler": scheduler,
        "metric": metric,
        "wall_seconds": wall,
        "trials": len(trials),
        "validations": sum(t["validations"] for t in trials),
        "stopped_early": sum(not t["finished"] and not t["error"] for t in trials),
        "per_trial": trials,
    }


def fixed_settings(config_files, config_dict, loader):
    """What every trial shares, as one mapping: the config files' content in order (read with RecBole's yaml
    ``loader``, which reads ``1e-4`` as a number), then the fixed overrides. ``best.yaml`` starts from it, so
    that running it trains the model the best trial trained."""
    fixed = {}
    for path in config_files or []:
        with open(path, encoding="utf-8") as f:
            fixed.update(yaml.load(f.read(), Loader=loader) or {})
    fixed.update(config_dict or {})
    if isinstance(fixed.get("data_path"), str):
        fixed["data_path"] = os.path.abspath(fixed["data_path"])
    return fixed


def run_tune(
    model,
    dataset,
    space_path,
    samples,
    config_dict=None,
    config_files=None,
    backbone=None,
    address=None,
    cpus=None,
    scheduler="asha",
    out_dir="tune_runs",
    name=None,
    metric=None,
    log=print,
    search_seed=None,
):
    """Run a search; returns (best params, best yaml path, wall seconds). Trial configs are drawn with
    ``search_seed`` (default: the config's ``seed``), so the same command samples the same trials, and two
    schedulers can be compared on identical trials."""
    space = load_space(space_path)
    from recbole_diff.config import Config

    # Fail on a bad model/dataset/key here, not inside every trial: the space's keys (with a value of each
    # distribution) go through the same key and type checks as a run's.
    sample = {k: args[0] for k, (dist, args) in space.items()}
    try:
        Config(
            model=model,
            dataset=dataset,
            config_file_list=config_files,
            config_dict=dict(config_dict or {}, **sample),
            backbone=backbone,
            cmd_line=False,
        )
    except (KeyError, TypeError) as e:
        raise SearchSpaceError(f"{space_path}: {e}") from e
    probe = Config(
        model=model,
        dataset=dataset,
        config_file_list=config_files,
        config_dict=config_dict,
        backbone=backbone,
        cmd_line=False,
    )
    metric = metric or f"valid/{probe['valid_metric'].lower()}"
    config_dict = dict(config_dict or {})
    if config_dict.get("data_path"):
        config_dict["data_path"] = os.path.abspath(config_dict["data_path"])  # trials run in their own folders
    files = [os.path.abspath(f) for f in (config_files or [])]

    import ray
    from ray import air, tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if not ray.is_initialized():
        ray.init(
            address=address,
            num_cpus=None if address else (cpus or 1),
            include_dashboard=False,
            log_to_driver=False,
            ignore_reinit_error=True,
        )
    epochs = probe["diffusion_epochs"] if probe["diffusion_epochs"] else probe["epochs"]
    bigger = bool(probe["valid_metric_bigger"])
    mode = "max" if bigger else "min"
    search_seed = int(probe["seed"] if search_seed is None else search_seed)
    # one report per validation plus the final test report: a trial that validates every epoch must not be
    # stopped by max_t before it reports its test metrics
    sched = (
        ASHAScheduler(time_attr="training_iteration", max_t=max(1, int(epochs)) + 1, grace_period=1, reduction_factor=2)
        if scheduler == "asha"
        else FIFOScheduler()
    )
    base = {"model": model, "dataset": dataset, "config_dict": config_dict, "config_files": files, "backbone": backbone}
    name = name or f"{model}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, base=base), {"cpu": 1}),
        param_space=to_ray(space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=samples,
            scheduler=sched,
            search_alg=BasicVariantGenerator(random_state=search_seed),
        ),
        run_config=air.RunConfig(name=name, storage_path=os.path.abspath(out_dir), verbose=1),
    )
    start = time.time()
    results = tuner.fit()
    wall = time.time() - start
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    best_params = {k: best.config[k] for k in space}
    best_yaml = os.path.join(os.path.abspath(out_dir), name, "best.yaml")
    written = dict(fixed_settings(files, config_dict, probe.yaml_loader), **best_params, model=model, dataset=dataset)
    if backbone:
        written["backbone"] = backbone
    best_value = peak(best, metric, bigger)
    test_value = best.metrics.get("test/" + metric.split("/", 1)[1])
    with open(best_yaml, "w") as f:
        # a trial the scheduler stopped early never ran its test evaluation
        f.write(
            f"# best of {samples} trials by {metric} ({scheduler}): {best_value}; test: "
            f"{test_value if test_value is not None else 'not run (trial stopped early)'}\n"
        )
        yaml.safe_dump(written, f, sort_keys=False)
    summary = dict(
        trial_summary(results, metric, scheduler, wall, bigger),
        search_seed=search_seed,
        best={"config": best_params, metric: best_value},
    )
    with open(os.path.join(os.path.dirname(best_yaml), "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(
        f"[tune] {len(results)} trials in {wall:.0f}s ({summary['validations']} validations, "
        f"{summary['stopped_early']} trials stopped early by {scheduler}); best {metric} = "
        f"{best_value}; best config: {best_yaml}"
    )
    return best_params, best_yaml, wall


def tune_command(argv):
    parser = argparse.ArgumentParser(prog="recbole-diff tune", description="Ray Tune search over a config space.")
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--space", required=True, help="search space yaml (see properties/tune/)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--config_files", default=None)
    parser.add_argument("--address", default=None, help="an existing Ray cluster, e.g. ray://head:10001 or auto")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (one trial each)")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    parser.add_argument("--out", default="tune_runs")
    parser.add_argument("--search_seed", type=int, default=None, help="seed of the trial sampling (default: seed)")
    args, rest = parser.parse_known_args(argv)
    try:
        run_tune(
            args.model,
            args.dataset,
            args.space,
            args.samples,
            config_dict=parse_key_values(rest),
            config_files=args.config_files.split() if args.config_files else None,
            backbone=args.backbone,
            address=args.address,
            cpus=args.cpus,
            scheduler=args.scheduler,
            out_dir=args.out,
            search_seed=args.search_seed,
        )
    except SearchSpaceError as e:
        raise SystemExit(f"recbole-diff tune: {e}") from e
