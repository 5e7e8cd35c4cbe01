"""A saved GlobalDiff, evaluated in one run: full-ranking validation and test with the exact top-k fusion and
with the whole Borda ranking (the metrics must be identical: the script fails otherwise), the share of rows the
fusion certified, evaluation time of the backbone alone, the diffusion model alone and the ensemble both ways,
the ensemble's validation with ``x0_norm`` l1 and softmax, and with fewer reverse steps (``--steps``): inference
settings, so one trained model answers.

    python benchmarks/globaldiff_fusion.py <saved GlobalDiff .pth> [--users 5000] [--steps 5 2 1] [--candidates 100]
        [--out results.json]
"""

import argparse
import time

import torch
from common import report


def timed_eval(trainer, data, model, mode, fusion_k="keep", x0_norm=None):
    saved_k, saved_norm = model.fusion_k, model.x0_norm
    if fusion_k != "keep":
        model.fusion_k = fusion_k
    model.x0_norm = x0_norm or saved_norm
    model.fusion_fallbacks = 0
    try:
        with model.evaluating(mode):
            start = time.perf_counter()
            result = trainer.evaluate(data, load_best_model=False)
            seconds = time.perf_counter() - start
    finally:
        model.fusion_k, model.x0_norm = saved_k, saved_norm
    return {
        "result": dict(result),
        "seconds": seconds,
        "users": len(data.dataset),
        "fallback_rows": model.fusion_fallbacks,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--users", type=int, default=None, help="evaluate this many users of each split (seeded)")
    parser.add_argument("--steps", type=int, nargs="*", default=[5, 2, 1], help="reverse-step counts to compare")
    parser.add_argument("--candidates", type=int, default=None, help="fusion_candidates (default: the model's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from recbole_diff import get_trainer
    from recbole_diff.quick_start import load_data_and_model
    from recbole_diff.trainer.globaldiff import validation_subset

    config, model, dataset, train, valid, test = load_data_and_model(args.checkpoint)
    torch.set_num_threads(1)
    valid, test = (validation_subset(d, args.users, config["seed"]) for d in (valid, test))
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if args.candidates is not None:
        model.fusion_candidates = args.candidates
    out = {
        "checkpoint": args.checkpoint,
        "dataset": str(config["dataset"]),
        "n_items": int(model.n_items),
        "fusion_k": model.fusion_k,
        "fusion_candidates": model.fusion_candidates,
        "sample_steps": config["sample_steps"],
        "approximator": config["approximator"],
        "x0_norm": model.x0_norm,
    }
    with torch.no_grad():
        for name, data in (("valid", valid), ("test", test)):
            part = out[name] = {}
            part["backbone"] = timed_eval(trainer, data, model, "backbone")
            part["diffusion_only"] = timed_eval(trainer, data, model, "diffusion_only")
            part["ensemble_topk_fusion"] = timed_eval(trainer, data, model, "ensemble")
            part["ensemble_full_borda"] = timed_eval(trainer, data, model, "ensemble", fusion_k=None)
            if part["ensemble_topk_fusion"]["result"] != part["ensemble_full_borda"]["result"]:
                raise SystemExit(
                    f"{name}: the top-k fusion changed the metrics: "
                    f"{part['ensemble_topk_fusion']['result']} vs {part['ensemble_full_borda']['result']}"
                )
            base = part["backbone"]["seconds"]
            part["ensemble_over_backbone"] = {
                "topk_fusion": part["ensemble_topk_fusion"]["seconds"] / base,
                "full_borda": part["ensemble_full_borda"]["seconds"] / base,
                "diffusion_only": part["diffusion_only"]["seconds"] / base,
            }
            print(name, part["ensemble_over_backbone"], flush=True)
        out["valid"]["x0_norm"] = {
            norm: timed_eval(trainer, valid, model, "ensemble", x0_norm=norm)["result"] for norm in ("l1", "softmax")
        }
        out["valid"]["sample_steps"] = {}
        base = out["valid"]["backbone"]["seconds"]
        for steps in args.steps:
            model.sample_steps = steps
            run = timed_eval(trainer, valid, model, "ensemble")
            full = timed_eval(trainer, valid, model, "ensemble", fusion_k=None)
            alone = timed_eval(trainer, valid, model, "diffusion_only")
            if run["result"] != full["result"]:
                raise SystemExit(f"sample_steps {steps}: the top-k fusion changed the metrics")
            out["valid"]["sample_steps"][steps] = {
                "result": run["result"],
                "over_backbone": run["seconds"] / base,
                "full_borda_over_backbone": full["seconds"] / base,
                "diffusion_only_over_backbone": alone["seconds"] / base,
                "fallback_rows": run["fallback_rows"],
            }
            print("sample_steps", steps, out["valid"]["sample_steps"][steps], flush=True)
        model.sample_steps = config["sample_steps"]
    report(out, args.out)


if __name__ == "__main__":
    main()
