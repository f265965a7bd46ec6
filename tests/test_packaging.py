"""What ``pip install pupyl-queue`` puts into site-packages, read from pyproject.toml (no build, no network).

The wheel installs three top-level packages: ``pupyl_queue``, and ``workers`` and ``api``,
generic names another distribution may also claim. They stay top-level for now (the
reasons are in pyproject.toml, beside ``packages.find``): ``celery -A workers.app`` is the
entry point of docker-compose, deploy/, ``pupyl-queue up`` and the tests, and installing
the folders as ``pupyl_queue.workers`` / ``pupyl_queue.api`` (setuptools' package-dir)
makes each importable under two names in a checkout, so Celery would load the tasks and
signal handlers twice. These checks keep the list from growing and the build working.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_only_the_three_known_top_level_packages_are_installed() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=str(ROOT), include=include)
    assert {name.split(".")[0] for name in packages} == {"pupyl_queue", "workers", "api"}
    assert not {"tests", "bench", "scripts", "deploy", "docs"} & {name.split(".")[0] for name in packages}


def test_the_build_backend_understands_the_license_field() -> None:
    """``license = "LGPL-3.0-or-later"`` (an SPDX expression, PEP 639) needs setuptools 77: with the
    setuptools 68 that pyproject.toml allowed, building the package failed ("project.license must be
    valid exactly by one definition"): measured with ``pip wheel``, setuptools 76.1.0 fails, 77.0.3 builds."""
    assert isinstance(PYPROJECT["project"]["license"], str)
    floors = [re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*", r) for r in PYPROJECT["build-system"]["requires"]]
    assert any(f and int(f.group(1)) >= 77 for f in floors), PYPROJECT["build-system"]["requires"]
