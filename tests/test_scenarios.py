"""The scenario scripts find the project's Python by themselves (issue 27): ``$PYTHON``
if set, else the project's ``.venv``, else ``python3`` from PATH, and they stop with
what to do when that one lacks the project's packages. Each case runs the real
``common.sh`` from a copy of the scripts in a folder of its own, with real interpreters
(the suite's, and a fresh environment with nothing installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testbed import ROOT


@pytest.fixture(scope="module")
def bare(tmp_path_factory) -> Path:
    """A bin folder whose ``python3`` is a real interpreter with none of the project's packages."""
    env = tmp_path_factory.mktemp("bare") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    return env / "bin"


def _tree(tmp: Path, *, venv: bool) -> Path:
    """A copy of scripts/scenarios in a project folder of its own, with or without a .venv."""
    shutil.copytree(ROOT / "scripts" / "scenarios", tmp / "scripts" / "scenarios")
    if venv:  # the suite's own environment, as this project's .venv
        (tmp / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    return tmp


def _which_python(tree: Path, bare: Path, **env: str) -> subprocess.CompletedProcess:
    script = tree / "scripts" / "scenarios" / "which.sh"
    script.write_text('source "$(dirname "$0")/common.sh"\necho "PY=$PY"\n')
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    base["PATH"] = f"{bare}{os.pathsep}{base.get('PATH', '')}"  # python3 here lacks torch
    return subprocess.run(["bash", str(script)], env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_the_project_venv_is_used_when_there_is_one(tmp_path, bare):
    tree = _tree(tmp_path, venv=True)
    r = _which_python(tree, bare)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"PY={tree / '.venv' / 'bin' / 'python'}"


def test_python_from_the_environment_wins(tmp_path, bare):
    tree = _tree(tmp_path, venv=True)
    r = _which_python(tree, bare, PYTHON=sys.executable)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"PY={sys.executable}"


def test_without_a_venv_a_python_that_lacks_torch_is_refused_with_what_to_do(tmp_path, bare):
    tree = _tree(tmp_path, venv=False)
    r = _which_python(tree, bare)
    assert r.returncode == 1 and "PY=" not in r.stdout
    assert "cannot import the project's packages" in r.stderr
    assert "make venv" in r.stderr and "PYTHON=" in r.stderr
