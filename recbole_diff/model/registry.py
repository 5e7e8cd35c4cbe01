"""Model lookup by name: recbole-diff's models first, then RecBole's."""

import importlib

from recbole.utils import get_model as recbole_get_model

# Our models: name -> module. Kept explicit so an unknown name can list what exists; the modules are imported
# when a model is asked for, so that a plugin's module can look up its backbone here.
_OUR_MODELS = {
    # RecBole's BERT4Rec, its loss computed at the masked slots that count only (same loss, faster)
    "BERT4Rec": "recbole_diff.model.sequential_recommender.bert4rec",
    "DiffuRec": "recbole_diff.model.sequential_recommender.diffurec",
    "DiffuRecSys": "recbole_diff.model.sequential_recommender.diffurec",
    "GlobalDiff": "recbole_diff.model.plugin.globaldiff",
    "TIDiffRec": "recbole_diff.model.plugin.tidiffrec",
    "PDRec": "recbole_diff.model.plugin.pdrec",
    "DiffuASR": "recbole_diff.model.plugin.diffuasr",
}


def _available_our_models():
    # Methods land one at a time; a name whose module is not in this install is not offered.
    found = {}
    for name, module_path in _OUR_MODELS.items():
        try:
            if importlib.util.find_spec(module_path) is not None:
                found[name] = module_path
        except ModuleNotFoundError:
            pass
    return found


def recbole_model_names():
    """Names of every model RecBole 1.2.1 ships, read from its model packages."""
    names = []
    # exlib_recommender is left out: importing it needs xgboost and lightgbm.
    for sub in (
        "general_recommender",
        "sequential_recommender",
        "context_aware_recommender",
        "knowledge_aware_recommender",
    ):
        pkg = importlib.import_module(f"recbole.model.{sub}")
        for attr in dir(pkg):
            obj = getattr(pkg, attr)
            if isinstance(obj, type) and hasattr(obj, "calculate_loss") and obj.__module__.startswith(pkg.__name__):
                names.append(attr)
    return sorted(set(names))


def our_model_names():
    return sorted(_available_our_models())


def get_model(model_name):
    """Return the model class named ``model_name``: recbole-diff's first, then RecBole's."""
    ours = _available_our_models()
    if model_name in ours:
        return getattr(importlib.import_module(ours[model_name]), model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError, ImportError) as e:  # RecBole imports exlib (lightgbm) last
        raise ValueError(
            f"Unknown model '{model_name}'. recbole-diff models: {', '.join(our_model_names())}; "
            f"RecBole models: {', '.join(recbole_model_names())}."
        ) from e
