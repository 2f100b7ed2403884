"""
Log observers.

Under twistd with no C{--logger}, the relay writes twistd's own text log
(L{text}: the same lines, to the same C{--logfile} twistd would choose, see
L{twistd_text_observer}) for a quarter of the CPU per line: twistd's
observer formats the time stamp, and the text with C{string.Formatter},
for every line (C{benchmarks/log_cost.py} measures both).

For twistd's C{--logger}, for journald or a log shipper:

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
import math
import signal
import sys
from typing import IO, Any, Callable

from twisted.logger import (FileLogObserver, ILogObserver, LogLevel, formatEvent, formatEventAsClassicLogText,
                            formatTime)
from twisted.python.logfile import LogFile
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


class _Fields:
    """
    An event's fields for C{str.format_map}, a name ending in C{()} called,
    as twistd's C{formatWithCall} does for the plain cases.  What needs more
    (a call after an attribute, say) fails here and goes to Twisted's
    formatter, which is then the one that writes it.
    """

    __slots__ = ("_event",)

    def __init__(self, event: dict) -> None:
        self._event = event

    def __getitem__(self, key: str) -> Any:
        if key.endswith("()"):
            return self._event[key[:-2]]()
        return self._event[key]


class _ClassicText:
    """
    C{formatEventAsClassicLogText} with twistd's time format (RFC 3339, to
    the second), for less CPU: each second's stamp is formatted once, and
    an event's text is formatted by C{str.format_map} (in C) rather than
    C{string.Formatter} (in Python), falling back to Twisted's own for
    anything else (a failure, a flattened or legacy event, a format that
    does not format).  The lines are the same: C{tests/test_logs.py}
    compares them on any event.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = ""

    def _time(self, when: float | None) -> str:
        try:
            second = math.floor(when)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            return formatTime(when)
        if second != self._second:
            # The stamp (and the time zone's offset) is the same for the
            # whole second: formatTime reads nothing finer.
            self._stamp = formatTime(when)
            self._second = second
        return self._stamp

    def __call__(self, event: dict) -> str | None:
        line = self._plain(event)
        if line is None:
            line = formatEventAsClassicLogText(event, formatTime=self._time)
        return line

    def _plain(self, event: dict) -> str | None:
        """
        The line for an event with a str format, a str or no system, and no
        failure; None for any other, or when the format does not format.
        """
        format = event.get("log_format")
        if type(format) is not str or "log_failure" in event or "log_flattened" in event:
            return None
        try:
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
            elif type(system) is not str:
                return None
            # A format with no call in it reads the event's fields straight
            # from the event (no Python call per field).
            text = format.format_map(_Fields(event) if "()" in format else event)
            if not text:
                return None
            return f"{self._time(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"
        except Exception:
            return None


def text(out: IO[str]) -> ILogObserver:
    """
    twistd's text log on C{out}: the lines C{textFileLogObserver} writes,
    each flushed as it is written.
    """
    return FileLogObserver(out, _ClassicText())


def twistd_text_observer(twistd: Any) -> ILogObserver | None:
    """
    The text observer for twistd's options C{twistd} (C{ServerOptions},
    the parent of the relay's own), writing where twistd's own would:
    standard output for C{--logfile=-} or C{--nodaemon} without
    C{--logfile}, else the C{--logfile} (default C{twistd.log}), reopened
    on SIGUSR1 as twistd does.  None where twistd must choose: C{--logger},
    C{--syslog}, or a daemon told to log to standard output (twistd
    refuses that).
    """
    if twistd is None:
        return None
    try:
        logger, syslog = twistd.get("logger"), twistd.get("syslog")
        logfile, nodaemon = twistd.get("logfile") or "", twistd.get("nodaemon")
    except AttributeError:
        return None
    if logger or syslog:
        return None
    if logfile == "-":
        return text(sys.stdout) if nodaemon else None
    if nodaemon and not logfile:
        return text(sys.stdout)
    out = LogFile.fromFullPath(logfile or "twistd.log")
    # As twistd does: SIGUSR1 rotates the log unless something else has it.
    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return text(out)
