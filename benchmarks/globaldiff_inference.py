"""GlobalDiff's inference settings, measured in one run: what each reverse-step budget costs and scores, and
how far tuning the Borda weight and x0_hat's normalisation on the validation split moves the ensemble.

Trains the backbone once (RecBole's recipe), then the diffusion model on it with each approximator (the same
frozen backbone, loaded from its checkpoint). ``sample_steps``, ``gamma`` and ``x0_norm`` only act at inference,
so one trained model serves every setting:
- cost: the test split through RecBole's whole evaluation (collation, scoring, top-k, metrics) for the backbone
  alone and the ensemble at each ``--steps``, as wall-time ratios;
- tuning: ``gamma`` x ``x0_norm`` scored on validation, the best one's test metrics reported beside the
  backbone's (selection never sees test).

    python benchmarks/globaldiff_inference.py --dataset ml-100k [--steps 20 5 2 1] [--out results.json]
"""

import argparse
import time

from common import dataset_kwargs, report


def trained(approximator, keys, backbone_checkpoint=None):
    from recbole.utils import init_seed

    from recbole_diff import get_model, get_trainer
    from recbole_diff.quick_start import build_config, prepare_data

    config = build_config(
        "GlobalDiff",
        keys["dataset"],
        None,
        dict(keys["config"], approximator=approximator, backbone_checkpoint=backbone_checkpoint),
        cmd_line=False,
    )
    init_seed(config["seed"], config["reproducibility"])
    _, train, valid, test = prepare_data(config)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model("GlobalDiff")(config, train._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "GlobalDiff")(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    trainer.evaluate(test, load_best_model=True)  # loads the best diffusion epoch
    return trainer, valid, test


def timed_evaluate(trainer, data, mode, steps=None, gamma=0.5, x0_norm="softmax"):
    model = trainer.model
    model.sample_steps, model.gamma, model.x0_norm = steps, gamma, x0_norm
    with model.evaluating(mode):
        start = time.perf_counter()
        result = trainer.evaluate(data, load_best_model=False)
        return time.perf_counter() - start, {k: float(v) for k, v in result.items()}


def tuned(trainer, valid, test, gammas, steps):
    """Every (gamma, x0_norm) on validation; the best by the valid metric, and its test result."""
    metric = trainer.config["valid_metric"].lower()
    scores = {}
    for x0_norm in ("softmax", "l1"):
        for gamma in gammas:
            _, result = timed_evaluate(trainer, valid, "ensemble", steps, gamma, x0_norm)
            scores[f"{x0_norm}/gamma={gamma}"] = result[metric]
    best = max(scores, key=scores.get)
    x0_norm, gamma = best.split("/gamma=")
    _, test_result = timed_evaluate(trainer, test, "ensemble", steps, float(gamma), x0_norm)
    _, backbone_valid = timed_evaluate(trainer, valid, "backbone")
    return {
        "valid_" + metric: scores,
        "backbone_valid_" + metric: backbone_valid[metric],
        "best": best,
        "steps": steps,
        "test": test_result,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 5, 2, 1])
    parser.add_argument("--approximators", nargs="+", default=["unet", "mlp"])
    parser.add_argument("--epochs", type=int, default=5, help="backbone epochs")
    parser.add_argument("--diffusion_epochs", type=int, default=10)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--tune_steps", type=int, default=None, help="reverse steps while tuning (default all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = dict(
        dataset_kwargs(args.dataset),
        MAX_ITEM_LIST_LENGTH=10,
        hidden_size=64,
        inner_size=256,
        hidden_dropout_prob=0.2,
        attn_dropout_prob=0.2,
        train_batch_size=512,
        eval_batch_size=1024,
        epochs=args.epochs,
        stopping_step=2,
        diffusion_epochs=args.diffusion_epochs,
        metrics=["Hit", "NDCG"],
        topk=[10, 20],
        valid_metric="NDCG@10",
        show_progress=False,
        checkpoint_dir="saved/globaldiff_steps",
    )
    keys = {"dataset": args.dataset, "config": config}
    out = {"dataset": args.dataset, "settings": config, "runs": {}}
    backbone_checkpoint = None
    for approximator in args.approximators:
        trainer, valid, test = trained(approximator, keys, backbone_checkpoint)
        backbone_checkpoint = trainer.checkpoints["backbone"]
        base, base_result = timed_evaluate(trainer, test, "backbone")
        runs = {"backbone": {"seconds": base, "test": base_result}}
        for steps in args.steps:
            seconds, result = timed_evaluate(trainer, test, "ensemble", steps)
            runs[f"ensemble_{steps}_steps"] = {"seconds": seconds, "over_backbone": seconds / base, "test": result}
            print(approximator, steps, f"{seconds / base:.1f}x", result, flush=True)
        runs["tuned"] = tuned(trainer, valid, test, args.gammas, args.tune_steps)
        print(approximator, "tuned", runs["tuned"]["best"], runs["tuned"]["test"], flush=True)
        out["runs"][approximator] = runs
    report(out, args.out)


if __name__ == "__main__":
    main()
