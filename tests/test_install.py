"""The default yamls are found after an editable and after a regular install, run from another directory.

Each install goes into a virtual environment of its own, so the environment running the tests is untouched
(pip would otherwise uninstall its recbole-diff first).
"""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPS = os.path.join(REPO, "properties")


def _yaml_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if f.endswith(".yaml")
    )


def _source_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("recbole_diff", "properties"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _fresh_python(tmp_path):
    # The base interpreter, not this venv's: its ensurepip brings pip and setuptools, nothing else.
    base = getattr(sys, "_base_executable", sys.executable)
    env_dir = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", str(env_dir)], check=True, capture_output=True)
    return str(env_dir / "bin" / "python")


@pytest.mark.parametrize("editable", [False, True])
def test_properties_are_found_after_install(tmp_path, editable):
    src = _source_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python = _fresh_python(tmp_path)
    target = ["-e", str(src)] if editable else [str(src)]
    # Build isolation: the fresh venv has no wheel package; pip fetches the build backend from the index.
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", *target],
        check=True,
        capture_output=True,
        text=True,
        cwd=elsewhere,
    )
    code = "import recbole_diff; print(recbole_diff.__file__); print(recbole_diff.properties_dir())"
    module_file, props = subprocess.run(
        [python, "-c", code], cwd=elsewhere, check=True, capture_output=True, text=True
    ).stdout.split("\n")[:2]
    if editable:
        assert module_file.startswith(str(src)) and props == str(src / "properties")
    else:
        assert "site-packages" in module_file and props.startswith(os.path.dirname(module_file))
    assert _yaml_files(props) == _yaml_files(PROPS)
