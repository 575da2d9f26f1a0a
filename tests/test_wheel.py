"""The package as users get it: a wheel, installed in a fresh virtual environment outside the
checkout, runs a saga end to end (manager, participant and client all from the wheel)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OWN_PACKAGES = {"sagalog", "manager", "participants", "sagacli"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(PROJECT_ROOT)],
        check=True,
        timeout=300,
    )
    [built] = out.glob("sagalog-*.whl")
    return built


def test_the_wheel_carries_the_schemas_and_only_our_packages(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/", 1)[0] for n in names if "/" in n and not n.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == OWN_PACKAGES
    schemas = {Path(n).name for n in names if n.endswith(".avsc")}
    assert schemas == {p.name for p in (PROJECT_ROOT / "schemas").rglob("*.avsc")}
    assert any(n.startswith("participants/examples/definitions/") and n.endswith(".yaml") for n in names)
    assert any(n.startswith("sagacli/console/templates/") and n.endswith(".html") for n in names)
    assert "sagacli/console/static/htmx.min.js" in names  # vendored: the console needs no CDN


@pytest.mark.slow
def test_a_saga_runs_end_to_end_from_the_installed_wheel(wheel: Path, bootstrap: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, saga = venv / "bin" / "python", venv / "bin" / "saga"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=600)
    work = tmp_path / "elsewhere"  # not the checkout: nothing may be imported from there
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import sagalog, sagalog.codec; print(sagalog.__file__); print(sagalog.codec.schemas_dir())"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert all(str(venv) in line for line in where), where

    prefix = f"wheel{tmp_path.name[-6:]}".replace("_", "-")
    common = ["-b", bootstrap, "--topic-prefix", prefix]
    run = dict(cwd=work, capture_output=True, text=True, timeout=120)
    subprocess.run([str(saga), "topics", "create", *common, "--partitions", "2", "--participant", "noop"], check=True, **run)
    manager = subprocess.Popen([str(saga), "manager", *common, "--partitions", "2"], cwd=work,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    participant = subprocess.Popen([str(saga), "participant", "run", "noop", *common, "--db-dir", str(work / "db")],
                                   cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        done = subprocess.run(
            [str(saga), "start", "noop-3", *common, "--state-dir", str(work / "state"), "--wait", "--timeout", "90"],
            **run,
        )
    finally:
        for proc in (manager, participant):
            proc.terminate()
            proc.wait(30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMPLETED" in done.stdout
