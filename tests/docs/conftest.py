from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

MKDOCS = [sys.executable, "-m", "mkdocs"]


@dataclass
class Build:
    returncode: int
    output: str
    site: str


def mkdocs_build(root: str, site: str) -> Build:
    """``mkdocs build --strict`` of the project at ``root`` into ``site``, as ``make docs`` runs it."""
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as err:  # a missing tool is a failure here, never a skip
        pytest.fail(f"the docs tools are not installed ({err}): run `make install` (the `docs` extra)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [*MKDOCS, "build", "--strict", "--site-dir", site],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return Build(proc.returncode, proc.stdout + proc.stderr, site)


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Build:
    """The site, built once per test session in strict mode."""
    site = str(tmp_path_factory.mktemp("site"))
    return mkdocs_build(ROOT, site)


def copy_for_build(destination: str) -> None:
    """What a docs build reads, copied to ``destination`` (to break something there)."""
    for name in ("mkdocs.yml", "README.md", "CHANGELOG.md"):
        shutil.copy(os.path.join(ROOT, name), destination)
    ignore = shutil.ignore_patterns("__pycache__", "runs", "exploration", "raw")
    for folder in ("docs", "lightning_kfac", os.path.join("benchmarks", "results")):
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(destination, folder), ignore=ignore)
