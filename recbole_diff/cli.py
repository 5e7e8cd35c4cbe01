"""The ``recbole-diff`` command, ``python -m recbole_diff`` and ``run_recbole_diff.py``.

usage: recbole-diff [run] --model=M --dataset=D [--config_files="a.yaml b.yaml"] [--key=value ...]
       recbole-diff <command> [--help] ...

commands:
  run       train and test one model (the default when the first word is an option)
  demo      a small GlobalDiff run on RecBole's bundled ml-100k (also: recbole-diff with no arguments)
  doctor    versions that matter, and known-broken combinations
  bench     a benchmark grid from a preset:  bench --config <preset.yaml> [--out DIR] [--jobs N]
  tune      a Ray Tune search:  tune --model M --dataset D --space <space.yaml> --samples N

options:
  -h, --help     this help; `recbole-diff <command> --help` for a command's options
  -V, --version  the installed version

Exit status: 0 when the command succeeded, non-zero when it failed. Results go to stdout, logs to stderr.
"""

import argparse
import os
import sys

from recbole_diff import __version__
from recbole_diff.paths import properties_dir
from recbole_diff.runtime import parse_key_values, recbole_warnings_hidden

# Each command's module is imported when the command runs: `recbole-diff --help` stays instant, and only `tune`
# imports ray.

SUBCOMMANDS = ("run", "doctor", "demo", "bench", "tune")


def run_command(argv):
    parser = argparse.ArgumentParser(prog="recbole-diff run", description="Train and test one model.")
    parser.add_argument("--model", "-m", default=None, help="model name (or `model` in a config file)")
    parser.add_argument("--dataset", "-d", default=None, help="dataset name (or `dataset` in a config file)")
    parser.add_argument("--backbone", default=None, help="backbone of a plugin model (e.g. SASRec)")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files")
    parser.add_argument("--saved", default="true", help="save and reload the best checkpoint (default true)")
    args, rest = parser.parse_known_args(argv)
    config_dict = parse_key_values(rest)
    files = args.config_files.strip().split(" ") if args.config_files else None

    from recbole_diff.quick_start import run_recbole_diff

    result = run_recbole_diff(
        model=args.model,
        dataset=args.dataset,
        backbone=args.backbone,
        config_file_list=files,
        config_dict=config_dict,
        saved=str(args.saved).lower() != "false",
        cmd_line=False,
    )
    print_result_table(result)
    return result


def demo_command(argv):
    """The default demo: a small, fast configuration on RecBole's bundled ml-100k."""
    parser = argparse.ArgumentParser(
        prog="recbole-diff demo",
        description="A small GlobalDiff run on RecBole's "
        "bundled ml-100k (properties/demo.yaml); --key=value words override it.",
    )
    _, rest = parser.parse_known_args(argv)
    demo_yaml = os.path.join(properties_dir(), "demo.yaml")
    return run_command(["--config_files=" + demo_yaml] + list(rest))


def doctor_command(argv):
    from recbole_diff.doctor import doctor

    argparse.ArgumentParser(
        prog="recbole-diff doctor",
        description="Print the versions that matter and flag "
        "known-broken combinations; exit status 1 when one is found.",
    ).parse_args(argv)
    return doctor()


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
    """Run a command; returns the process exit status (0 on success)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split("\n", 2)[2].strip())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print(f"recbole-diff {__version__}")
        return 0
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else ("run" if argv else "demo")
    with recbole_warnings_hidden():
        if command == "doctor":
            return doctor_command(argv)
        if command == "demo":
            demo_command(argv)
        elif command == "tune":
            from recbole_diff.tune import tune_command

            tune_command(argv)
        elif command == "bench" and "--report" in argv:  # the results page from the committed grids
            from recbole_diff.report import report_command

            report_command(argv)
        elif command == "bench":
            from recbole_diff.benchmark import bench_command

            bench_command(argv)
        else:
            run_command(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
