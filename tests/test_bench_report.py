"""The benchmark's side-by-side report, rounds, and the Go server's command line.

The Go server (foundriesio/estserver) is not on CI machines: these tests
check what the driver would run and how it reports, with results made up
for the purpose; the interleaved rounds run for real on estd and the
reference server.
"""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.der import PreparedCsr
from bench.driver import (
    _medians,
    parse_args,
    settings_from,
    side_by_side,
    write_results,
)
from bench.loadgen import FIOCONFIG_AGENT, Worker, WorkerSpec
from bench.server import GO_CA_KEY, GO_LABEL, Server, server_env, write_sec1_key
from tests.test_bench_smoke import REPO_ROOT


def result(server: str, case: str, cpu: float, round_number: int = 1) -> dict[str, Any]:
    """A closed-loop result with only the fields the report reads."""
    return {
        "server": server,
        "case": case,
        "concurrency": 8,
        "mode": "closed",
        "server_cpu_ms_per_request": cpu,
        "round": round_number,
    }


def test_side_by_side_gives_medians_and_times_the_go_server() -> None:
    """Three rounds: the median of each server, its range, and estd over Go."""
    results = [
        result(GO_LABEL, "simplereenroll", 1.0, 1),
        result("workers=1", "simplereenroll", 3.3, 1),
        result(GO_LABEL, "simplereenroll", 1.2, 2),
        result("workers=1", "simplereenroll", 3.0, 2),
        result(GO_LABEL, "simplereenroll", 0.9, 3),
        result("workers=1", "simplereenroll", 3.9, 3),
    ]
    lines = side_by_side(_medians(results))
    assert "median of 3 interleaved rounds" in lines[0]
    assert lines[1].split() == ["case", "conc", GO_LABEL, "workers=1"]
    assert lines[2].split() == [
        "simplereenroll",
        "8",
        "1.000",
        "(0.90-1.20)",
        "3.300",
        "(3.00-3.90)",
        "3.3x",
    ]


def test_side_by_side_is_silent_with_nothing_to_compare() -> None:
    """One round and no Go server: the ordinary table says it all."""
    assert side_by_side(_medians([result("workers=1", "cacerts", 1.0)])) == []


def test_go_server_gets_the_demo_pki_and_a_sec1_ca_key(tmp_path: Path) -> None:
    """The Go server reads SEC1 keys only: the driver writes one, private."""
    pki = tmp_path / "pki"
    pki.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    (pki / "est-ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = Server(pki=pki, workdir=tmp_path / "go", go_binary=Path("/opt/estserver"))
    server.workdir.mkdir()
    write_sec1_key(pki / "est-ca.key", server.workdir / GO_CA_KEY)
    sec1 = (server.workdir / GO_CA_KEY).read_bytes()
    assert sec1.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert stat.S_IMODE((server.workdir / GO_CA_KEY).stat().st_mode) == 0o600
    loaded = serialization.load_pem_private_key(sec1, password=None)
    assert loaded.private_numbers() == key.private_numbers()  # type: ignore[union-attr]
    argv = server.argv()
    assert argv[0] == "/opt/estserver"
    options = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert options["--ca-key"] == str(server.workdir / GO_CA_KEY)
    assert options["--client-cas"] == str(pki / "client-cas.pem")
    assert options["--root-cert"] == str(pki / "factory_ca.pem")
    assert server.label == GO_LABEL and server.cacerts_count == 1
    assert not server.estd


def test_enrollments_carry_fioconfig_user_agent() -> None:
    """Devices of older fioconfig releases send it; the Go server keys 201 on it."""
    worker = Worker.__new__(Worker)
    worker.spec = WorkerSpec(
        index=0,
        host="127.0.0.1",
        port=8443,
        server_name="localhost",
        cafile="ca.pem",
        devices=[],
    )
    request = worker.request_bytes("simplereenroll", PreparedCsr(0, b"TUlJ", b""))
    assert request is not None
    assert f"\r\nUser-Agent: {FIOCONFIG_AGENT}\r\n".encode() in request


def test_rounds_interleave_the_servers(tmp_path: Path) -> None:
    """Two rounds: reference, estd, reference, estd, and a medians table."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.driver",
            "--case",
            "handshake",
            "--concurrency",
            "2",
            "--requests",
            "10",
            "--devices",
            "4",
            "--clients",
            "1",
            "--warmup",
            "0",
            "--reference",
            "--rounds",
            "2",
            "--no-save",
            "--workdir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    cases = [
        json.loads(line)
        for line in completed.stdout.splitlines()
        if line.startswith("{")
    ]
    assert [(c["round"], c["server"]) for c in cases] == [
        (1, "reference"),
        (1, "workers=1"),
        (2, "reference"),
        (2, "workers=1"),
    ]
    assert all(c["error_count"] == 0 for c in cases)
    assert "median of 2 interleaved rounds" in completed.stderr  # the table


def test_results_file_holds_the_go_server_path(tmp_path: Path) -> None:
    """--go-estserver is a path in the settings; the results file writes it as text."""
    binary = tmp_path / "estserver"
    binary.write_bytes(b"#!/bin/sh\n")
    binary.chmod(0o755)
    settings = settings_from(parse_args(["--go-estserver", str(binary)]))
    target = tmp_path / "results.json"
    write_results(target, {"settings": dataclasses.asdict(settings)})
    saved = json.loads(target.read_text())
    assert saved["settings"]["go_estserver"] == str(binary)
    assert saved["settings"]["rounds"] == 1


def test_go_server_must_be_an_executable(tmp_path: Path) -> None:
    """A --go-estserver that cannot run stops the bench before any PKI is made."""
    text = tmp_path / "estserver"
    text.write_bytes(b"not a program")
    with pytest.raises(SystemExit, match="not an executable file"):
        settings_from(parse_args(["--go-estserver", str(text)]))


def test_rounds_must_be_positive() -> None:
    """--rounds 0 is refused, not taken as one round."""
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
