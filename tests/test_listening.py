"""
Every endpoint listens before the relay says it is ready; one that cannot
ends the relay with one line naming it, the reason and what to do.
"""

import errno
import os
import shutil
import socket
import tempfile

import txaio
from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo import __version__
from leeloo.listening import Listener, ListenError, Readiness
from leeloo.process import exit_process, sd_notify
from leeloo.tap import Options, build_service

from .support import RelayProcess


def short_socket_path(testcase):
    """
    A path for a unix socket, short enough for sun_path (trial's mktemp()
    can be longer than its 108 bytes), removed after the test.
    """
    directory = tempfile.mkdtemp(prefix="leeloo-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "notify")


class FakePort:
    def __init__(self, port):
        self.port = port
        self.stopped = False

    def getHost(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self):
        self.stopped = True


class FakeEndpoint:
    """
    An endpoint whose listen() fires with C{result} (a port, or an
    exception to fail with), now or when C{fire()} is called.
    """

    def __init__(self, result, later=False):
        self.result = result
        self.later = later
        self.waiting = None

    def listen(self, factory):
        d = defer.Deferred()
        if self.later:
            self.waiting = d
        else:
            self._fire(d)
        return d

    def fire(self):
        self._fire(self.waiting)

    def _fire(self, d):
        if isinstance(self.result, BaseException):
            d.errback(self.result)
        else:
            d.callback(self.result)


def in_use(port=8080):
    return CannotListenError("127.0.0.1", port, OSError(errno.EADDRINUSE, "Address already in use"))


class ReadinessTests(SynchronousTestCase):
    def start(self, *endpoints):
        top = MultiService()
        listeners = [Listener(e, Factory(), "--listen", f"tcp:{8080 + n}") for n, e in enumerate(endpoints)]
        for listener in listeners:
            listener.setServiceParent(top)
        self.notified, self.exits, self.later = [], [], []
        readiness = Readiness(listeners, self.notified.append, self.exits.append, when_running=lambda *call: self.later.append(call))
        readiness.setServiceParent(top)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        top.privilegedStartService()
        top.startService()
        self.run_reactor()
        self.top = top
        return readiness, events

    def run_reactor(self):
        later, self.later[:] = list(self.later), []
        for call, *args in later:
            call(*args)

    def test_ready_once_every_endpoint_listens(self):
        """
        The ready line names every endpoint and the address it listens on,
        with the version, and systemd is told READY=1, once the reactor runs
        (and handles SIGTERM).
        """
        top = MultiService()
        listener = Listener(FakeEndpoint(FakePort(8080)), Factory(), "--listen", "tcp:8080")
        listener.setServiceParent(top)
        later = []
        Readiness([listener], self.fail, self.fail, when_running=lambda *call: later.append(call)
                  ).setServiceParent(top)
        top.startService()
        self.assertEqual(len(later), 1)
        readiness, events = self.start(FakeEndpoint(FakePort(8080)), FakeEndpoint(FakePort(8081)))
        [line] = [formatEvent(e) for e in events if "ready" in formatEvent(e)]
        self.assertEqual(line, f"LEELOO relay {__version__} ready: --listen tcp:8080 on 127.0.0.1:8080; "
                               "--listen tcp:8081 on 127.0.0.1:8081")
        self.assertTrue(readiness.ready)
        self.assertEqual(self.notified[0].split("\n")[0], "READY=1")
        self.assertEqual(self.exits, [])

    def test_not_ready_while_one_endpoint_waits(self):
        """
        Nothing is said until the last endpoint listens.
        """
        slow = FakeEndpoint(FakePort(8081), later=True)
        readiness, events = self.start(FakeEndpoint(FakePort(8080)), slow)
        self.assertEqual((readiness.ready, self.notified), (False, []))
        slow.fire()
        self.run_reactor()
        self.assertTrue(readiness.ready)
        self.assertEqual(self.notified[0].split("\n")[0], "READY=1")

    def test_failure_is_one_line_and_an_exit(self):
        """
        An endpoint that cannot listen is one critical line naming it and
        the reason, then exit(1); the relay never says it is ready.
        """
        readiness, events = self.start(FakeEndpoint(FakePort(8080)), FakeEndpoint(in_use(8081)))
        self.assertEqual(self.exits, [1])
        self.assertFalse(readiness.ready)
        self.assertFalse(any(n.startswith("READY=1") for n in self.notified))
        [critical] = [e for e in events if e["log_level"] == LogLevel.critical]
        line = formatEvent(critical)
        self.assertTrue(line.startswith("leeloo: cannot listen on --listen tcp:8081: address already in use"), line)
        self.assertNotIn("\n", line)
        self.assertEqual([e for e in events if e.get("log_failure")], [])

    def test_later_failure_exits_too(self):
        """
        An endpoint that fails after start-up (an asynchronous one) ends the
        relay the same way.
        """
        slow = FakeEndpoint(in_use(), later=True)
        self.start(slow)
        self.assertEqual(self.exits, [])
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        slow.fire()
        self.assertEqual(self.exits, [1])
        self.assertIn("cannot listen on --listen tcp:8080", formatEvent(events[0]))

    def test_stop_says_stopping(self):
        """
        A relay that was ready tells systemd it is stopping, and stops
        listening.
        """
        port = FakePort(8080)
        self.start(FakeEndpoint(port))
        self.top.stopService()
        self.assertEqual(self.notified[-1], "STOPPING=1")
        self.assertTrue(port.stopped)


class ExplainTests(SynchronousTestCase):
    def test_reasons_say_what_to_do(self):
        """
        In use names the port and what to stop; permission names the
        capability and socket activation; any other reason is said as is.
        """
        cases = {
            errno.EADDRINUSE: ["address already in use", "8080", "nginx", "stop it"],
            errno.EACCES: ["permission denied", "CAP_NET_BIND_SERVICE", "systemd:domain=INET:index=0"],
            errno.EADDRNOTAVAIL: ["127.0.0.1", "interface="],
        }
        for code, words in cases.items():
            error = CannotListenError("127.0.0.1", 8080, OSError(code, os.strerror(code)))
            line = ListenError("--listen", "tcp:8080", error).line()
            for word in words:
                self.assertIn(word, line)
        self.assertEqual(ListenError("--admin-listen", "unix:/x", ValueError("no")).line(),
                         "leeloo: cannot listen on --admin-listen unix:/x: no")


class ExitTests(SynchronousTestCase):
    def test_exit_before_the_reactor_runs(self):
        """
        Before the reactor runs (twistd starts the services first), the
        exit is a SystemExit with the status.
        """
        e = self.assertRaises(SystemExit, exit_process(MemoryReactorClock()), 1)
        self.assertEqual(e.code, 1)

    def test_exit_once_running_stops_first(self):
        """
        Once the reactor runs, it is stopped (the services stop and the
        store is flushed) and the status is the process's after shutdown.
        """
        clock = MemoryReactorClock()
        clock.running = True
        exited = []
        exit_process(clock, exited.append)(1)
        self.assertTrue(clock.hasStopped)
        self.assertEqual(exited, [])
        [(trigger, args, kwargs)] = clock.triggers["after"]["shutdown"]
        trigger(*args, **kwargs)
        self.assertEqual(exited, [1])


class NotifyTests(TestCase):
    def test_no_socket(self):
        """
        Without NOTIFY_SOCKET (not run by systemd) nothing is sent.
        """
        self.assertFalse(sd_notify("READY=1", {}))

    def test_sends_to_the_socket(self):
        """
        The state goes as one datagram to NOTIFY_SOCKET.
        """
        path = short_socket_path(self)
        received = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            self.assertTrue(sd_notify("READY=1", {"NOTIFY_SOCKET": path}))
            received.append(server.recv(100))
        os.unlink(path)
        self.assertEqual(received, [b"READY=1"])


class Datagrams(DatagramProtocol):
    def __init__(self):
        self.received = []
        self.waiting = []

    def datagramReceived(self, data, address):
        self.received.append(data)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(data)

    def next(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


class TwistdListeningTests(TestCase):
    """
    ``twistd leeloo`` as a real process, with real sockets.
    """

    timeout = 60

    def taken_port(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        return sock.getsockname()[1]

    @defer.inlineCallbacks
    def test_port_in_use_exits_with_one_line(self):
        """
        A relay whose port is taken exits non-zero with one line naming the
        endpoint as written and the reason, no traceback, and is never
        ready.
        """
        port = self.taken_port()
        relay = RelayProcess(self, "--listen", f"tcp:{port}:interface=127.0.0.1")
        relay.proto.port.addErrback(lambda f: None)
        ended = yield relay.proto.ended
        output = relay.proto.output.decode()
        self.assertNotIn(ended.exitCode, (0, None))
        [line] = [l for l in output.splitlines() if "cannot listen" in l]
        self.assertIn(f"cannot listen on --listen tcp:{port}:interface=127.0.0.1: address already in use", line)
        self.assertNotIn("backlog", line)
        self.assertNotIn("Traceback", output)
        self.assertNotIn(" ready: ", output)

    @defer.inlineCallbacks
    def test_ready_told_to_systemd_after_listening(self):
        """
        Under systemd (NOTIFY_SOCKET set) the relay sends READY=1 once it
        listens, and STOPPING=1 on SIGTERM.
        """
        path = short_socket_path(self)
        datagrams = Datagrams()
        listening = reactor.listenUNIXDatagram(path, datagrams)
        self.addCleanup(listening.stopListening)
        ready = datagrams.next()
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", environ={"NOTIFY_SOCKET": path})
        [port] = yield relay.proto.ready()
        message = yield ready
        self.assertTrue(message.startswith(b"READY=1\nSTATUS=ready: --listen tcp:0:interface=127.0.0.1 on "))
        self.assertIn(str(port).encode(), message)
        stopping = datagrams.next()
        yield relay.stop()
        self.assertEqual((yield stopping), b"STOPPING=1")


class InProcessTests(TestCase):
    """
    The service tree on the real reactor: the redirect and admin endpoints
    count too.
    """

    def build(self, *argv):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        options = Options(environ={})
        options.parseOptions(["--data-dir", self.mktemp(), "--store", "memory", *argv])
        exits = []
        service = build_service(options.config, reactor, exit=exits.append, notify=lambda state: None)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        return exits, lines

    def taken_port(self):
        return TwistdListeningTests.taken_port(self)

    def test_redirect_and_admin_endpoints_checked(self):
        """
        A taken --redirect-listen or --admin-listen port stops the relay
        like a --listen one, named by its own option.
        """
        for option in ("--redirect-listen", "--admin-listen"):
            port = self.taken_port()
            exits, lines = self.build("--listen", "tcp:0:interface=127.0.0.1",
                                      option, f"tcp:{port}:interface=127.0.0.1")
            self.assertEqual(exits, [1])
            [line] = lines
            self.assertIn(f"cannot listen on {option} tcp:{port}:interface=127.0.0.1: address already in use",
                          line)

    def test_all_listening_is_ready(self):
        """
        With every port free, nothing stops the relay.
        """
        exits, lines = self.build("--listen", "tcp:0:interface=127.0.0.1",
                                  "--admin-listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual((exits, lines), ([], []))
