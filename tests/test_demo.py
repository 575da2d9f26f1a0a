"""``saga demo`` in a reduced size, as a real subprocess: it must pass its own checks, tell the
recovery story it is about (a killed manager's sagas in flight resumed by the others, a frozen
manager fenced as a zombie) and leave no process behind, also when interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import wait_for

pytestmark = pytest.mark.slow


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_reduced_size_passes_its_checks(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sagacli", "demo", "--sagas", "40", "--report-json", str(report_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output
    assert "all checks passed" in proc.stdout

    report = json.loads(report_path.read_text())
    assert report["ok"] is True
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, failed
    names = {c["name"] for c in report["checks"]}
    assert {"every saga terminal", "no saga lost", "takeover after SIGKILL", "managers still running",
            "zombie fenced after SIGSTOP/SIGCONT"} <= names
    assert {f"{p} books consistent" for p in ("flights", "hotels", "cars", "credit", "payments")} <= names
    assert sum(n for counts in report["outcomes"].values() for n in counts.values()) == 40
    assert set(report["outcomes"]) == {"book-trip", "place-order"}

    # The kill hit sagas in flight (steps take 100-500 ms), and the new owners resumed them.
    takeover = report["takeover"]
    assert takeover["partitions"] and takeover["claimed_after_s"] is not None
    assert takeover["in_flight"] > 0
    assert set(takeover["resumed_on"]) == {str(p) for p in takeover["partitions"]}  # every new owner's line found
    assert sum(takeover["resumed"].values()) > 0
    assert set(takeover["resumed"]) <= set(takeover["new_owners"].values())
    assert takeover["victim"] not in takeover["new_owners"].values()
    assert takeover["restarted_at_s"] is not None
    assert f"SIGKILL {takeover['victim']}" in proc.stdout and "resumed" in proc.stdout

    # The zombie: another manager frozen past its session timeout, its partitions claimed meanwhile,
    # alive after SIGCONT, and nothing it wrote with its old epoch accepted.
    zombie = report["zombie"]
    assert zombie["enabled"] and zombie["skipped"] is None
    assert zombie["name"] and zombie["name"] != takeover["victim"]
    assert zombie["frozen_at_s"] > takeover["restarted_at_s"]
    assert zombie["frozen_for_s"] >= report["settings"]["session_timeout_ms"] / 1000 + 3
    assert zombie["claimed_while_frozen"] and zombie["claimed_after_s"] is not None
    assert zombie["name"] not in zombie["new_owners"].values()
    assert zombie["continued_at_s"] is not None and zombie["alive_after"] is True
    assert zombie["stale_accepted"] == 0
    assert f"SIGSTOP {zombie['name']}" in proc.stdout and f"SIGCONT {zombie['name']}" in proc.stdout
    assert len(report["processes"]["m1"]) >= 1 and report["processes"]["broker"]
    for pids in report["processes"].values():
        for pid in pids:
            assert gone(pid), f"process {pid} outlived the demo"
    assert not Path(report["work_dir"]).exists()  # a run that passed cleans up after itself


def test_demo_ctrl_c_stops_everything_it_started(bootstrap: str, tmp_path: Path) -> None:
    """Interrupted while the managers start: exit 130, no child left (uses the session's broker)."""
    out = tmp_path / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sagacli", "demo", "--sagas", "500", "--rate", "5",
             "--bootstrap-servers", bootstrap, "--work-dir", str(tmp_path / "work")],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            # Interrupt mid-run: once the first progress line shows sagas going out.
            wait_for(lambda: re.search(r"started \d+/500", out.read_text()), 90, "the demo to start sagas")
            proc.send_signal(signal.SIGINT)
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = out.read_text()
    assert code == 130, text[-3000:]
    assert "interrupted by SIGINT" in text and "Traceback" not in text
    pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
    assert len(pids) >= 4  # 3 managers and the participants
    assert all(gone(pid) for pid in pids), [pid for pid in pids if not gone(pid)]


def test_demo_stay_serves_the_web_console_with_the_demos_sagas(tmp_path: Path) -> None:
    """`saga demo --stay` keeps everything running and prints the console's URL; the console
    shows the demo's sagas, the takeover (an epoch above 1) and a compensated saga's time line."""
    import threading
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "sagacli", "demo", "--sagas", "30", "--no-zombie", "--stay", "--work-dir", str(tmp_path / "w")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    try:
        found = wait_for(lambda: next((ln for ln in list(lines) if "web console: http" in ln), None), 240, "the console's URL")
        url = re.search(r"http://\S+", str(found)).group(0)  # type: ignore[union-attr]
        home = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "trip-" in home or "order-" in home
        partitions = urllib.request.urlopen(url + "partitions", timeout=10).read().decode()
        assert re.search(r"epoch\D{0,40}[2-9]", partitions), "no partition shows a takeover"
        aborted = urllib.request.urlopen(url + "sagas?status=aborted", timeout=10).read().decode()
        saga_id = re.search(r"/sagas/((?:trip|order)-\d+)", aborted).group(1)  # type: ignore[union-attr]
        page = urllib.request.urlopen(f"{url}sagas/{saga_id}", timeout=10).read().decode()
        assert "compensat" in page.lower()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert "Traceback" not in "".join(lines)
