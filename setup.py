"""Install recbole-diff.

The default yamls live in the top-level ``properties/`` folder of the repository. They are shipped as the
package data of ``recbole_diff.properties`` so that a non-editable install finds them too; an editable
install resolves them from the source tree (see ``recbole_diff.properties_dir``).
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "recbole_diff", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


# Each pin is explained in docs/troubleshooting.md: RecBole 1.2.1 breaks on numpy 2 and pandas 3,
# ray 2.6.3 needs pkg_resources (setuptools < 81) and a pyarrow that accepts numpy 1.
INSTALL_REQUIRES = [
    "torch>=2.0,<=2.14.1",
    "recbole==1.2.1",
    "numpy<2",
    "pandas<3",
    "pyarrow<26",
    "setuptools<81",
    "scipy",
    "scikit-learn",
    "tqdm",
    "pyyaml",
    "matplotlib",
]

setup(
    name="recbole-diff",
    version=_version(),
    description="Diffusion models for sequential recommendation on RecBole",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["recbole_diff", "recbole_diff.*"]) + ["recbole_diff.properties"],
    package_dir={"recbole_diff.properties": "properties"},
    package_data={"recbole_diff.properties": ["*.yaml", "model/*.yaml", "bench/*.yaml", "tune/*.yaml"]},
    include_package_data=False,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tune": ["ray[tune]==2.6.3"],
        "test": ["pytest>=7", "ruff==0.17.6", "import-linter==2.17"],
    },
    entry_points={"console_scripts": ["recbole-diff=recbole_diff.cli:main"]},
    py_modules=[],
)
