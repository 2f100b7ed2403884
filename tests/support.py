"""
Helpers for the tests that run the relay for real: a blocking websockets
client in a thread, ``twistd leeloo`` as a child process, and reading and
awaiting what the relay logs in this process.
"""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from websockets.sync.client import connect

TIMEOUT = 10
# The checkout under test: twistd children import its leeloo (and find its
# plugin), not whatever leeloo happens to be installed.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ws_session(port, script):
    """
    Run C{script(connect_fn)} in a thread; it drives blocking websockets
    clients against the relay on C{port}.
    """
    url = f"ws://127.0.0.1:{port}/ws"

    def opener():
        return connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT)

    return deferToThread(script, opener)


def log_texts(events, level=None):
    """
    The text of each of C{events} (an L{EventLoggingObserver}, say), or of
    those logged at C{level} (a L{LogLevel}) alone.
    """
    return [formatEvent(e) for e in events if level is None or e.get("log_level") == level]


def next_logged(testcase, contains):
    """
    A Deferred firing with the next event logged to the global log
    publisher whose text contains C{contains}; it stops listening when it
    fires, or at the end of C{testcase}.
    """
    seen = defer.Deferred()

    def observe(event):
        if contains in formatEvent(event) and not seen.called:
            globalLogPublisher.removeObserver(observe)
            seen.callback(event)

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return seen


def listening_port(service):
    """
    A Deferred firing with the port the service tree's listener bound,
    leaving the listener's own Deferred (which stopService needs) intact.
    """
    [listener] = [s for s in service.listeners if s.option == "--listen"]
    bound = defer.Deferred()

    def got(port):
        bound.callback(port)
        return port

    listener._waitingForPort.addCallback(got)
    return bound


def recv(ws):
    return json.loads(ws.recv(timeout=TIMEOUT))


class TwistdProtocol(protocol.ProcessProtocol):
    """
    Collects a twistd process's output; fires C{port} when the Site logs the
    port it listens on, and C{ended} with the exit status.
    """

    def __init__(self):
        self.output = b""
        self.port = defer.Deferred()
        self.ended = defer.Deferred()
        self._ready = None
        self._waiting = []

    def ready(self):
        """
        A Deferred firing with the ports of the relay's ready line, in its
        order (or failing with the output if the relay exits first).
        """
        if self._ready is not None:
            return defer.succeed(self._ready)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def outReceived(self, data):
        self.output += data
        match = re.search(rb"Site starting on (\d+)", self.output)
        if match and not self.port.called:
            self.port.callback(int(match.group(1)))
        match = re.search(rb"LEELOO relay \S+ ready: (.*)\n", self.output)
        if match and self._ready is None:
            self._ready = [int(p) for p in re.findall(rb" on \S+:(\d+)(?:;|$)", match.group(1))]
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(self._ready)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.port.called:
            self.port.errback(RuntimeError(self.output.decode(errors="replace")))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)



class RelayProcess:
    """
    ``twistd -n [TWISTD_ARGS] leeloo ARGS`` in a temporary working
    directory, stopped (and waited for) when the test ends.
    """

    def __init__(self, testcase, *args, cwd=None, environ=None, twistd_args=(), proto=None, prelude="",
                 child_fds=None):
        """
        C{prelude} is Python run in the child before twistd (a process
        restriction, say); C{child_fds} extra descriptors to pass, by
        number in the child.
        """
        self.proto = TwistdProtocol() if proto is None else proto
        if cwd is None:
            cwd = testcase.mktemp()
            os.makedirs(cwd)
        argv = [
            sys.executable, "-c", prelude + "\nfrom twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", *twistd_args, "leeloo", *args,
        ]
        env = dict(os.environ, **(environ or {}))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)
        fds = {0: "w", 1: "r", 2: "r", **(child_fds or {})}
        self.transport = reactor.spawnProcess(self.proto, sys.executable, argv, env=env, path=cwd, childFDs=fds)
        testcase.addCleanup(self._reap)

    def stop(self, signal="TERM"):
        """
        Send C{signal}; fire with the process's end (a ProcessTerminated or
        ProcessDone) once it has exited.
        """
        self.transport.signalProcess(signal)
        return self.proto.ended

    def _reap(self):
        if self.proto.ended.called:
            return None
        self.transport.signalProcess("KILL")
        return self.proto.ended


class ClosingClient(WebSocketClientProtocol):
    """
    An Autobahn device that registers when it opens; C{registered} fires
    with the reply and C{closed} with the close code the relay sent (None
    when its connection went without a close frame).
    """

    def __init__(self):
        super().__init__()
        self.registered = defer.Deferred()
        self.closed = defer.Deferred()

    def onOpen(self):
        self.sendMessage(json.dumps({"type": "register", **self.factory.register(self)}).encode())

    def onMessage(self, payload, isBinary):
        if not self.registered.called:
            self.registered.callback(json.loads(payload))

    def onClose(self, wasClean, code, reason):
        if not self.registered.called:
            self.registered.errback(RuntimeError(f"closed before registering: {code} {reason}"))
        if not self.closed.called:
            self.closed.callback(self.remoteCloseCode)


def closing_clients(count, connect, url, crew_size=5):
    """
    Connect C{count} L{ClosingClient}s with C{connect(factory)} (an
    endpoint's connect); fire with them once every one has registered, in
    crews of C{crew_size}.
    """
    factory = WebSocketClientFactory(url)
    factory.protocol = ClosingClient
    # No handshake timers left on the reactor: the test's timeout bounds it.
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    numbers = iter(range(count))

    def register(client):
        n = next(numbers)
        return {"device_id": f"leeloo_{n:012x}", "crew_code": f"CREW{n // crew_size}"}

    factory.register = register
    clients = []

    def connected(client):
        clients.append(client)
        return client.registered

    d = defer.gatherResults([connect(factory).addCallback(connected) for _ in range(count)],
                            consumeErrors=True)
    return d.addCallback(lambda _: clients)

class DeviceProcess:
    """
    A deployed device (L{tests.deployed_device}) as a child process, read
    from a thread: its calls block, so use it from a L{ws_session} script.
    Killed when the test ends.
    """

    def __init__(self, testcase, port, device_id, crew_code, name):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.deployed_device", f"ws://127.0.0.1:{port}/ws",
             device_id, crew_code, name],
            stdout=subprocess.PIPE, cwd=CHECKOUT, env=env)
        self.frames = queue.Queue()
        self.received = []
        threading.Thread(target=self._read, daemon=True).start()
        testcase.addCleanup(self.kill)

    def _read(self):
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.frames.put(json.loads(line))
        self.frames.put(None)

    def recv(self):
        frame = self.frames.get(timeout=TIMEOUT)
        if frame is None:
            raise EOFError("the device's process ended")
        self.received.append(frame)
        return frame

    def until(self, predicate):
        """
        Receive until C{predicate(frame)}; return everything received.
        """
        frames = []
        while True:
            frames.append(self.recv())
            if predicate(frames[-1]):
                return frames

    def freeze(self):
        """
        Stop the process (SIGSTOP) and wait until it is stopped: its kernel
        socket still takes what the relay sends, but nothing reads it and
        nothing answers a ping.
        """
        os.kill(self.proc.pid, signal.SIGSTOP)
        os.waitpid(self.proc.pid, os.WUNTRACED)

    def kill(self):
        """
        SIGKILL (a stopped process too): what it had not read is lost.
        """
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
