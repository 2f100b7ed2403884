"""
Log observers for twistd's C{--logger}, for journald or a log shipper:

    twistd --nodaemon --pidfile= --logger leeloo.logs.json leeloo ...

writes one JSON object per line for each event at info level or above, on
standard output: C{time} (ISO 8601, UTC), C{level}, C{namespace} (the
module that logged it), C{text} (the line the text log would show), then
the event's own fields (C{client_address}, C{crew_code}, C{close_code},
...; a failure's C{traceback}).  C{leeloo.logs.json_debug} writes the
debug events too.
"""

from __future__ import annotations

import datetime
import json as _json
import sys
from typing import IO, Any, Callable

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

# The line's own keys ("time", "level", "namespace", "text", "traceback")
# come first; an event field of the same name is written as "field_NAME".
# Keys of legacy (twisted.python.log) events that repeat the new ones.
_LEGACY = frozenset({"message", "isError", "time", "format", "failure", "why"})


def _safe(value: Any) -> Any:
    """
    C{value} as JSON can hold it: strings, numbers, booleans and None as
    they are, containers walked, anything else as its C{str()}.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {str(k): _safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_safe(v) for v in value]
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def event_as_record(event: dict) -> dict:
    """
    The JSON object written for C{event}.
    """
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": None if when is None else
        datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = "(could not format the traceback)"
    legacy = event.get("log_namespace") == "log_legacy"
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY):
            continue
        record["field_" + key if key in record else key] = _safe(value)
    return record


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each event at C{level} or above to C{out} as one JSON line, and
    flushes it (a crash loses no line).  Never raises.
    """

    def __init__(self, out: IO[str], level: Any = LogLevel.info) -> None:
        self.out = out
        self.level = level

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        if level < self.level:
            return
        try:
            line = _json.dumps(event_as_record(event), ensure_ascii=False, separators=(",", ":"))
        except Exception as e:
            line = _json.dumps({"level": "error", "text": f"an event could not be written as JSON: {e!r}"})
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except Exception:
            pass


def json(out: IO[str] | None = None) -> Callable[[dict], None]:
    """
    C{--logger leeloo.logs.json}: JSON lines on standard output, info and
    above.
    """
    return JSONLinesObserver(sys.stdout if out is None else out)


def json_debug(out: IO[str] | None = None) -> Callable[[dict], None]:
    """
    C{--logger leeloo.logs.json_debug}: the same, debug events included.
    """
    return JSONLinesObserver(sys.stdout if out is None else out, LogLevel.debug)
