"""Where recbole-diff finds its own files (imports nothing of the package, so any layer may use it)."""

import os

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
