"""``cpu-affinity = auto``: each serving process stays on one CPU.

A serving process has one reactor thread and a pool of signing threads that
take turns holding the interpreter lock dozens of times per request.  When
the scheduler runs them on different CPUs, every turn also moves the
request's data from one CPU's cache to the other's; kept on one CPU, the
same renewal costs less CPU (see README, Performance).  Worker N goes to
the Nth CPU the service may use (wrapping around), so that ``workers =
auto`` spreads one worker per CPU; a single process goes to the first.
The supervisor of the workers is left where the scheduler puts it.
"""

from __future__ import annotations

import os

from twisted.logger import Logger

log = Logger(namespace="estd")


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def cpu_for_worker(number: int, cpus: list[int]) -> int:
    """The CPU of worker ``number`` (1-based): the Nth of ``cpus``, wrapping."""
    return cpus[(number - 1) % len(cpus)]


def pin_process(cpu: int) -> bool:
    """Run every thread of this process, and those it starts later, on ``cpu``.

    Returns False (after a warning) if the kernel refuses, for instance when
    the CPU was taken from this process's cpuset meanwhile: every thread
    pinned so far gets its former CPUs back and the process serves unpinned,
    which only costs CPU time.
    """
    try:
        tasks = [int(task) for task in os.listdir("/proc/self/task")]
    except OSError:
        tasks = [0]  # no /proc: this thread; threads started later inherit it
    pinned: list[tuple[int, set[int]]] = []
    try:
        for task in tasks:
            try:
                former = os.sched_getaffinity(task)
                os.sched_setaffinity(task, {cpu})
            except ProcessLookupError:
                continue  # a thread that ended meanwhile
            pinned.append((task, former))
    except OSError as exc:
        for task, former in pinned:
            try:
                os.sched_setaffinity(task, former)
            except OSError:  # gone, or refused: nothing better to do
                pass
        log.warn(
            "cpu-affinity = auto: cannot pin this process to CPU {cpu} ({error}); "
            "serving unpinned",
            cpu=cpu,
            error=exc.strerror or str(exc),
        )
        return False
    log.info("cpu-affinity = auto: this process runs on CPU {cpu}", cpu=cpu)
    return True
