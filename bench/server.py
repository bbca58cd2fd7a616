"""The server under test: a real ``twistd -n est``, and what /proc says of it.

The server is started through the ``twistd`` entry point of this
interpreter, with the plugin found on ``PYTHONPATH`` (this checkout first),
on a free loopback port, with the admin listener off and its own fresh
ledger directory.  Readiness is a bounded poll of ``GET cacerts`` over TLS,
never a fixed sleep.

CPU is read from ``/proc/<pid>/stat`` of the twistd process and all its
descendants (found by scanning /proc for parent links): utime + stime of each
live process plus cutime + cstime (children it has already reaped, such as a
replaced worker), so that a sample before and one after a measured interval
give the server's whole CPU time in it.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0


GO_LABEL = "go-estserver"
GO_CA_KEY = "est-ca.sec1.key"
"""The Go server reads only SEC1 ("EC PRIVATE KEY") CA keys; estd demo writes PKCS#8."""


class ServerFailed(RuntimeError):
    """The server did not start (it exited, or never answered)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def twistd_command() -> list[str]:
    """The ``twistd`` entry point of the running interpreter."""
    script = Path(sys.executable).with_name("twistd")
    if script.exists():
        return [str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd';"
        " from twisted.scripts.twistd import run; run()",
    ]


def server_env() -> dict[str, str]:
    """The environment for estd: this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    parts = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def write_sec1_key(source: Path, target: Path) -> None:
    """Copy an EC private key from PKCS#8 PEM to SEC1 PEM (mode 0600)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(source.read_bytes(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


# --- /proc ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    # Field 3 (state) onwards; the command name may contain spaces and parens.
    return text.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (field 22), to tell a process from a reused pid."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None else None


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant, found through parent links in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    tree, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(parents.get(pid, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime + cutime + cstime of ``pids``, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # Fields 14-17 of /proc/PID/stat; index 0 here is field 3.
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(sum of VmRSS, sum of VmHWM) of ``pids`` in KiB."""
    rss = hwm = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as handle:
                for line in handle:
                    if line.startswith(b"VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith(b"VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, from /proc/stat."""
    with open("/proc/stat", "rb") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


class MemorySampler:
    """Samples the server tree's summed RSS in a background thread."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """Take one sample now."""
        rss, _ = memory_kib(process_tree(self.root))
        self.peak_kib = max(self.peak_kib, rss)

    def reset(self) -> None:
        """Forget the peak so far (at the start of a case)."""
        self.peak_kib = 0
        self.sample()

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()


# --- the server ---------------------------------------------------------------------


@dataclass
class Server:
    """One ``twistd -n est`` on a free loopback port.

    With ``reference``, :mod:`bench.refserver` instead: the minimal pyOpenSSL
    server.  With ``go_binary``, a foundriesio/estserver binary built
    elsewhere, the server estd replaces, on the same demo PKI.  Both count
    as workers 0.
    """

    pki: Path
    workdir: Path
    workers: int = 1
    reference: bool = False
    go_binary: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def label(self) -> str:
        """How reports name this server."""
        if self.go_binary is not None:
            return GO_LABEL
        return "reference" if self.reference else f"workers={self.workers}"

    @property
    def estd(self) -> bool:
        """True for estd itself (not a reference or comparison server)."""
        return not self.reference and self.go_binary is None

    @property
    def cacerts_count(self) -> int:
        """Certificates ``cacerts`` holds: the Go server sends only the root."""
        return 1 if self.go_binary is not None else 2

    @property
    def log_path(self) -> Path:
        """twistd's stdout and stderr: the server log."""
        return self.workdir / "twistd.log"

    def argv(self) -> list[str]:
        """The command line that starts the server."""
        if self.go_binary is not None:
            pki = self.pki
            return [
                str(self.go_binary),
                "--port",
                str(self.port),
                "--tls-cert",
                str(pki / "local-tls.pem"),
                "--tls-key",
                str(pki / "local-tls.key"),
                "--root-cert",
                str(pki / "factory_ca.pem"),
                "--ca-cert",
                str(pki / "est-ca.pem"),
                "--ca-key",
                str(self.workdir / GO_CA_KEY),
                "--client-cas",
                str(pki / "client-cas.pem"),
            ]
        if self.reference:
            return [
                sys.executable,
                "-m",
                "bench.refserver",
                "--pki",
                str(self.pki),
                "--port",
                str(self.port),
            ]
        args = [
            *twistd_command(),
            "-n",
            "--pidfile",
            str(self.workdir / "twistd.pid"),
            "est",
            "--config",
            str(self.pki / "est.ini"),
            f"--listen=tcp:{self.port}:interface=127.0.0.1",
            "--admin-listen=",
            f"--state-dir={self.workdir / 'state'}",
        ]
        if self.workers != 1:
            args += ["--workers", str(self.workers)]
        return args + self.extra_args

    def start(self) -> None:
        """Start twistd and wait until it answers ``cacerts`` (and its workers run)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "state").mkdir(exist_ok=True)
        if self.go_binary is not None:
            write_sec1_key(self.pki / "est-ca.key", self.workdir / GO_CA_KEY)
        self.port = free_port()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv(),
                cwd=self.workdir,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.process is not None
        context = ssl.create_default_context(cafile=str(self.pki / "factory_ca.pem"))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"{self.label} exited with status {self.process.returncode}: "
                    + self.log_tail()
                )
            if _cacerts_ok(context, self.port):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(
                    f"no answer on port {self.port} after {START_TIMEOUT:g}s: "
                    + self.log_tail()
                )
            time.sleep(0.05)  # a poll interval, not a synchronisation sleep
        if self.workers > 1:
            # The workers may start after the first one answers: wait until
            # the tree holds at least that many processes (bounded).
            while len(process_tree(self.process.pid)) < self.workers:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise ServerFailed(
                        f"{self.workers} worker processes never appeared: "
                        + self.log_tail()
                    )
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The twistd process and its descendants."""
        assert self.process is not None
        return process_tree(self.process.pid)

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server and its workers."""
        return cpu_seconds(self.pids())

    def stop(self) -> None:
        """SIGTERM the server (and, after a grace period, SIGKILL what is left)."""
        if self.process is None or self.process.poll() is not None:
            return
        tree = [(pid, _start_time(pid)) for pid in self.pids()[1:]]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        for pid, started in tree:  # workers that outlived their parent
            if started is not None and _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:])


def _cacerts_ok(context: ssl.SSLContext, port: int) -> bool:
    """One anonymous ``GET cacerts``; True on a 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(
                    b"GET /.well-known/est/cacerts HTTP/1.1\r\n"
                    b"Host: localhost\r\nConnection: close\r\n\r\n"
                )
                head = tls.recv(64)
    except (OSError, ssl.SSLError):
        return False
    return head.startswith(b"HTTP/1.1 200")
