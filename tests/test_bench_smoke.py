"""``make bench-smoke``: the benchmark driver's smoke mode runs cleanly.

The driver is run the way ``make bench-smoke`` runs it, as a subprocess
against a real ``twistd``; these tests check that every request succeeded
and that the report carries its fields, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.server import server_env

REPO_ROOT = Path(__file__).resolve().parent.parent
CASE_FIELDS = {
    "case",
    "mode",
    "concurrency",
    "requests",
    "rps",
    "latency_ms",
    "errors",
    "error_count",
    "rejected_503",
    "server_cpu_ms_per_request",
    "server_cpu_s",
    "client_cpu_ms_per_request",
    "client_cpu_util",
    "client_saturated",
    "server_rss_peak_mib",
    "server_workers",
}
LATENCY_FIELDS = {"p50", "p90", "p99", "max"}
MACHINE_FIELDS = {
    "nproc",
    "cpu_model",
    "python",
    "client_openssl",
    "server_openssl",
    "estd_commit",
}


@dataclass(frozen=True)
class SmokeRun:
    """The outcome of one ``python -m bench.driver --smoke``."""

    done: subprocess.CompletedProcess[str]
    cases: list[dict[str, Any]]
    results_files: list[Path]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    """Run the smoke benchmark once for every test of this module."""
    results = tmp_path_factory.mktemp("bench-results")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.driver",
            "--smoke",
            "--results-dir",
            str(results),
        ],
        cwd=REPO_ROOT,
        env=server_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    cases = [json.loads(line) for line in done.stdout.splitlines() if line]
    return SmokeRun(done, cases, sorted(results.glob("*.json")))


def test_smoke_exits_zero_without_errors(smoke: SmokeRun) -> None:
    """The smoke run exits 0 and no request of any case failed."""
    assert smoke.done.returncode == 0, smoke.done.stderr
    assert smoke.cases, smoke.done.stderr
    for case in smoke.cases:
        assert case["error_count"] == 0, (case["case"], case["error_samples"])
        assert case["errors"] == {}
        assert case["requests"] > 0


def test_smoke_covers_enrollment_cacerts_handshake_and_burst(smoke: SmokeRun) -> None:
    """Renewals, enrollments, cacerts, the handshake and a burst are all run."""
    kinds = {(case["case"], case["mode"]) for case in smoke.cases}
    assert kinds >= {
        ("simplereenroll", "closed"),
        ("simpleenroll", "closed"),
        ("cacerts", "closed"),
        ("handshake", "closed"),
        ("simplereenroll", "burst"),
    }
    # The minimal pyOpenSSL server, measured beside estd for calibration.
    reference = [c for c in smoke.cases if c.get("server") == "reference"]
    assert [c["case"] for c in reference] == ["handshake"]
    assert reference[0]["requests"] == 20
    renewals = next(c for c in smoke.cases if c["case"] == "simplereenroll")
    assert renewals["requests"] == 50
    assert renewals["concurrency"] == 4
    burst = next(c for c in smoke.cases if c["mode"] == "burst")
    assert burst["failed_devices"] == 0
    assert burst["requests"] == burst["devices"]
    assert {"burst_s", "retried_devices"} <= burst.keys()


def test_smoke_json_lines_carry_every_field(smoke: SmokeRun) -> None:
    """Each JSON line has the throughput, latency, error, CPU and memory fields."""
    for case in smoke.cases:
        assert CASE_FIELDS <= case.keys(), CASE_FIELDS - case.keys()
        assert LATENCY_FIELDS <= case["latency_ms"].keys()
        assert case["server_cpu_s"] >= 0
        assert case["server_rss_peak_mib"] > 0


def test_smoke_writes_results_with_the_machine(smoke: SmokeRun) -> None:
    """The results file holds the cases and a description of the machine."""
    assert len(smoke.results_files) == 1
    document = json.loads(smoke.results_files[0].read_text())
    assert MACHINE_FIELDS <= document["machine"].keys()
    assert len(document["cases"]) == len(smoke.cases)
    assert "server CPU" in document["table"] or "srv ms/req" in document["table"]
