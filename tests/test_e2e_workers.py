"""workers = N through the real twistd: processes sharing one port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from estd.affinity import allowed_cpus, cpu_for_worker
from tests.e2e_support import (
    EstServer,
    free_port,
    poll,
    process_gone,
    server_env,
)

ESTCTL = [sys.executable, "-m", "estd.estctl"]


def _start(tmp_path: Path, workers: int = 2, *extra: str) -> EstServer:
    pki = tmp_path / "pki"
    subprocess.run(
        [*ESTCTL, "demo", str(pki)], check=True, capture_output=True, env=server_env()
    )
    port = free_port()
    server = EstServer(
        tmp_path / "run",
        port,
        [
            "--config",
            str(pki / "est.ini"),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--workers",
            str(workers),
            *extra,
        ],
    )
    server.start()
    server.wait_until_listening()
    if workers > 1:
        poll(
            lambda: (
                len(set(re.findall(r"\[worker (\d+)\] EstSite", server.log_text())))
                == workers
            ),
            "every worker to listen",
        )
    return server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EstServer]:
    """A server with two workers, stopped (and its workers gone) afterwards."""
    started = _start(tmp_path)
    try:
        yield started
    finally:
        pids = worker_pids(started)
        started.stop()
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def worker_pids(server: EstServer) -> list[int]:
    """The pids of the supervisor's child processes."""
    assert server.process is not None
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    try:
        return [int(pid) for pid in children.read_text().split()]
    except FileNotFoundError:
        return []


def cacerts(server: EstServer) -> int:
    """GET /cacerts with curl; the HTTP status."""
    pki = server.est_args[1].rsplit("/", 1)[0]
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "--cacert", f"{pki}/factory_ca.pem", server.url("cacerts")],
        capture_output=True, check=False,
    )  # fmt: skip
    return int(done.stdout or b"0")


def served_by(server: EstServer) -> set[str]:
    """The workers that logged a request line so far."""
    return set(re.findall(r"\[worker (\d+)\] 127\.0\.0\.1 \"GET", server.log_text()))


def test_workers_share_the_port_and_all_serve(server: EstServer) -> None:
    """Both workers answer requests on the one port, logged in one log."""
    assert len(worker_pids(server)) == 2
    statuses: list[int] = []

    def both_served() -> bool:
        statuses.append(cacerts(server))
        return served_by(server) == {"1", "2"}

    poll(both_served, "both workers to serve a request", timeout=30)
    assert set(statuses) == {200}


def test_a_killed_worker_is_replaced(server: EstServer) -> None:
    """A worker killed with SIGKILL is replaced and the port keeps serving."""
    before = worker_pids(server)
    os.kill(before[0], signal.SIGKILL)
    poll(
        lambda: "ended (signal 9); starting a new one" in server.log_text(),
        "the supervisor to notice",
    )
    poll(
        lambda: len(worker_pids(server)) == 2 and before[0] not in worker_pids(server),
        "a new worker",
        timeout=20,
    )
    assert cacerts(server) == 200


def test_sighup_reaches_every_worker(server: EstServer) -> None:
    """SIGHUP to the supervisor makes every worker reload its configuration."""
    assert server.process is not None
    server.process.send_signal(signal.SIGHUP)
    poll(
        lambda: (
            len(
                set(
                    re.findall(
                        r"\[worker (\d+)\] configuration reloaded", server.log_text()
                    )
                )
            )
            == 2
        ),
        "both workers to reload",
    )
    assert cacerts(server) == 200


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    """SIGTERM to the supervisor stops the workers; the pidfile goes away."""
    server = _start(tmp_path)
    pids = worker_pids(server)
    try:
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        poll(lambda: all(process_gone(pid) for pid in pids), "the workers to end")
        assert not (server.workdir / "twistd.pid").exists()
    finally:
        server.stop()
        for pid in pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def thread_cpus(pid: int) -> set[tuple[int, ...]]:
    """The distinct CPU sets of the threads of process ``pid``."""
    return {
        tuple(sorted(os.sched_getaffinity(int(task))))
        for task in os.listdir(f"/proc/{pid}/task")
    }


def test_cpu_affinity_pins_each_worker_to_its_cpu(tmp_path: Path) -> None:
    """cpu-affinity = auto: worker N and all its threads on the Nth CPU; the
    supervisor stays free, and a replacement worker gets the CPU back."""
    cpus = allowed_cpus()
    expected = {(cpu_for_worker(n, cpus),) for n in (1, 2)}
    server = _start(tmp_path, 2, "--cpu-affinity", "auto")
    pids = worker_pids(server)
    try:
        assert server.process is not None
        assert thread_cpus(server.process.pid) == {tuple(cpus)}
        masks = [thread_cpus(pid) for pid in pids]
        assert all(len(mask) == 1 for mask in masks)
        assert set().union(*masks) == expected
        assert "this process runs on CPU" in server.log_text()
        killed = pids[0]
        os.kill(killed, signal.SIGKILL)
        poll(
            lambda: len(worker_pids(server)) == 2 and killed not in worker_pids(server),
            "a new worker",
            timeout=20,
        )
        (new,) = set(worker_pids(server)) - set(pids)
        poll(lambda: thread_cpus(new) == masks[0], "the new worker to be pinned")
        assert cacerts(server) == 200
    finally:
        server.stop()
        for pid in worker_pids(server) + pids:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_cpu_affinity_pins_a_single_process_to_the_first_cpu(tmp_path: Path) -> None:
    """With one process, cpu-affinity = auto keeps every thread on the first CPU."""
    server = _start(tmp_path, 1, "--cpu-affinity", "auto")
    try:
        assert cacerts(server) == 200
        assert server.process is not None
        assert thread_cpus(server.process.pid) == {(allowed_cpus()[0],)}
    finally:
        server.stop()
