"""
A real C{redis-server} (Debian's package) for the tests: its own process on
a free loopback port, with AOF on (C{appendonly yes}, C{appendfsync
always}) in a temporary directory; stopped (and waited for) when the test
ends.  Tests that need one skip, saying why, only when the binary is
missing (C{scripts/test.sh} installs it).
"""

import os
import re
import shutil
import socket

from twisted.internet import defer, protocol, reactor

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)
SKIP = None if REDIS_SERVER else "redis-server is not installed (apt-get install redis-server; scripts/test.sh does)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RedisProtocol(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        if not self.ready.called and re.search(rb"Ready to accept connections", self.output):
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(reason.value)


class RedisServer:
    """
    C{redis-server} in C{testcase}'s temporary directory.  C{start()} fires
    once it accepts connections; C{stop(signal)} once it has exited; it can
    be started again on the same port and directory (its AOF read back).

    @param password: C{requirepass}; @param tls: (certificate file, key
        file) to serve TLS only, on C{port}.
    """

    def __init__(self, testcase, password=None, tls=None, appendfsync="always"):
        self.testcase = testcase
        self.directory = os.path.abspath(testcase.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        lines = [
            "bind 127.0.0.1", f"dir {self.directory}", "appendonly yes", f"appendfsync {appendfsync}",
            'save ""', "daemonize no", "loglevel notice", "logfile \"\"",
        ]
        if tls is None:
            lines.append(f"port {self.port}")
        else:
            cert, key, ca = tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        if password is not None:
            lines.append(f"requirepass {password}")
        self.config = os.path.join(self.directory, "redis.conf")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.config, 0o600)
        self.proto = None
        self.transport = None
        testcase.addCleanup(self._reap)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proto = _RedisProtocol()
        self.transport = reactor.spawnProcess(self.proto, REDIS_SERVER, [REDIS_SERVER, self.config],
                                              env={"PATH": os.environ.get("PATH", "")}, path=self.directory)
        return self.proto.ready

    def stop(self, signal="TERM"):
        if self.proto is None or self.proto.ended.called:
            return defer.succeed(None)
        self.transport.signalProcess(signal)
        return self.proto.ended

    def _reap(self):
        if self.proto is None or self.proto.ended.called:
            return None
        self.transport.signalProcess("KILL")
        return self.proto.ended
