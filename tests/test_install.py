"""The default yamls are found after an editable and after a regular install, from another directory."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROPS = os.path.join(REPO, "properties")


def _yaml_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if f.endswith(".yaml"))


def _source_copy(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    for name in ("recbole_diff", "properties"):
        shutil.copytree(os.path.join(REPO, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", *args],
                   check=True, capture_output=True, text=True)


def _where(site_dir, cwd):
    # -S: only the install under test is importable, not the one this test suite runs from.
    code = (f"import site; site.addsitedir({str(site_dir)!r}); import recbole_diff; "
            "print(recbole_diff.__file__); print(recbole_diff.properties_dir())")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, check=True, capture_output=True,
                         text=True).stdout.split("\n")
    return out[0], out[1]


@pytest.mark.parametrize("editable", [False, True])
def test_properties_are_found_after_install(tmp_path, editable):
    src = _source_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if editable:
        _pip("--prefix", str(tmp_path / "prefix"), "-e", str(src))
        site_dir = tmp_path / "prefix" / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    else:
        _pip("--target", str(tmp_path / "target"), str(src))
        site_dir = tmp_path / "target"
    module_file, props = _where(site_dir, elsewhere)
    expected_root = src if editable else site_dir
    assert module_file.startswith(str(expected_root)) and props.startswith(str(expected_root))
    assert _yaml_files(props) == _yaml_files(PROPS)
