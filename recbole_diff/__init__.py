"""recbole-diff: diffusion models for sequential recommendation, the RecBole way."""

__version__ = "0.1.0"

from recbole_diff.paths import properties_dir  # noqa: E402  (re-exported: part of the public API)


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
