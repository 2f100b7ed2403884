"""
Tests for L{leeloo.logs}: ``twistd --logger leeloo.logs.json`` writes one
JSON object per line per event, with the event's fields.
"""

import io
import json

from twisted.internet import defer
from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo import logs

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
