"""``log-format = json``: one JSON object per line, with stable field names.

twistd decides where logs go (``--logfile``, stdout with ``-n``); estd only
changes how each event is written, by giving the application a log
observer.  Fields: ``time`` (UTC, ISO 8601), ``level``, ``namespace``,
``message`` (the text line), plus the event's own fields (estd's request
lines carry ``client_address``, ``method``, ``path``, ``status``,
``bytes``, ``duration_ms``, ``client_subject``, ``client_serial``,
``issued_serial``, ``issued_not_after``...), and ``traceback`` for failures.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python import logfile

_INTERNAL = frozenset(
    {"message", "format", "time", "system", "isError", "failure", "why", "log_legacy"}
)


def json_event(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON object written for one log event."""
    when = datetime.datetime.fromtimestamp(event.get("log_time", 0), datetime.UTC)
    level = event.get("log_level")
    out: dict[str, Any] = {
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _INTERNAL or key in out:
            continue
        if isinstance(value, str | int | float | bool) or value is None:
            out[key] = value
    # twisted.python.log.err events carry theirs as "failure".
    failure = event.get("log_failure") or event.get("failure")
    if failure is not None:
        out["traceback"] = failure.getTraceback()
    return out


def json_observer(output: IO[str]) -> ILogObserver:
    """An observer writing JSON lines to ``output``."""
    return FileLogObserver(
        output, lambda event: json.dumps(json_event(event), default=str) + "\n"
    )


def twistd_log_output(argv: list[str] | None = None) -> IO[str]:
    """Where twistd would write its log, from its own command line.

    Mirrors twistd's choice: stdout in the foreground unless ``--logfile``
    names a file, else the file (``twistd.log`` by default), rotated on
    size like twistd's own.
    """
    from twisted.scripts._twistd_unix import ServerOptions

    options = ServerOptions()
    try:
        options.parseOptions((argv if argv is not None else sys.argv)[1:])
    except SystemExit:  # --help and the like never reach here in practice
        return sys.stdout
    except Exception:
        return sys.stdout
    name = options.get("logfile") or ""
    if name == "-" or (options.get("nodaemon") and not name):
        return sys.stdout
    return logfile.LogFile.fromFullPath(name or "twistd.log")  # type: ignore[no-any-return]
