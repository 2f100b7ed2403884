"""
Several relay nodes for real: one C{redis-server} with AOF on
(L{tests.redis_support}) and C{twistd leeloo --redis} processes sharing it,
each with its own data directory and one secrets key, a short
C{--node-heartbeat} and C{--presence-grace 0}; devices are blocking
C{websockets} clients (in a thread, L{tests.support.ws_session}) and the
bot API is asked over loopback HTTP.
"""

import json
import os
import re
import time
import urllib.request

from twisted.internet import defer

from .redis_support import RedisServer
from .support import TIMEOUT, RelayProcess, TwistdProtocol

BOT_SECRET = "cluster-bot-secret"
HEARTBEAT = "0.2"


class NodeProtocol(TwistdProtocol):
    """
    A twistd node's output; L{logged} fires once a line matching a pattern
    appears (also one that appeared already).
    """

    def __init__(self):
        super().__init__()
        self._patterns = []

    def logged(self, pattern):
        d = defer.Deferred()
        self._patterns.append((re.compile(pattern.encode()), d))
        self._check()
        return d

    def outReceived(self, data):
        super().outReceived(data)
        self._check()

    errReceived = outReceived

    def _check(self):
        for entry in list(self._patterns):
            regex, d = entry
            if regex.search(self.output):
                self._patterns.remove(entry)
                d.callback(None)


class Node:
    """
    One relay node: C{port} once L{start}ed.
    """

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name
        self.data_dir = os.path.abspath(cluster.testcase.mktemp())
        self.process = None
        self.port = None

    @defer.inlineCallbacks
    def start(self):
        proto = NodeProtocol()
        self.process = RelayProcess(
            self.cluster.testcase, "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.data_dir,
            "--redis", self.cluster.redis.url, "--secrets-key-file", self.cluster.key_file,
            "--node-heartbeat", HEARTBEAT, "--presence-grace", "0", "--connect-rate", "1000",
            "--redis-max-retry-delay", "0.2", "--admin-listen", "tcp:0:interface=127.0.0.1", *self.cluster.extra,
            environ={"TELEGRAM_API_SECRET": BOT_SECRET, **self.cluster.environ}, proto=proto)
        self.port = yield proto.port
        yield proto.logged(r"joined the cluster")
        yield proto.ready()
        return self

    @property
    def output(self):
        return self.process.proto.output

    def logged(self, pattern):
        return self.process.proto.logged(pattern)

    def stop(self, signal="TERM"):
        return self.process.stop(signal)

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}/ws"

    def bot(self, path, body=None):
        """
        The bot API's answer to C{path} (POST C{body} if given), blocking
        (for a device thread).
        """
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                         headers={"X-Api-Secret": BOT_SECRET, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())

    def admin(self, command, body):
        """
        The admin API's answer to C{command} (its C{--admin-listen} and
        token from the data directory), blocking.
        """
        with open(os.path.join(self.data_dir, "admin.json")) as f:
            url = json.load(f)["admin"][0]["url"]
        with open(os.path.join(self.data_dir, "admin.token")) as f:
            token = f.read().strip()
        request = urllib.request.Request(f"{url}/admin/{command}", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())

    def status(self, code):
        return self.bot(f"/api/telegram/crew/status?crew_code={code}")

    def until_online(self, code, count):
        """
        Block until this node's bot API counts C{count} devices of crew
        C{code} online (the other nodes' changes have reached it); return
        the status.
        """
        return self.until_status(code, lambda status: status["devices_online"] == count)

    def until_status(self, code, predicate):
        """
        Block until C{predicate} holds of this node's bot API status of
        crew C{code}; return it.  Asks the node again at once (no sleep),
        for at most L{TIMEOUT} seconds.
        """
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = self.status(code)
            if predicate(status) or time.monotonic() > deadline:
                return status


class Cluster:
    """
    A Redis and C{count} nodes on it, for C{testcase}.
    """

    def __init__(self, testcase, count, extra=(), appendfsync="always", environ=None):
        self.testcase = testcase
        self.environ = dict(environ or {})
        self.count = count
        self.extra = tuple(extra)
        self.redis = RedisServer(testcase, appendfsync=appendfsync)
        self.key_file = os.path.abspath(testcase.mktemp()) + "-secrets.key"
        self.nodes = [Node(self, f"node{i}") for i in range(count)]

    @defer.inlineCallbacks
    def start(self):
        yield self.redis.start()
        # The first makes the secrets key; the others read it.
        yield self.nodes[0].start()
        yield defer.gatherResults([node.start() for node in self.nodes[1:]])
        return self

    def node(self, name):
        node = Node(self, name)
        self.nodes.append(node)
        return node
