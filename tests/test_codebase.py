"""The codebase keeps its shape: the core, manager and participants type-check with zero errors,
the import layers hold (the core imports nothing above it), and the linter is clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_the_core_manager_and_participants_type_check() -> None:
    done = run(sys.executable, "-m", "mypy")  # files and settings: [tool.mypy] in pyproject.toml
    assert done.returncode == 0, done.stdout[-4000:]


def test_the_core_imports_nothing_above_it() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.fail("lint-imports is missing: install the test extras (pip install -e '.[test]')")
    done = run(lint_imports)  # contracts: [tool.importlinter] in pyproject.toml
    assert done.returncode == 0, done.stdout[-4000:]


def test_ruff_is_clean() -> None:
    done = run(sys.executable, "-m", "ruff", "check", "sagalog", "manager", "participants", "sagacli", "tests")
    assert done.returncode == 0, done.stdout[-4000:]
