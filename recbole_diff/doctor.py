"""``recbole-diff doctor``: the versions that matter and the combinations known to break RecBole 1.2.1."""

import platform
import sys
from importlib import metadata


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _release(version):
    """'2.13.0+cpu' -> (2, 13, 0); missing parts are 0."""
    parts = []
    for piece in (version.split("+")[0].split(".") + ["0", "0"])[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# (distribution, predicate on (major, minor, micro), what breaks, the fix)
RULES = [
    (
        "recbole",
        lambda v: v != (1, 2, 1),
        "recbole-diff is built and tested against RecBole 1.2.1",
        "pip install recbole==1.2.1",
    ),
    (
        "numpy",
        lambda v: v >= (2, 0),
        "RecBole's Config runs `np.float = np.float_` and ray 2.6 uses np.bool8",
        "pip install 'numpy<2'",
    ),
    (
        "pandas",
        lambda v: v >= (3, 0),
        "copy-on-write makes RecBole's fillna(inplace=True) a no-op: NaNs stay",
        "pip install 'pandas<3'",
    ),
    (
        "pyarrow",
        lambda v: v >= (26, 0),
        "pyarrow 26 refuses numpy<2 at import and ray.init() imports it",
        "pip install 'pyarrow<26'",
    ),
    (
        "setuptools",
        lambda v: v >= (81, 0),
        "ray 2.6.3 imports pkg_resources, removed in setuptools 81",
        "pip install 'setuptools<81'",
    ),
    ("ray", lambda v: v > (2, 6, 3), "RecBole 1.2.1 allows ray<=2.6.3 only", "pip install 'ray[tune]==2.6.3'"),
]


def check_versions(versions):
    """Problems as (distribution, version, what breaks, fix) for the given {distribution: version}."""
    problems = []
    for dist, broken, why, fix in RULES:
        version = versions.get(dist)
        if version is not None and broken(_release(version)):
            problems.append((dist, version, why, fix))
    return problems


def doctor(stream=None):
    """Print the report; return 0 when nothing known-broken is installed, 1 otherwise."""
    stream = stream or sys.stdout
    names = ["recbole-diff", "recbole", "torch", "numpy", "pandas", "pyarrow", "setuptools", "scipy", "ray"]
    versions = {name: _version(name) for name in names}
    print(f"python       {platform.python_version()} ({sys.executable})", file=stream)
    for name in names:
        print(f"{name:<12} {versions[name] or 'not installed'}", file=stream)
    try:
        import torch

        cuda = torch.version.cuda
        print(
            f"torch build  {'CUDA ' + cuda if cuda else 'CPU'}; cuda available: {torch.cuda.is_available()}; "
            f"threads: {torch.get_num_threads()}",
            file=stream,
        )
    except ImportError:
        print("torch is not installed: pip install torch==2.13.0 (before anything else).", file=stream)
    if versions["ray"] is None:
        print("ray          not installed: `recbole-diff tune` needs pip install 'recbole-diff[tune]'", file=stream)
    problems = check_versions(versions)
    for dist, version, why, fix in problems:
        print(f"BROKEN: {dist} {version}: {why}. Fix: {fix}", file=stream)
    print("OK: no known-broken combination." if not problems else f"{len(problems)} problem(s) found.", file=stream)
    return 1 if problems else 0
