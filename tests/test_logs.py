"""
Tests for L{leeloo.logs}: ``twistd --logger leeloo.logs.json`` writes one
JSON object per line per event, with the event's fields.
"""

import io
import json
import os
import re
import signal
import sys

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.application.service import Application
from twisted.logger import ILogObserver, formatEventAsClassicLogText, textFileLogObserver
from twisted.python.logfile import LogFile
from twisted.scripts.twistd import ServerOptions

from twisted.internet import defer
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo import logs, tap

from .support import RelayProcess, TwistdProtocol, recv, ws_session


class Recorded:
    """
    A L{Logger} whose events go to a JSON observer writing into a string.
    """

    def __init__(self, observer_factory=logs.json):
        self.out = io.StringIO()
        publisher = LogPublisher(observer_factory(self.out))
        self.log = Logger(namespace="leeloo.test", observer=publisher)

    def records(self):
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


class ObserverTests(SynchronousTestCase):
    def test_one_object_per_line_with_fields(self):
        """
        Each event is one line: its time, level, namespace and text, then
        its own fields by name.
        """
        recorded = Recorded()
        recorded.log.info("register: device {device_id} from {client_address}, crew {crew_code}",
                          device_id="d1", client_address="192.0.2.7", crew_code="LEELOO-7X3K")
        recorded.log.warn("refused {count} connections", count=3)
        lines = recorded.out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first, second = [json.loads(line) for line in lines]
        self.assertEqual(
            {k: first[k] for k in ("level", "namespace", "text", "device_id", "client_address", "crew_code")},
            {"level": "info", "namespace": "leeloo.test",
             "text": "register: device d1 from 192.0.2.7, crew LEELOO-7X3K",
             "device_id": "d1", "client_address": "192.0.2.7", "crew_code": "LEELOO-7X3K"})
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertEqual((second["level"], second["count"]), ("warn", 3))
        self.assertFalse([k for k in first if k.startswith("log_")])

    def test_debug_only_in_json_debug(self):
        """
        leeloo.logs.json writes info and above; json_debug debug too.
        """
        plain, verbose = Recorded(), Recorded(logs.json_debug)
        for recorded in (plain, verbose):
            recorded.log.debug("store idle")
            recorded.log.info("ready")
        self.assertEqual([r["text"] for r in plain.records()], ["ready"])
        self.assertEqual([(r["level"], r["text"]) for r in verbose.records()],
                         [("debug", "store idle"), ("info", "ready")])

    def test_failure_traceback(self):
        """
        A failure is written with its traceback.
        """
        recorded = Recorded()
        try:
            1 / 0
        except ZeroDivisionError:
            recorded.log.failure("bug while replaying to {device_id}", Failure(), device_id="d1")
        [record] = recorded.records()
        self.assertEqual((record["level"], record["device_id"]), ("critical", "d1"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_values_json_cannot_hold(self):
        """
        Fields JSON has no type for are written as text, containers walked;
        a field named like one of the line's own keys keeps its value.
        """
        recorded = Recorded()
        recorded.log.info("odd", path=__import__("pathlib").Path("/var/lib/leeloo"), raw=b"\xff",
                          codes={4029: 1}, ratio=float("nan"), text="mine")
        [record] = recorded.records()
        self.assertEqual((record["path"], record["raw"], record["codes"], record["ratio"]),
                         ("/var/lib/leeloo", "\\xff", {"4029": 1}, "nan"))
        self.assertEqual((record["text"], record["field_text"]), ("odd", "mine"))

    def test_legacy_events(self):
        """
        Events of twisted.python.log (twisted.web's access log, say) are
        written as text, without their legacy duplicates.
        """
        out = io.StringIO()
        publisher = LogPublisher(logs.json(out))
        legacy = legacy_log.LogPublisher(observerPublisher=publisher, publishPublisher=publisher)
        legacy.msg("GET /health 200", system="RelaySite")
        [record] = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual((record["text"], record["system"]), ("GET /health 200", "RelaySite"))
        self.assertFalse({"message", "isError", "format"} & set(record))

    def test_writer_failure_is_silent(self):
        """
        An observer whose output fails raises nothing (the logging system
        would otherwise drop it).
        """
        class Broken:
            def write(self, text):
                raise OSError("disk full")

            def flush(self):
                pass

        logs.json(Broken())({"log_level": LogLevel.info, "log_format": "x", "log_time": 0.0})


class JSONLines(TwistdProtocol):
    """
    A twistd process's output with its stdout apart from its stderr.
    """

    def __init__(self):
        super().__init__()
        self.stdout = b""

    def outReceived(self, data):
        self.stdout += data
        super().outReceived(data)

    def errReceived(self, data):
        super().outReceived(data)


class TwistdJSONTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_writes_json_lines(self):
        """
        twistd --logger leeloo.logs.json writes only JSON objects, one per
        line, on standard output: the start, ready and stop lifecycle
        lines at info with their fields, a device's register with its
        device id, address and crew, and no line for the message it sent.
        """
        proto = JSONLines()
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--store", "memory",
                             twistd_args=("--logger", "leeloo.logs.json"), proto=proto)
        port = yield proto.port

        def device(connect):
            with connect() as ws:
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_00000000002a",
                                    "crew_code": "ALPHA"}))
                recv(ws)
                ws.send(json.dumps({"type": "message", "msg_type": "text", "payload": {"text": "secret words"}}))
                ws.send(json.dumps({"type": "ping"}))
                recv(ws)

        yield ws_session(port, device)
        yield relay.stop()
        records = [json.loads(line) for line in proto.stdout.decode("utf-8").splitlines()]
        texts = [r["text"] for r in records]
        [ready] = [r for r in records if " ready: " in r["text"]]
        self.assertEqual(ready["level"], "info")
        self.assertIn(f"127.0.0.1:{port}", ready["where"])
        [register] = [r for r in records if r["text"].startswith("register: ")]
        self.assertEqual((register["level"], register["device_id"], register["client_address"],
                          register["crew_code"]), ("info", "leeloo_00000000002a", "127.0.0.1", "ALPHA"))
        self.assertTrue([t for t in texts if t.startswith("closing ") and "flushing the store" in t])
        self.assertFalse([r for r in records if r["level"] == "debug"])
        self.assertNotIn("secret words", proto.stdout.decode("utf-8"))


class _Odd:
    """
    A value with attributes, an index, a format spec and a method, for the
    formats below.
    """

    name = "odd"

    def __getitem__(self, key):
        return f"item {key}"

    def __format__(self, spec):
        return f"<{spec}>"

    def __repr__(self):
        return "Odd()"

    def count(self):
        return 7


# Formats a relay's log lines use, and ones they don't: calls, attributes,
# indexes, conversions, specs, nesting, positions, bad syntax, bytes.
_FORMATS = st.sampled_from([
    "register: device {device_id} from {client_address}, crew {crew_code}",
    "crew {crew_code} created", "", "plain", "two\nlines", "{missing}", "{0}", "{}", "{a", "}",
    "{value!r} {value!s} {value!a}", "{value:>10}", "{value:{width}}", "{odd.name} {odd[3]} {odd:xy}",
    "{odd.count()}", "{f()} and {f}", "{value.real}", "{{literal}}", b"bytes {value}", 3,
])
_VALUES = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
                    st.binary(max_size=6))
_TIMES = st.one_of(st.none(), st.floats(min_value=0, max_value=4e9), st.integers(0, 4_000_000_000),
                   st.just("soon"))


@st.composite
def _events(draw):
    event = {"log_format": draw(_FORMATS), "log_time": draw(_TIMES), "value": draw(_VALUES),
             "width": draw(st.sampled_from([3, "x", None])), "odd": _Odd(), "f": lambda: "called",
             "device_id": draw(st.text(max_size=8)), "client_address": "192.0.2.7", "crew_code": "ALPHA"}
    # Each optional key in about one event in three (most events are then
    # ones the plain path writes, the rest Twisted's formatter).
    for key, strategy in (("log_level", st.sampled_from(list(LogLevel.iterconstants()) * 5 + ["loud"])),
                          ("log_namespace", st.one_of(st.text(max_size=8), st.integers())),
                          ("log_system", st.one_of(st.text(max_size=8), st.integers())),
                          ("log_flattened", st.just({})), ("log_failure", st.just(_failure()))):
        if draw(st.integers(0, 2)) == 0:
            event[key] = draw(strategy)
    for key in ("log_format", "log_time"):
        if draw(st.integers(0, 9)) == 0:
            del event[key]
    return event


def _failure():
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


def _twisted_line(event):
    try:
        return formatEventAsClassicLogText(event)
    except Exception as e:
        return ("raised", type(e))


def _our_line(formatter, event):
    try:
        return formatter(event)
    except Exception as e:
        return ("raised", type(e))


class TextTests(SynchronousTestCase):
    """
    L{logs.text}, the relay's text log under twistd, writes what twistd's
    textFileLogObserver would.
    """

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_events(), min_size=1, max_size=6))
    def test_same_lines_as_twisted(self, events):
        """
        For any events in a row (the time stamp is kept from one line to
        the next), the line is the one Twisted's formatter writes, or the
        same exception.
        """
        formatter = logs._ClassicText()
        for event in events:
            self.assertEqual(_our_line(formatter, event), _twisted_line(event))

    def test_relay_lines(self):
        """
        A relay's own lines come out as twistd's would, across seconds and
        back; each is flushed as it is written.
        """
        class Out(io.StringIO):
            flushes = 0

            def flush(self):
                self.flushes += 1

        ours, theirs = Out(), io.StringIO()
        observer, reference = logs.text(ours), textFileLogObserver(theirs)
        for when in (1_700_000_000.1, 1_700_000_000.9, 1_700_000_001.0, 1_699_999_999.99, None):
            for observe in (observer, reference):
                Logger(namespace="leeloo.core.handlers", observer=observe).info(
                    "register: device {device_id} from {client_address}, crew {crew_code}",
                    device_id="d1", client_address="192.0.2.7", crew_code="ALPHA", log_time=when)
        for observe in (observer, reference):
            Logger(namespace="leeloo.web", observer=observe).warn("refused:\n{why!r}", why="two\nlines",
                                                                  log_time=1_700_000_002.5)
        self.assertEqual(ours.getvalue(), theirs.getvalue())
        self.assertEqual(len(ours.getvalue().splitlines()), 7)
        self.assertEqual(ours.flushes, 6)


def _twistd_options(*argv):
    options = ServerOptions()
    options.parseOptions([*argv, "leeloo", "--store", "memory"])
    return options


class TwistdTextObserverTests(TestCase):
    """
    L{logs.twistd_text_observer} writes where twistd's own text log would,
    and leaves to twistd what it alone does.
    """

    def setUp(self):
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def destination(self, *argv):
        observer = logs.twistd_text_observer(_twistd_options(*argv))
        return None if observer is None else observer._outFile

    def test_standard_output(self):
        """
        --nodaemon with --logfile=- or no --logfile: standard output.
        """
        self.assertIs(self.destination("--nodaemon", "--logfile=-"), sys.stdout)
        self.assertIs(self.destination("--nodaemon"), sys.stdout)

    def test_twistd_chooses(self):
        """
        --logger, --syslog and a daemon told to log to standard output
        (which twistd refuses) are twistd's: no observer.  So is a service
        made without twistd.
        """
        self.assertIsNone(self.destination("--nodaemon", "--logger", "leeloo.logs.json"))
        self.assertIsNone(self.destination("--syslog"))
        self.assertIsNone(self.destination("--logfile=-"))
        self.assertIsNone(logs.twistd_text_observer(None))

    def test_log_file_rotated_on_sigusr1(self):
        """
        --logfile PATH (and twistd.log by default) is a LogFile, reopened
        on SIGUSR1 as twistd's would be.
        """
        path = os.path.abspath(self.mktemp())
        out = self.destination("--logfile", path)
        self.addCleanup(out.close)
        self.assertIsInstance(out, LogFile)
        self.assertEqual(out.path, path)
        rotated = []
        self.patch(out, "rotate", lambda: rotated.append(True))
        from twisted.internet import reactor

        self.patch(reactor, "callFromThread", lambda f, *a: f(*a))
        signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)
        self.assertEqual(rotated, [True])
        cwd = self.mktemp()
        os.makedirs(cwd)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(cwd)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        default = self.destination()
        self.addCleanup(default.close)
        self.assertEqual(default.path, os.path.abspath("twistd.log"))

    def test_given_to_twistds_application(self):
        """
        makeService under twistd gives the application its observer, which
        twistd's logger then takes (AppLogger.start); one the application
        already has is kept.
        """
        config = _twistd_options("--nodaemon")
        tree = tap.makeService(config.subOptions)
        application = Application("leeloo")
        tree.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        self.assertIs(observer, tree.log_observer)
        self.assertIs(observer._outFile, sys.stdout)
        theirs = Application("leeloo")
        mine = logs.text(io.StringIO())
        theirs.setComponent(ILogObserver, mine)
        tap.makeService(config.subOptions).setServiceParent(theirs)
        self.assertIs(theirs.getComponent(ILogObserver), mine)


class TwistdTextTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_log_file(self):
        """
        A real twistd with --logfile writes the relay's text lines to it,
        as twistd's would, and SIGUSR1 rotates it.
        """
        path = os.path.abspath(self.mktemp())
        proto = TwistdProtocol()
        # Its output is the file's, so no "Site starting" line reaches it.
        proto.port.addErrback(lambda failure: None)
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--store", "memory",
                             twistd_args=("--logfile", path), proto=proto)
        found = yield _until_in_file(path, b" ready: ")
        port = int(re.search(rb" ready: .* on 127\.0\.0\.1:(\d+)", found).group(1))

        def device(connect):
            with connect() as ws:
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_00000000002a",
                                    "crew_code": "ALPHA"}))
                recv(ws)

        yield ws_session(port, device)
        found = yield _until_in_file(path, b"register: device leeloo_00000000002a")
        self.assertRegex(found.decode(), r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                                         r"\[leeloo\.core\.handlers#info\] register: device "
                                         r"leeloo_00000000002a from 127\.0\.0\.1, crew ALPHA$")
        relay.transport.signalProcess(signal.SIGUSR1)
        yield _until_in_file(path + ".1", b"register: device leeloo_00000000002a")
        yield relay.stop()


def _until_in_file(path, needle):
    """
    A Deferred firing with the file's bytes once C{needle} is in them
    (checked as the reactor turns, for up to 30 s).
    """
    from twisted.internet import reactor, task

    def check():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        if needle in data:
            done.append(data)
            loop.stop()

    done = []
    loop = task.LoopingCall(check)
    d = loop.start(0.05)
    d.addCallback(lambda _: done[0])
    return d
