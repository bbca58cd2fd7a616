"""estd's benchmark driver: ``python -m bench.driver --help``.

It makes a demo PKI with N distinct device certificates (``CN=<uuid>``,
P-256, clientAuth, as :mod:`estd.demo` makes them), starts the real ``twistd
-n est`` on a free loopback port (:mod:`bench.server`), starts the load
generator processes (:mod:`bench.loadgen`) and runs the requested cases:

- closed loop: ``--case simplereenroll --concurrency 8 --duration 10`` keeps
  C requests outstanding in total for S seconds (``--requests N`` instead
  stops after N requests);
- burst: ``--burst 1000`` has every one of 1,000 devices renew once, as fast
  as the server allows, retrying after 503 + Retry-After; it reports when the
  last one succeeded and how many needed a retry.

For each case it prints one JSON line on stdout, and at the end a table on
stderr; unless told otherwise it writes everything, with a description of
the machine, to ``bench/results/<timestamp>.json``.

The figure that matters is **server CPU ms per request**: the twistd
process's and its workers' CPU time during the measured interval (from
/proc), divided by the requests answered correctly.  On a small machine the
load generator competes with the server for the same cores, so requests per
second say more about the machine than about estd; the client's own CPU is
reported so that a saturated load generator is visible.

Each case starts with an unmeasured warm-up (``--warmup``) at the same
concurrency; for enrollments it also tells how many CSRs to prepare, so that
every measured request carries a fresh key (``csr_reused`` counts those that
did not).  The measured interval runs from the moment the workers are told to
start until the last request in flight when the duration ended is answered;
requests/s counts the answers within the duration, CPU per request counts
all of them.

``--matrix`` is ``make bench``; ``--smoke`` is ``make bench-smoke``.
"""

from __future__ import annotations

import argparse
import array
import dataclasses
import datetime
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import CASES, ENROLL_CASES, HANDSHAKE_CASES, WorkerSpec, worker_main
from bench.server import (
    GO_LABEL,
    REPO_ROOT,
    MemorySampler,
    Server,
    ServerFailed,
    machine_busy,
    memory_kib,
)

RESULTS_DIR = REPO_ROOT / "bench" / "results"
MATRIX_CASES = (
    "handshake-anon",
    "cacerts",
    "handshake",
    "simplereenroll",
    "simpleenroll",
)
MATRIX_CONCURRENCY = (8, 64, 256)
SATURATED = 0.9
"""A client process busy this fraction of one core (or the clients together of
the cores they can use) counts as saturated."""
YARDSTICK = (
    "yardstick (issue 6, 2-core AMD EPYC): Go estserver ~0.9 ms server CPU per "
    "reenroll (0.55 ms of it TLS); pyOpenSSL mutual-TLS handshake ~0.66 ms; "
    "goal: reenroll <= Go, cacerts <= 0.4 ms"
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the machine --------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(REPO_ROOT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def machine_description() -> dict[str, Any]:
    """What the figures were measured on and with."""
    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    import estd
    import twisted

    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "mem_total_mib": _mem_total_mib(),
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "client_openssl": ssl.OPENSSL_VERSION,
        "server_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "pyopenssl": OpenSSL.__version__,
        "cryptography": cryptography.__version__,
        "twisted": twisted.__version__,
        "estd_version": estd.__version__,
        "openssl_conf_env": os.environ.get("OPENSSL_CONF"),
        "estd_commit": _git("rev-parse", "HEAD"),
        "estd_tree_modified": bool(status) if status is not None else None,
    }


# --- the PKI ------------------------------------------------------------------------


def device_paths(pki: Path, count: int) -> list[tuple[str, str]]:
    """(certificate, key) paths of the first ``count`` devices ``estctl demo`` wrote."""
    paths = []
    for index in range(count):
        stem = pki / "device" if index == 0 else pki / "devices" / f"device-{index}"
        cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
        if not cert.exists() or not key.exists():
            raise SystemExit(f"bench: {pki} has fewer than {count} devices")
        paths.append((str(cert), str(key)))
    return paths


def make_pki(directory: Path, devices: int) -> None:
    """The demo PKI with ``devices`` device certificates (estctl demo --devices)."""
    from estd.demo import write_demo

    started = time.monotonic()
    write_demo(str(directory), datetime.datetime.now(datetime.UTC), devices=devices)
    _log(
        f"bench: demo PKI with {devices} devices in {directory} "
        f"({time.monotonic() - started:.1f}s)"
    )


# --- the load generator processes ---------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [
        total // parts + (1 if index < total % parts else 0) for index in range(parts)
    ]


class LoadGenerator:
    """The worker processes of the load generator, talking over pipes."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            parent, child = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(spec, child),
                name=f"bench-client-{spec.index}",
            )
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)
        self._collect(range(len(specs)), "ready")

    def __len__(self) -> int:
        return len(self.pipes)

    def _collect(self, indexes: Iterable[int], expected: str = "ok") -> list[Any]:
        results = []
        for index in indexes:
            pipe, process = self.pipes[index], self.processes[index]
            while not pipe.poll(1.0):
                if not process.is_alive():
                    raise RuntimeError(
                        f"load generator process {index} died "
                        f"(exit status {process.exitcode})"
                    )
            status, value = pipe.recv()
            if status != expected:
                raise RuntimeError(f"load generator process {index}: {value}")
            results.append(value)
        return results

    def command(self, commands: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        """Send each worker its command, then wait for every answer."""
        for index, message in commands.items():
            self.pipes[index].send(message)
        return dict(zip(commands, self._collect(commands), strict=True))

    def close(self) -> None:
        """Ask the workers to exit; terminate those that do not."""
        for pipe in self.pipes:
            try:
                pipe.send(("exit", None))
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


# --- one case -----------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """Everything that shapes a run, from the command line or a preset."""

    cases: list[str]
    concurrency: list[int]
    duration: float | None
    requests: int | None
    requests_per_case: dict[str, int]
    """--smoke: a different request count for some cases."""
    burst: int | None
    burst_concurrency: int
    devices: int
    workers: list[int]
    server_args: list[str]
    clients: int
    tls: str
    warmup: float
    timeout: float
    retry_cap: float
    fail_on_errors: bool
    optional_workers: bool
    """Matrix: a server that refuses --workers N is reported and skipped."""
    reference: bool = False
    """Also measure the handshake cases on bench/refserver.py: the floor."""
    go_estserver: Path | None = None
    """Also run every case on this foundriesio/estserver binary."""
    rounds: int = 1
    """Run the servers in turn this many times (interleaved rounds)."""


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return float("nan")
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _spread(values: Iterable[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "p50": _ms(percentile(ordered, 0.50)) if ordered else None,
        "p99": _ms(percentile(ordered, 0.99)) if ordered else None,
        "max": _ms(ordered[-1]) if ordered else None,
    }


class Runner:
    """Runs cases against one server with one set of load generator processes."""

    def __init__(
        self, server: Server, settings: Settings, devices: list[tuple[str, str]]
    ):
        self.server = server
        self.settings = settings
        self.devices = devices
        count = settings.clients
        self.specs = [
            WorkerSpec(
                index=index,
                host="127.0.0.1",
                port=server.port,
                server_name="localhost",
                cafile=str(server.pki / "factory_ca.pem"),
                devices=devices[index::count],
                tls=settings.tls,
                timeout=settings.timeout,
                retry_cap=settings.retry_cap,
                expected_cacerts=server.cacerts_count,
            )
            for index in range(count)
        ]
        self.loadgen = LoadGenerator(self.specs)
        self.sampler = MemorySampler(server.pids()[0])
        self.sampler.start()

    def close(self) -> None:
        """Stop the workers and the memory sampler."""
        self.sampler.stop()
        self.loadgen.close()

    def _prepare(self, counts: list[int], from_first: bool = False) -> float:
        started = time.monotonic()
        self.loadgen.command(
            {
                index: ("prepare", (count, from_first))
                for index, count in enumerate(counts)
                if count
            }
        )
        return time.monotonic() - started

    def _phase(self, params: list[dict[str, Any] | None]) -> dict[str, Any]:
        """Run one phase on every worker with params; measure the server around it."""
        self.sampler.reset()
        cpu0 = self.server.cpu_seconds()
        busy0, total0 = machine_busy()
        own0 = _own_cpu()
        went = time.monotonic()
        answers = self.loadgen.command(
            {index: ("run", p) for index, p in enumerate(params) if p is not None}
        )
        done = time.monotonic()
        cpu1 = self.server.cpu_seconds()
        busy1, total1 = machine_busy()
        own1 = _own_cpu()
        self.sampler.sample()
        _, hwm = memory_kib(self.server.pids())
        return {
            "answers": list(answers.values()),
            "went": went,
            "wall": done - went,
            "server_cpu": cpu1 - cpu0,
            "driver_cpu": own1 - own0,
            "machine_busy_s": busy1 - busy0,
            "machine_total_s": total1 - total0,
            "rss_peak_kib": self.sampler.peak_kib,
            "hwm_kib": hwm,
        }

    def closed_loop(self, case: str, concurrency: int) -> dict[str, Any]:
        """One closed-loop case: warm-up, then the measured run."""
        settings = self.settings
        shares = _split(concurrency, len(self.specs))
        enroll = case in ENROLL_CASES
        if settings.warmup > 0:
            if enroll:
                self._prepare([max(4 * share, 1) if share else 0 for share in shares])
            warm = self._phase(
                [
                    {"case": case, "concurrency": share, "duration": settings.warmup}
                    if share
                    else None
                    for share in shares
                ]
            )
            warm_ok = sum(answer["ok"] for answer in warm["answers"])
            rate = warm_ok / max(warm["wall"], 1e-3)
        else:
            rate = 0.0
        limit = settings.requests_per_case.get(case, settings.requests)
        if limit is not None:
            # The requests go to the processes that have a share of the
            # concurrency, in proportion to it.
            per_worker = [limit * share // concurrency for share in shares]
            for index in range(limit - sum(per_worker)):
                per_worker[index] += 1  # the first processes always have a share
            shares = [
                min(share, n) for share, n in zip(shares, per_worker, strict=True)
            ]
            params = [
                {"case": case, "concurrency": share, "requests": n} if share else None
                for share, n in zip(shares, per_worker, strict=True)
            ]
            counts = per_worker
        else:
            duration = settings.duration or 10.0
            params = [
                {"case": case, "concurrency": share, "duration": duration}
                if share
                else None
                for share in shares
            ]
            # Twice the warm-up rate, and never fewer than one per device.
            expected = max(rate * duration * 2, len(self.devices)) + concurrency
            counts = [
                math.ceil(expected * share / concurrency) if share else 0
                for share in shares
            ]
        prepare_s = self._prepare(counts) if enroll else 0.0
        phase = self._phase(params)
        result = self._result(case, concurrency, phase, limit=limit)
        result["csr_prepare_s"] = round(prepare_s, 2)
        result["warmup_s"] = settings.warmup
        return result

    def burst(self, devices: int, concurrency: int) -> dict[str, Any]:
        """Every device renews once (simplereenroll), retrying after 503."""
        settings = self.settings
        count = len(self.specs)
        per_worker = [len(range(index, devices, count)) for index in range(count)]
        # Every process with devices needs a connection (a burst concurrency
        # below --clients is raised to it).
        shares = [
            max(share, 1) if n else 0
            for share, n in zip(_split(concurrency, count), per_worker, strict=True)
        ]
        if settings.warmup > 0:
            self._prepare(
                [min(4 * s, n) for s, n in zip(shares, per_worker, strict=True)]
            )
            self._phase(
                [
                    {
                        "case": "simplereenroll",
                        "concurrency": share,
                        "duration": min(settings.warmup, 1.0),
                    }
                    if share and n
                    else None
                    for share, n in zip(shares, per_worker, strict=True)
                ]
            )
        prepare_s = self._prepare(per_worker, from_first=True)
        phase = self._phase(
            [
                {"case": "simplereenroll", "concurrency": share, "burst": True}
                if share and n
                else None
                for share, n in zip(shares, per_worker, strict=True)
            ]
        )
        result = self._result("simplereenroll", concurrency, phase, burst=devices)
        result["csr_prepare_s"] = round(prepare_s, 2)
        return result

    def _result(
        self,
        case: str,
        concurrency: int,
        phase: dict[str, Any],
        burst: int | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        settings = self.settings
        answers = phase["answers"]
        ok = sum(a["ok"] for a in answers)
        errors: Counter[str] = Counter()
        samples: list[str] = []
        latencies, connects, handshakes = (array.array("d") for _ in range(3))
        for answer in answers:
            errors.update(answer["errors"])
            samples.extend(answer["error_samples"])
            latencies.frombytes(answer["latencies"])
            connects.frombytes(answer["connect_times"])
            handshakes.frombytes(answer["handshake_times"])
        ordered = sorted(latencies)
        went = phase["went"]
        client_cpu = sum(a["cpu_user"] + a["cpu_system"] for a in answers)
        utilisation = [
            (a["cpu_user"] + a["cpu_system"]) / max(a["finished"] - a["started"], 1e-6)
            for a in answers
        ]
        usable = min(len(answers), len(os.sched_getaffinity(0))) or 1
        client_util = client_cpu / max(phase["wall"], 1e-6) / usable
        if burst is not None:
            last = max((a["last_success"] for a in answers if a["ok"]), default=went)
            elapsed = max(last - went, 1e-6)
            rps = ok / elapsed
        elif limit is not None:
            elapsed = max(a["finished"] for a in answers) - went
            rps = ok / max(elapsed, 1e-6)
        else:
            elapsed = settings.duration or 10.0
            rps = sum(a["ok_in_window"] for a in answers) / elapsed
        server_cpu = phase["server_cpu"]
        busy, capacity = phase["machine_busy_s"], max(phase["machine_total_s"], 1e-6)
        # CPU the machine spent on neither the server nor the load generator
        # (nor this driver): other work sharing the box skews the figures.
        other = busy - server_cpu - client_cpu - phase["driver_cpu"]
        saturated = client_util >= SATURATED or any(u >= SATURATED for u in utilisation)
        result: dict[str, Any] = {
            "case": case,
            "mode": "burst" if burst is not None else "closed",
            "server": self.server.label,
            "server_workers": self.server.workers,
            "server_args": self.server.extra_args,
            "concurrency": concurrency,
            "duration_s": None if burst is not None or limit else settings.duration,
            "requests_limit": limit,
            "clients": len(answers),
            "tls": settings.tls,
            "requests": ok,
            "rps": round(rps, 1),
            "latency_ms": {
                "p50": _ms(percentile(ordered, 0.50)),
                "p90": _ms(percentile(ordered, 0.90)),
                "p99": _ms(percentile(ordered, 0.99)),
                "max": _ms(ordered[-1]) if ordered else None,
                "mean": _ms(sum(ordered) / len(ordered)) if ordered else None,
            },
            "connect_ms": _spread(connects),
            "handshake_ms": _spread(handshakes),
            "errors": dict(errors),
            "error_count": sum(errors.values()),
            "error_samples": samples[:5],
            "rejected_503": sum(a["rejected_503"] for a in answers),
            "server_cpu_s": round(server_cpu, 3),
            "server_cpu_ms_per_request": round(server_cpu * 1000 / ok, 3)
            if ok
            else None,
            "server_processes": len(self.server.pids()),
            "client_cpu_s": round(client_cpu, 3),
            "client_cpu_ms_per_request": round(client_cpu * 1000 / ok, 3)
            if ok
            else None,
            "client_cpu_util": round(client_util, 3),
            "client_process_util": [round(u, 3) for u in utilisation],
            "client_saturated": saturated,
            "machine_busy": round(busy / capacity, 3),
            "other_busy": round(max(other, 0.0) / capacity, 3),
            "server_rss_peak_mib": round(phase["rss_peak_kib"] / 1024, 1),
            "server_hwm_mib": round(phase["hwm_kib"] / 1024, 1),
            "csr_reused": sum(a["csr_reused"] for a in answers),
            "wall_s": round(phase["wall"], 3),
        }
        if burst is not None:
            result.update(
                devices=burst,
                burst_s=round(elapsed, 3),
                retried_devices=sum(a["retried_devices"] for a in answers),
                failed_devices=sum(a["failed_devices"] for a in answers),
            )
        return result


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- reporting ----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(results: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    """The readable summary of a run."""
    head = (
        "server",
        "case",
        "conc",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "conn p99",
        "errors",
        "503s",
        "srv ms/req",
        "cli ms/req",
        "cli util",
        "RSS MiB",
        "notes",
    )
    rows = [head]
    for r in results:
        lat = r["latency_ms"]
        notes = []
        if r["client_saturated"]:
            notes.append("client saturated")
        if r["other_busy"] >= 0.05:
            notes.append(f"other load {r['other_busy'] * 100:.0f}% of the machine")
        if r["csr_reused"]:
            notes.append(f"{r['csr_reused']} CSRs reused")
        if r["mode"] == "burst":
            notes.append(
                f"burst {r['devices']} devices: last ok at {r['burst_s']:.1f}s, "
                f"{r['retried_devices']} retried, {r['failed_devices']} failed"
            )
        if r["error_count"]:
            notes.append("; ".join(f"{k}={v}" for k, v in sorted(r["errors"].items())))
        rows.append(
            (
                r.get("server", f"workers={r['server_workers']}"),
                r["case"] + (" burst" if r["mode"] == "burst" else ""),
                str(r["concurrency"]),
                _fmt(r["rps"], 1),
                _fmt(lat["p50"], 1),
                _fmt(lat["p90"], 1),
                _fmt(lat["p99"], 1),
                _fmt(lat["max"], 1),
                _fmt(r["connect_ms"]["p99"], 1),
                str(r["error_count"]),
                str(r["rejected_503"]),
                _fmt(r["server_cpu_ms_per_request"], 3),
                _fmt(r["client_cpu_ms_per_request"], 3),
                f"{r['client_cpu_util'] * 100:.0f}%",
                _fmt(r["server_rss_peak_mib"], 0),
                ", ".join(notes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.ljust(w) if i in (0, 1, len(head) - 1) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    medians = _medians(results)
    lines += side_by_side(medians)
    lines += _tls_share(
        [{**r, "server_cpu_ms_per_request": r["median"]} for r in medians]
    )
    for skip in skipped:
        name = skip.get("server", f"workers={skip['server_workers']}")
        lines.append(f"{name}: skipped from round {skip['round']}: {skip['error']}")
    lines.append(YARDSTICK)
    return "\n".join(lines)


def _medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per server, closed-loop case and concurrency: server CPU ms per request
    over the rounds (median, min, max and every round's figure)."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in results:
        value = r["server_cpu_ms_per_request"]
        if r["mode"] == "closed" and value is not None:
            groups.setdefault((r["server"], r["case"], r["concurrency"]), []).append(
                value
            )
    return [
        {
            "server": server,
            "case": case,
            "concurrency": concurrency,
            "mode": "closed",
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
            "rounds": values,
        }
        for (server, case, concurrency), values in groups.items()
    ]


def side_by_side(medians: list[dict[str, Any]]) -> list[str]:
    """Server CPU per request, server beside server: the comparison the
    issue asks for.  Only when there is something to compare (the Go server,
    or several rounds)."""
    servers = list(dict.fromkeys(m["server"] for m in medians))
    rounds = max((len(m["rounds"]) for m in medians), default=0)
    if GO_LABEL not in servers and rounds < 2:
        return []
    cells = {(m["server"], m["case"], m["concurrency"]): m for m in medians}
    rows = [("case", "conc", *servers)]
    for case, concurrency in dict.fromkeys(
        (m["case"], m["concurrency"]) for m in medians
    ):
        go = cells.get((GO_LABEL, case, concurrency))
        row = [case, str(concurrency)]
        for server in servers:
            cell = cells.get((server, case, concurrency))
            if cell is None:
                row.append("-")
                continue
            text = f"{cell['median']:.3f}"
            if len(cell["rounds"]) > 1:
                text += f" ({cell['min']:.2f}-{cell['max']:.2f})"
            if go is not None and server != GO_LABEL and go["median"]:
                text += f" {cell['median'] / go['median']:.1f}x"
            row.append(text)
        rows.append(tuple(row))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    title = "server CPU ms per request"
    if rounds > 1:
        title += f", median of {rounds} interleaved rounds (min-max)"
    if GO_LABEL in servers:
        title += "; Nx = times the Go server's"
    return [
        title + ":",
        *(
            "  "
            + "  ".join(
                cell.ljust(w) if i < 2 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        ),
    ]


def _tls_share(results: list[dict[str, Any]]) -> list[str]:
    """Server CPU of each case beyond its handshake-only case, per concurrency.

    cacerts is compared with the anonymous handshake, enrollments with the
    handshake with a client certificate.
    """
    handshakes = {
        (r["case"], r["server"], r["concurrency"]): r["server_cpu_ms_per_request"]
        for r in results
        if r["case"] in HANDSHAKE_CASES and r["mode"] == "closed"
    }
    lines = []
    for r in results:
        if r.get("server") == "reference":
            lines.append(
                f"  floor on this machine, {r['case']} @ {r['concurrency']}: "
                f"{r['server_cpu_ms_per_request']:.3f} ms in the minimal "
                "pyOpenSSL server (bench/refserver.py)"
            )
            continue
        if r["case"] in HANDSHAKE_CASES or r["mode"] != "closed":
            continue
        kind = "handshake-anon" if r["case"] == "cacerts" else "handshake"
        base = handshakes.get((kind, r["server"], r["concurrency"]))
        ours = r["server_cpu_ms_per_request"]
        if not base or not ours:
            continue
        lines.append(
            f"  {r['server']} {r['case']} @ {r['concurrency']}: "
            f"{ours:.3f} ms = {base:.3f} {kind} + {ours - base:.3f} the rest "
            f"({base / ours * 100:.0f}% TLS)"
        )
    if lines:
        lines.insert(0, "server CPU per request: the TLS handshake and the rest")
    return lines


# --- the run ------------------------------------------------------------------------


def run(settings: Settings, pki: Path | None, workdir: Path) -> tuple[list, list]:
    """Run every configured server and case; return (results, skipped servers).

    With several rounds the servers take turns, round after round, so that
    the machine's drift touches each of them alike.
    """
    needed = max([settings.devices, settings.burst or 0])
    if pki is None:
        pki = workdir / "pki"
        make_pki(pki, needed)
    devices = device_paths(pki, needed)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    servers = [
        Server(
            pki=pki,
            workdir=workdir / f"server-workers-{workers}",
            workers=workers,
            extra_args=settings.server_args,
        )
        for workers in settings.workers
    ]
    if settings.go_estserver is not None:
        servers.insert(
            0,
            Server(
                pki=pki,
                workdir=workdir / "go-estserver",
                workers=0,
                go_binary=settings.go_estserver,
            ),
        )
    if settings.reference:
        servers.insert(
            0, Server(pki=pki, workdir=workdir / "reference", workers=0, reference=True)
        )
    refused: set[str] = set()
    workdirs = {server.label: server.workdir for server in servers}
    for round_number in range(1, settings.rounds + 1):
        for server in servers:
            if server.label in refused:
                continue
            if settings.rounds > 1:
                # Its own log and ledger per round: no round inherits a
                # bigger database than the others had.
                server.workdir = workdirs[server.label] / f"round-{round_number}"
            try:
                server.start()
            except ServerFailed as exc:
                optional = (
                    server.estd and server.workers != 1 and settings.optional_workers
                )
                if not optional and not results:
                    raise
                # Refused --workers N under --matrix, or a later failure:
                # keep what was measured and go on without this server.
                _log(f"bench: {server.label} did not start: {exc}")
                skipped.append(
                    {
                        "server": server.label,
                        "server_workers": server.workers,
                        "round": round_number,
                        "error": str(exc),
                    }
                )
                refused.add(server.label)
                continue
            try:
                results += _run_server(settings, server, devices, round_number)
            finally:
                server.stop()
    return results, skipped


def _run_server(
    settings: Settings,
    server: Server,
    devices: list[tuple[str, str]],
    round_number: int,
) -> list[dict[str, Any]]:
    """Every case (and the burst) against one started server."""
    results = []
    prefix = f"round {round_number}: " if settings.rounds > 1 else ""
    _log(
        f"bench: {prefix}server {server.label} on 127.0.0.1:{server.port}, "
        f"{len(server.pids())} process(es); log {server.log_path}"
    )
    runner = Runner(server, settings, devices)
    try:
        cases = settings.cases
        if server.reference:
            cases = [case for case in cases if case in HANDSHAKE_CASES]
        for case in cases:
            for concurrency in settings.concurrency:
                _log(f"bench: {prefix}{server.label} {case} @ {concurrency} ...")
                result = runner.closed_loop(case, concurrency)
                result["round"] = round_number
                _emit(result)
                results.append(result)
        if settings.burst and not server.reference:
            _log(
                f"bench: {prefix}{server.label} burst of {settings.burst} devices "
                f"@ {settings.burst_concurrency} ..."
            )
            result = runner.burst(settings.burst, settings.burst_concurrency)
            result["round"] = round_number
            _emit(result)
            results.append(result)
    finally:
        runner.close()
    return results


def _emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, sort_keys=True), flush=True)
    lat = result["latency_ms"]
    _log(
        f"bench:   {result['rps']} req/s, p50 {lat['p50']} ms, p99 {lat['p99']} ms, "
        f"errors {result['error_count']}, server {result['server_cpu_ms_per_request']} "
        f"ms/req, client {result['client_cpu_ms_per_request']} ms/req "
        f"({result['client_cpu_util'] * 100:.0f}% of its cores)"
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _list(kind: type, text: str) -> list[Any]:
    return [kind(item) for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.driver",
        description="Benchmark estd: a real twistd on loopback, driven by "
        "fresh mutual-TLS connections; reports server CPU per request.",
    )
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument(
        "--matrix",
        action="store_true",
        help="make bench: every case at 8/64/256, single process and "
        "--workers 2 (if the server accepts it), a burst of 1,000 devices, "
        "and the handshake cases on bench/refserver.py (--reference)",
    )
    preset.add_argument(
        "--smoke",
        action="store_true",
        help="make bench-smoke: a few seconds, fails on any error (the "
        "reference server included)",
    )
    parser.add_argument(
        "--case",
        type=lambda t: _list(str, t),
        help=f"comma-separated cases: {', '.join(CASES)} [simplereenroll]",
    )
    parser.add_argument(
        "--concurrency",
        type=lambda t: _list(int, t),
        help="comma-separated: requests outstanding in total [8]",
    )
    parser.add_argument("--duration", type=float, help="seconds per case [10]")
    parser.add_argument(
        "--requests", type=int, help="stop each case after N requests (no --duration)"
    )
    parser.add_argument(
        "--burst",
        type=int,
        metavar="DEVICES",
        help="every one of DEVICES devices renews once, retrying after 503",
    )
    parser.add_argument(
        "--burst-concurrency",
        type=int,
        help="connections outstanding in a burst [256]",
    )
    parser.add_argument("--devices", type=int, help="device certificates [1000]")
    parser.add_argument(
        "--workers",
        type=lambda t: _list(int, t),
        help="comma-separated server process counts; N != 1 passes --workers N [1]",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra twistd est option, e.g. --server-arg=--max-pending=64",
    )
    parser.add_argument(
        "--clients",
        type=int,
        help="load generator processes [min(4, max(2, CPUs))]",
    )
    parser.add_argument("--tls", choices=("1.3", "1.2", "any"), default="1.3")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds per case [1]")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request [30]")
    parser.add_argument(
        "--retry-cap", type=float, default=1.0, help="longest Retry-After honoured [1]"
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also run the handshake cases against bench/refserver.py, a "
        "minimal pyOpenSSL server: this machine's TLS floor (on with --matrix)",
    )
    parser.add_argument(
        "--go-estserver",
        type=Path,
        metavar="BINARY",
        help="also run every case on this foundriesio/estserver binary (the Go "
        "server estd replaces, built elsewhere) on the same PKI, and print the "
        "servers side by side",
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="run the servers in turn this many times and report medians [1]",
    )
    parser.add_argument("--pki", type=Path, help="reuse an `estctl demo` directory")
    parser.add_argument("--workdir", type=Path, help="keep PKI, logs, ledgers here")
    parser.add_argument(
        "--results-dir",
        type=Path,
        help=f"where to write <timestamp>.json [{RESULTS_DIR.relative_to(REPO_ROOT)}; "
        "none with --smoke]",
    )
    parser.add_argument("--no-save", action="store_true", help="write no results file")
    parser.add_argument(
        "--fail-on-errors",
        action="store_true",
        help="exit 1 if any request failed (always on with --smoke)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Presets first, then what the command line says."""
    cpus = len(os.sched_getaffinity(0))
    if args.matrix:
        base = {
            "cases": list(MATRIX_CASES),
            "concurrency": list(MATRIX_CONCURRENCY),
            "duration": 12.0,
            "burst": 1000,
            "workers": [1, 2],
            "warmup": 1.0,
        }
    elif args.smoke:
        base = {
            "cases": ["simplereenroll", "simpleenroll", "cacerts", "handshake"],
            "concurrency": [4],
            "requests": 50,
            "requests_per_case": {"simpleenroll": 10, "cacerts": 20, "handshake": 20},
            "burst": 20,
            "burst_concurrency": 8,
            "devices": 50,
            "warmup": 0.0,
            "clients": 2,
            "reference": True,
        }
    else:
        base = {}
    cases = args.case or base.get("cases")
    if cases is None:
        cases = [] if args.burst else ["simplereenroll"]
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"bench: unknown case {case!r}; use {', '.join(CASES)}")
    # --duration and --requests on the command line win over the preset's.
    if args.requests is not None:
        requests, duration = args.requests, None
    elif args.duration is not None:
        requests, duration = None, args.duration
    else:
        requests, duration = base.get("requests"), base.get("duration", 10.0)
    per_case = base.get("requests_per_case", {}) if args.requests is None else {}
    return Settings(
        cases=cases,
        concurrency=args.concurrency or base.get("concurrency", [8]),
        duration=None if requests is not None else duration,
        requests=requests,
        requests_per_case=per_case if requests is not None else {},
        burst=args.burst if args.burst is not None else base.get("burst"),
        burst_concurrency=args.burst_concurrency or base.get("burst_concurrency", 256),
        devices=args.devices or base.get("devices", 1000),
        workers=args.workers or base.get("workers", [1]),
        server_args=args.server_arg,
        clients=args.clients or base.get("clients", min(4, max(2, cpus))),
        tls=args.tls,
        warmup=args.warmup if args.warmup is not None else base.get("warmup", 1.0),
        timeout=args.timeout,
        retry_cap=args.retry_cap,
        fail_on_errors=args.fail_on_errors or args.smoke,
        optional_workers=args.matrix,
        reference=args.reference or bool(base.get("reference", args.matrix)),
        go_estserver=_go_binary(args.go_estserver),
        rounds=args.rounds,
    )


def _go_binary(path: Path | None) -> Path | None:
    """The --go-estserver binary, checked before any PKI is made."""
    if path is None:
        return None
    if not os.access(path, os.X_OK) or not path.is_file():
        raise SystemExit(f"bench: --go-estserver {path}: not an executable file")
    return path.resolve()


def write_results(path: Path, document: dict[str, Any]) -> None:
    """Write a run's results as JSON (paths, such as --go-estserver, as text)."""
    path.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit status 0, 1 (errors, when asked) or 2 (no server)."""
    args = parse_args(argv)
    settings = settings_from(args)
    started = datetime.datetime.now(datetime.UTC)
    machine = machine_description()
    _log(
        f"bench: {machine['nproc']} CPUs ({machine['cpu_model']}), "
        f"Python {machine['python']}, client {machine['client_openssl']}, "
        f"server {machine['server_openssl']}, estd {machine['estd_commit']}"
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="estd-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results, skipped = run(settings, args.pki, workdir)
    except ServerFailed as exc:
        _log(f"bench: the server did not start: {exc}")
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = table(results, skipped)
    _log("")
    _log(summary)
    results_dir = args.results_dir or (None if args.smoke else RESULTS_DIR)
    if results_dir is not None and not args.no_save:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / (started.strftime("%Y%m%dT%H%M%SZ") + ".json")
        document = {
            "started": started.isoformat(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "settings": dataclasses.asdict(settings),
            "machine": machine,
            "cases": results,
            "skipped": skipped,
            "table": summary,
        }
        write_results(path, document)
        _log(f"bench: results written to {path}")
    errors = sum(r["error_count"] for r in results)
    if settings.fail_on_errors and errors:
        _log(f"bench: {errors} request(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
