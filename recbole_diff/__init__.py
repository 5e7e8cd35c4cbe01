"""recbole-diff: diffusion models for sequential recommendation, the RecBole way."""

import os

__version__ = "0.1.0"

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def properties_dir():
    """The folder holding the default yamls.

    A regular install ships them inside the package (``recbole_diff/properties``); a source checkout or an
    editable install keeps them in the repository's top-level ``properties/``.
    """
    for candidate in (
        os.path.join(_PKG_DIR, "properties"),
        os.path.join(os.path.dirname(_PKG_DIR), "properties"),
    ):
        if os.path.isfile(os.path.join(candidate, "overall.yaml")):
            return candidate
    raise FileNotFoundError(
        "recbole-diff cannot find its default yamls (properties/overall.yaml) next to "
        f"{_PKG_DIR}; reinstall the package with `pip install .` from the repository root."
    )


def __getattr__(name):
    # Lazy so that `import recbole_diff` stays cheap and never imports ray.
    if name in ("run_recbole_diff", "load_data_and_model"):
        from recbole_diff import quick_start

        return getattr(quick_start, name)
    if name == "get_model":
        from recbole_diff.model.registry import get_model

        return get_model
    if name == "get_trainer":
        from recbole_diff.trainer.registry import get_trainer

        return get_trainer
    if name == "Config":
        from recbole_diff.config import Config

        return Config
    raise AttributeError(f"module 'recbole_diff' has no attribute '{name}'")


__all__ = ["Config", "run_recbole_diff", "load_data_and_model", "get_model", "get_trainer", "properties_dir"]
