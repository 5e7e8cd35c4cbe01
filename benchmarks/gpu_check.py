"""The GPU path, checked and timed: for each model, a short training run and one full evaluation on a device,
then the same on the CPU, into one JSON.

    python benchmarks/gpu_check.py [--device cuda] [--dataset ml-100k] [--train_batches 40] [--budget_s 420]
        [--models SASRec DiffuRec DiffuRecSys GlobalDiff PDRec DiffuASR] [--out benchmarks/results/gpu_check.json]

Sequential models (SASRec, DiffuRec, DiffuRecSys) train ``--train_batches`` batches through ``calculate_loss``;
plugins (GlobalDiff, PDRec, DiffuASR, on SASRec) run their trainer's ``fit`` with one epoch per stage, since their
stages are only reachable there. Every model is then evaluated on all test users through ``full_sort_predict``.
On CUDA the first training step and the first evaluation batch run under
``torch.cuda.set_sync_debug_mode("error")``: a host synchronisation inside them is recorded (``sync_check``), not
fatal, and the timed loops run without the debug mode. Results: training rows/s, users/s, peak GPU memory, and
each model's device/CPU ratios. ``--budget_s`` skips what would start after that many seconds, so the whole
script stays inside a short GPU loan (the defaults take a few minutes on one H100).
"""

import argparse
import os
import platform
import time
import traceback

import torch
from common import dataset_kwargs, report

SEQUENTIAL = ("SASRec", "DiffuRec", "DiffuRecSys")
PLUGINS = ("GlobalDiff", "PDRec", "DiffuASR")
# one epoch for every stage of a plugin's pipeline
ONE_EPOCH = {
    "epochs": 1,
    "diffusion_epochs": 1,
    "tidiffrec_epochs": 1,
    "augmenter_epochs": 1,
    "augmenter_train_steps": None,
}
SMALL = {
    "hidden_size": 16,
    "inner_size": 32,
    "embedding_size": 16,
    "n_layers": 1,
    "n_heads": 1,
    "n_blocks": 1,
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_batch_size": 64,
    "eval_batch_size": 64,
    "diffusion_embedding_size": 16,
    "unet_channels": [8, 16, 16],
    "M": 3,
    "sample_steps": 4,
    "dims_dnn": [32],
    "tidiffrec": {"dims_dnn": [32]},
}


def sync_check(device, fn):
    """Run ``fn`` once under CUDA's sync debug mode 'error': None if it ran clean, else what synchronised."""
    if device.type != "cuda":
        fn()
        return "not checked (not CUDA)"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as error:
        return f"{error}".splitlines()[0] + " | " + traceback.format_exc(limit=-3).replace("\n", " ")[-600:]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def wait(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(model_name, args, device):
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    from recbole_diff import get_model
    from recbole_diff.config import Config

    overrides = dict(
        dataset_kwargs(args.dataset),
        show_progress=False,
        state="ERROR",
        device=str(device),
        use_gpu=device.type == "cuda",
        checkpoint_dir=os.path.join(args.work, "saved"),
    )
    if args.data_path:
        overrides["data_path"] = args.data_path
    if model_name in PLUGINS:
        overrides.update(ONE_EPOCH, backbone="SASRec")
    if args.small:
        overrides.update(SMALL)
    config = Config(model=model_name, dataset=args.dataset, cmd_line=False, config_dict=overrides)
    config["device"] = device  # RecBole derives it from use_gpu; we state it
    init_seed(config["seed"], config["reproducibility"])
    train, valid, test = data_preparation(config, create_dataset(config))
    model = get_model(model_name)(config, train._dataset).to(device)
    return config, model, train, valid, test


def train_sequential(model, config, train, device, batches):
    opt = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    model.train()
    loader = iter(train)
    first = next(loader).to(device)

    def step(inter):
        opt.zero_grad()
        model.calculate_loss(inter).backward()

    check = sync_check(device, lambda: step(first))
    opt.step()
    rows, start = 0, time.perf_counter()
    for i, inter in enumerate(loader):
        if i >= batches:
            break
        step(inter.to(device))
        opt.step()
        rows += len(inter)
    wait(device)
    seconds = time.perf_counter() - start
    return {
        "train_rows": rows,
        "train_seconds": seconds,
        "train_rows_per_s": rows / max(seconds, 1e-9),
        "train_sync_check": check,
    }


def train_plugin(model, config, train, valid, device):
    from recbole_diff import get_trainer

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    start = time.perf_counter()
    trainer.fit(train, valid, saved=True, show_progress=False)
    wait(device)
    seconds = time.perf_counter() - start
    rows = len(train.dataset)
    return {
        "train_rows": rows,
        "train_seconds": seconds,
        "train_rows_per_s": rows / max(seconds, 1e-9),
        "train_sync_check": "not checked (trained through its trainer, whose loop reads losses on the host)",
    }


@torch.no_grad()
def evaluate(model, test, device, max_users=0):
    model.eval()
    batches = iter(test)
    first = next(batches)[0].to(device)
    check = sync_check(device, lambda: model.full_sort_predict(first))
    users, start = 0, time.perf_counter()
    for batch in [(first,)] + list(batches):
        model.full_sort_predict(batch[0].to(device))
        users += len(batch[0])
        if max_users and users >= max_users:
            break
    wait(device)
    seconds = time.perf_counter() - start
    return {
        "eval_users": users,
        "eval_seconds": seconds,
        "users_per_s": users / max(seconds, 1e-9),
        "eval_sync_check": check,
    }


def run_model(name, args, device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config, model, train, valid, test = build(name, args, device)
    if name in SEQUENTIAL:
        row = train_sequential(model, config, train, device, args.train_batches)
    else:
        row = train_plugin(model, config, train, valid, device)
    row.update(evaluate(model, test, device, args.eval_users))
    if device.type == "cuda":
        row["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda", help="the device to check (cpu runs the script without a GPU)")
    parser.add_argument("--no_cpu", action="store_true", help="skip the CPU comparison")
    parser.add_argument("--cpu_threads", type=int, default=os.cpu_count())
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--data_path", default=None)
    parser.add_argument("--models", nargs="+", default=list(SEQUENTIAL + PLUGINS))
    parser.add_argument("--train_batches", type=int, default=40)
    parser.add_argument("--eval_users", type=int, default=0, help="cap on evaluated users (0: all)")
    parser.add_argument("--budget_s", type=float, default=420.0)
    parser.add_argument("--small", action="store_true", help="tiny widths (tests)")
    parser.add_argument("--work", default="saved/gpu_check")
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    unknown = set(args.models) - set(SEQUENTIAL + PLUGINS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {SEQUENTIAL + PLUGINS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU; use --device cpu to run the script on the CPU")
    torch.set_num_threads(args.cpu_threads)
    devices = [device] + ([] if args.no_cpu or device.type == "cpu" else [torch.device("cpu")])
    start = time.perf_counter()
    results = {d.type: {} for d in devices}
    for d in devices:
        for name in args.models:
            if time.perf_counter() - start > args.budget_s:
                results[d.type][name] = {"skipped": f"past --budget_s {args.budget_s}"}
                continue
            try:
                results[d.type][name] = run_model(name, args, d)
            except Exception as error:  # one model's failure must not lose the others' figures
                results[d.type][name] = {
                    "error": f"{type(error).__name__}: {error}",
                    "trace": traceback.format_exc(limit=-4),
                }
            print(d.type, name, results[d.type][name], flush=True)
    ratios = {}
    if len(devices) == 2:
        for name, row in results[device.type].items():
            cpu = results["cpu"].get(name, {})
            if "users_per_s" in row and "users_per_s" in cpu:
                ratios[name] = {
                    "train_rows_per_s": row["train_rows_per_s"] / cpu["train_rows_per_s"],
                    "users_per_s": row["users_per_s"] / cpu["users_per_s"],
                }
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": args.cpu_threads,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report(
        dict(vars(args), env=env, seconds=time.perf_counter() - start, results=results, device_over_cpu=ratios),
        args.out,
    )


if __name__ == "__main__":
    main()
