"""The ``recbole-diff`` command and ``run_recbole_diff.py``.

    recbole-diff                                   the demo on ml-100k
    recbole-diff --model=SASRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]
    recbole-diff doctor                            versions that matter, and known-broken combinations
    recbole-diff bench --config <preset.yaml> [--out DIR] [--jobs N]
    recbole-diff tune --model M --dataset D --space <space.yaml> --samples N [--address ray://host:port]
"""
import argparse
import os
import sys

from recbole_diff import properties_dir

SUBCOMMANDS = ("run", "doctor", "demo", "bench", "tune")


def _parse_key_values(words):
    """``--key=value`` words to a dict with RecBole's value conversion (numbers, lists, bools)."""
    from recbole.config import Config as RecBoleConfig

    out, bad = {}, []
    for word in words:
        if not word.startswith("--") or "=" not in word:
            bad.append(word)
            continue
        key, value = word[2:].split("=", 1)
        out[key] = value
    if bad:
        raise SystemExit(f"recbole-diff: cannot read {' '.join(bad)}; write options as --key=value.")
    return RecBoleConfig._convert_config_dict(None, out)


def run_command(argv):
    parser = argparse.ArgumentParser(prog="recbole-diff run", description="Train and test one model.")
    parser.add_argument("--model", "-m", default=None, help="model name (or `model` in a config file)")
    parser.add_argument("--dataset", "-d", default=None, help="dataset name (or `dataset` in a config file)")
    parser.add_argument("--backbone", default=None, help="backbone of a plugin model (e.g. SASRec)")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--saved", default="true", help="save and reload the best checkpoint (default true)")
    args, rest = parser.parse_known_args(argv)
    config_dict = _parse_key_values(rest)
    files = args.config_files.strip().split(" ") if args.config_files else None

    from recbole_diff.quick_start import run_recbole_diff

    result = run_recbole_diff(model=args.model, dataset=args.dataset, backbone=args.backbone,
                              config_file_list=files, config_dict=config_dict,
                              saved=str(args.saved).lower() != "false", cmd_line=False)
    print_result_table(result)
    return result


def demo_command(argv):
    """The default demo: a small, fast configuration on RecBole's bundled ml-100k."""
    demo_yaml = os.path.join(properties_dir(), "demo.yaml")
    return run_command(["--config_files=" + demo_yaml] + list(argv))


def print_result_table(result):
    """Test metrics of the run (and of its backbone, for plugins) side by side."""
    columns = [(result["model"], result["test_result"])]
    if result.get("backbone_test_result") is not None:
        columns.insert(0, (f"{result.get('backbone', 'backbone')} (backbone)", result["backbone_test_result"]))
    if result.get("diffusion_only_test_result") is not None:
        columns.append(("diffusion only", result["diffusion_only_test_result"]))
    metrics = list(columns[-1][1].keys())
    width = max(12, *(len(name) for name, _ in columns))
    lines = ["", "test".ljust(10) + "".join(name.rjust(width + 2) for name, _ in columns)]
    for metric in metrics:
        lines.append(metric.ljust(10) + "".join(f"{float(res[metric]):.4f}".rjust(width + 2) for _, res in columns))
    print("\n".join(lines), flush=True)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        return demo_command([])
    if argv[0] in SUBCOMMANDS:
        command, argv = argv[0], argv[1:]
    else:
        command = "run"
    if command == "doctor":
        from recbole_diff.doctor import doctor

        sys.exit(doctor())
    if command == "demo":
        return demo_command(argv)
    if command == "tune":
        from recbole_diff.tune import tune_command

        return tune_command(argv)
    if command == "bench":
        from recbole_diff.benchmark import bench_command

        return bench_command(argv)

    return run_command(argv)


if __name__ == "__main__":
    main()
