"""cpu-affinity = auto: which CPU a worker gets, and pinning a whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from estd.affinity import allowed_cpus, cpu_for_worker
from estd.workers import child_options
from tests.e2e_support import server_env


def run_script(script: str, *args: str) -> str:
    """Run ``script`` in a fresh interpreter (its pinning stays there); its stdout."""
    completed = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=server_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return completed.stdout


def test_workers_take_the_allowed_cpus_in_turn() -> None:
    """Worker N gets the Nth allowed CPU, wrapping when there are more workers."""
    cpus = [2, 3, 6]
    assert [cpu_for_worker(n, cpus) for n in range(1, 8)] == [2, 3, 6, 2, 3, 6, 2]


def test_allowed_cpus_are_this_process_s() -> None:
    """The CPUs come from the process's own affinity mask, in order."""
    assert allowed_cpus() == sorted(os.sched_getaffinity(0))


PIN_SCRIPT = """
import json, os, sys, threading
from estd.affinity import pin_process
started = threading.Event()
stop = threading.Event()
def wait():
    started.set()
    stop.wait()
before = threading.Thread(target=wait)
before.start()
started.wait()
pinned = pin_process(int(sys.argv[1]))
after = threading.Thread(target=stop.wait)
after.start()
masks = {task: sorted(os.sched_getaffinity(int(task)))
         for task in os.listdir("/proc/self/task")}
stop.set()
before.join()
after.join()
print(json.dumps({"pinned": pinned, "masks": masks}))
"""


def test_pin_process_covers_every_thread_and_later_ones() -> None:
    """A thread started before pinning and one started after both run on the CPU."""
    cpu = allowed_cpus()[-1]
    outcome = json.loads(run_script(PIN_SCRIPT, str(cpu)))
    assert outcome["pinned"] is True
    assert len(outcome["masks"]) == 3  # main, the thread before, the thread after
    assert all(mask == [cpu] for mask in outcome["masks"].values())


def test_pin_process_refused_serves_unpinned() -> None:
    """A CPU the kernel refuses gives a warning and False, not a crash."""
    impossible = max(allowed_cpus()) + 4096
    output = run_script(
        "import os, sys; from estd.affinity import pin_process;"
        " print(pin_process(int(sys.argv[1])), sorted(os.sched_getaffinity(0)))",
        str(impossible),
    )
    assert output.split(" ", 1)[0] == "False"
    assert output.split(" ", 1)[1].strip() == str(allowed_cpus())


PARTIAL_SCRIPT = """
import json, os, sys, threading
from estd import affinity
stop = threading.Event()
helper = threading.Thread(target=stop.wait)
helper.start()
before = {task: sorted(os.sched_getaffinity(int(task)))
          for task in os.listdir("/proc/self/task")}
real = os.sched_setaffinity
calls = []
def refuse_second(task, cpus):
    calls.append(task)
    if len(calls) == 2:
        raise OSError(22, "Invalid argument")
    real(task, cpus)
os.sched_setaffinity = refuse_second
pinned = affinity.pin_process(int(sys.argv[1]))
os.sched_setaffinity = real
after = {task: sorted(os.sched_getaffinity(int(task)))
         for task in os.listdir("/proc/self/task")}
stop.set()
helper.join()
print(json.dumps({"pinned": pinned, "before": before, "after": after}))
"""


def test_a_refusal_part_way_puts_pinned_threads_back() -> None:
    """If the kernel refuses the second thread, the first gets its CPUs back."""
    cpu = allowed_cpus()[0]
    outcome = json.loads(run_script(PARTIAL_SCRIPT, str(cpu)))
    assert outcome["pinned"] is False
    assert outcome["after"] == outcome["before"]
    assert len(outcome["before"]) == 2


def test_each_worker_is_told_its_cpu() -> None:
    """The supervisor passes the CPU to a worker only under cpu-affinity = auto."""
    options = {"config": None, "threads": "2", "workers": "2"}
    pinned = child_options(options, ["threads", "workers"], "", 2, cpu=3)
    assert pinned[-1] == "--worker-cpu=3"
    assert "--threads=2" in pinned
    free = child_options(options, ["threads", "workers"], "", 2)
    assert not any(option.startswith("--worker-cpu") for option in free)
