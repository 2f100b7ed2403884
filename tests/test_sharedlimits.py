"""
Per-address limits shared by the relay nodes on one Redis
(L{leeloo.sharedlimits}): two relay service trees in this process on real
loopback sockets, a real C{redis-server}, and real C{websockets} clients.
A client spreading its connections over the nodes is refused at the one
cap; the counts of a node that stops heartbeating go; while Redis does not
answer each node lets connections in on its own limits.  Plus the table's
bookkeeping on its own, over a connection that is there or not.
"""

import json
import os
import socket

import txaio
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from leeloo.access import CONNECTING_TOO_FAST, TOO_MANY_FROM_ADDRESS
from leeloo.sharedlimits import SharedLimits
from leeloo.tap import Options, build_service

from .redis_support import SKIP, RedisServer
from .support import TIMEOUT, listening_port

ADDRESS = "127.0.0.1"


class Keyspace:
    """
    Redis's keyspace notifications for one key, read by a blocking socket
    (in the clients' thread): C{wait(event)} returns once Redis reports
    C{event} (C{hincrby}, C{hdel}, C{expired}...) on it.
    """

    def __init__(self, port, key):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
            s.sendall(self._command("CONFIG", "SET", "notify-keyspace-events", "KA"))
            assert s.recv(100).startswith(b"+OK")
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.channel = f"__keyspace@0__:{key}".encode()
        self.socket.sendall(self._command("SUBSCRIBE", self.channel.decode()))
        self.buffer = b""
        self._message()  # the subscription's confirmation

    @staticmethod
    def _command(*words):
        out = b"*%d\r\n" % len(words)
        for word in words:
            data = word.encode() if isinstance(word, str) else word
            out += b"$%d\r\n%s\r\n" % (len(data), data)
        return out

    def _line(self):
        while b"\r\n" not in self.buffer:
            chunk = self.socket.recv(4096)
            if not chunk:
                raise EOFError("Redis closed the subscription")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _message(self):
        count = int(self._line()[1:])
        parts = []
        for _ in range(count):
            head = self._line()
            if head.startswith(b":"):
                parts.append(head[1:])
                continue
            size = int(head[1:])
            while len(self.buffer) < size + 2:
                self.buffer += self.socket.recv(4096)
            parts.append(self.buffer[:size])
            self.buffer = self.buffer[size + 2:]
        return parts

    def wait(self, event):
        while True:
            parts = self._message()
            if parts[0] == b"message" and parts[1] == self.channel and parts[2] == event.encode():
                return

    def close(self):
        self.socket.close()


def refused_status(url, **kwargs):
    """
    The HTTP status a WebSocket handshake to C{url} is refused with, or
    C{None} (and the connection, open) when it is let in.
    """
    try:
        ws = connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT, **kwargs)
    except InvalidStatus as e:
        return e.response.status_code, None
    return None, ws


class TwoNodes(TestCase):
    """
    Two relay nodes (service trees) on one Redis, started with C{ARGS}.
    """

    skip = SKIP
    timeout = 60
    ARGS: list = []

    @defer.inlineCallbacks
    def setUp(self):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.nodes = []
        # Nodes on one Redis share one secrets key (the second one's start
        # is refused otherwise).
        key_file = os.path.abspath(self.mktemp())
        for _ in range(2):
            options = Options(environ={})
            options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.mktemp(),
                                  "--redis", self.redis.url, "--redis-max-retry-delay", "0.2",
                                  "--secrets-key-file", key_file, *self.ARGS])
            service = build_service(options.config, reactor)
            service.startService()
            self.addCleanup(service.stopService)
            port = yield listening_port(service)
            self.nodes.append((service, f"ws://127.0.0.1:{port.getHost().port}/ws"))

    def shared(self, index):
        return self.nodes[index][0].getServiceNamed("shared-limits").shared

    def key(self, index):
        return f"leeloo:limits:conns:{self.shared(index).node}"

    def keyspace(self, index):
        events = Keyspace(self.redis.port, self.key(index))
        self.addCleanup(events.close)
        return events

    def in_thread(self, script):
        """
        Run C{script()} in a thread; close every connection it returns.
        """
        def run():
            opened = []
            try:
                return script(opened)
            finally:
                for ws in opened:
                    ws.close()

        return self.deferToThread(run)

    def deferToThread(self, f):
        from twisted.internet.threads import deferToThread

        return deferToThread(f)


class BudgetTests(TwoNodes):
    """
    The crew-entry budget per address is the cluster's: a client spreading
    its attempts over the nodes gets the one budget (and at most one more
    attempt per node while the spends cross), not one budget a node.
    """

    ARGS = ["--join-attempts", "2", "--join-window", "600"]

    def attempt(self, index):
        """
        One crew entry (a code no crew has: a failed join counts) through
        node C{index}, on a connection of its own; fires with the answer's
        error code.
        """
        url = self.nodes[index][1]

        def script(opened):
            ws = connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
            opened.append(ws)
            ws.send(json.dumps({"type": "join_crew", "crew_code": "LEELOO-NONE",
                                "device_id": "leeloo_aaaaaaaaaaaa"}))
            return json.loads(ws.recv(timeout=TIMEOUT))["error"]

        return self.in_thread(script)

    @defer.inlineCallbacks
    def test_spread_over_two_nodes_one_budget(self):
        answers = []
        for index in (0, 0, 1, 1):
            answers.append((yield self.attempt(index)))
            # What the node spent in Redis is answered before what comes
            # after it on its connection (Redis answers in order).
            yield self.shared(index).connection.call("PING")
        self.assertEqual(answers, ["invalid_crew_code", "invalid_crew_code", "invalid_crew_code", "rate_limited"])
        left = yield self.shared(0).connection.call("HGET", "leeloo:limits:budget:entries:127.0.0.1", "t")
        self.assertLess(float(left), 0)


class SharedBudgetTests(SynchronousTestCase):
    """
    L{SharedBudget}'s bookkeeping, over a connection whose answers the test
    gives.
    """

    def setUp(self):
        from twisted.internet.task import Clock

        from leeloo.limits import Rate
        from leeloo.sharedlimits import SharedBudget

        self.spends = []
        connection = FakeConnection()
        connection.protocol = object()
        shared = SharedLimits(connection, Clock(), node="me")
        shared._script = lambda name, *args: self.spends.append((name, args, defer.Deferred())) or self.spends[-1][2]
        self.budget = SharedBudget(shared, shared.clock, Rate.per_window(2, 600), "entries")
        self.connection = connection

    def test_emptied_as_far_as_the_cluster(self):
        """
        A take this node allows is spent in Redis too; when Redis says the
        cluster's bucket is empty, so is this node's; when it has more,
        this node's keeps what it has.
        """
        self.assertEqual(self.budget.take("1.2.3.4"), 0)
        [(name, args, answer)] = self.spends
        self.assertEqual((name, args[:2]), ("SPEND", ("entries", "1.2.3.4")))
        answer.callback(b"-1")
        self.assertGreater(self.budget.take("1.2.3.4"), 0)
        self.assertEqual(len(self.spends), 1)
        self.assertEqual(self.budget.take("5.6.7.8"), 0)
        self.spends[-1][2].callback(b"1.5")
        self.assertEqual(self.budget.take("5.6.7.8"), 0)

    def test_fail_open(self):
        """
        With no connection to Redis the node keeps to its own bucket.
        """
        self.connection.protocol = None
        waits = [self.budget.take("1.2.3.4") for _ in range(3)]
        self.assertEqual(waits[:2], [0, 0])
        self.assertGreater(waits[2], 0)
        self.assertEqual(self.spends, [])


class SpreadTests(TwoNodes):
    ARGS = ["--max-connections-per-address", "3"]

    @defer.inlineCallbacks
    def test_spread_over_two_nodes_refused_at_the_one_cap(self):
        """
        With a cap of 3 connections per address, a client with two open on
        node A and one on node B is refused a fourth on either node (503),
        and let in on B again once it closes one on A.
        """
        (_, a), (_, b) = self.nodes

        def script(opened):
            statuses = []
            for url in (a, a, b, b, a):
                status, ws = refused_status(url)
                statuses.append(status)
                if ws is not None:
                    opened.append(ws)
            released = self.keyspace(0)
            opened.pop(0).close()
            released.wait("hincrby")
            status, ws = refused_status(b)
            if ws is not None:
                opened.append(ws)
            statuses.append(status)
            return statuses

        statuses = yield self.in_thread(script)
        self.assertEqual(statuses, [None, None, None, 503, 503, None])
        self.assertEqual(self.nodes[1][0].site.gate.refused[TOO_MANY_FROM_ADDRESS], 1)

    @defer.inlineCallbacks
    def test_dead_nodes_counts_go(self):
        """
        The connections a node holds stop counting once it stops
        heartbeating (as a node killed with SIGKILL does): its counts
        expire, and the other node lets the address in again.
        """
        (_, a), (service_b, b) = self.nodes
        self.shared(1).heartbeat = 0.5
        expired = self.keyspace(1)
        heartbeat = service_b.getServiceNamed("shared-limits")

        def before(opened):
            statuses = []
            for url in (b, b, a, a):
                status, ws = refused_status(url)
                statuses.append(status)
                if ws is not None:
                    opened.append(ws)
            return statuses, opened[:]

        # B's heartbeat at 0.5 s (counts kept 1.5 s) takes hold from its next beat on.
        yield heartbeat.stopService()
        heartbeat.startService()
        statuses, held = yield self.deferToThread(lambda: before([]))
        self.addCleanup(self.deferToThread, lambda: [ws.close() for ws in held])
        self.assertEqual(statuses, [None, None, None, 503])
        yield heartbeat.stopService()

        def after(opened):
            expired.wait("expired")
            statuses = []
            for url in (a, a, a):
                status, ws = refused_status(url)
                statuses.append(status)
                if ws is not None:
                    opened.append(ws)
            return statuses

        statuses = yield self.in_thread(after)
        # A holds one of its own: two more, and the third is over the cap.
        self.assertEqual(statuses, [None, None, 503])


class RateTests(TwoNodes):
    ARGS = ["--connect-rate", "1"]

    @defer.inlineCallbacks
    def test_connect_rate_shared(self):
        """
        New connections from one address are counted against one rate on
        all nodes: with a burst of 2, two on A leave none for B (429).
        """
        (_, a), (_, b) = self.nodes

        def script(opened):
            statuses = []
            for url in (a, a, b):
                status, ws = refused_status(url)
                statuses.append(status)
                if ws is not None:
                    opened.append(ws)
            return statuses

        statuses = yield self.in_thread(script)
        self.assertEqual(statuses, [None, None, 429])
        self.assertEqual(self.nodes[1][0].site.gate.refused[CONNECTING_TOO_FAST], 1)


class ProxiedTests(TwoNodes):
    ARGS = ["--max-connections-per-address", "2", "--trusted-proxy", "127.0.0.1"]

    @defer.inlineCallbacks
    def test_forwarded_client_spread_over_nodes(self):
        """
        Behind a trusted proxy (a load balancer), the client named by
        X-Forwarded-For is counted on all nodes: one connection on each
        node reaches its cap of 2, and a third on either is refused, while
        another client through the same proxy is let in.
        """
        (_, a), (_, b) = self.nodes

        def script(opened):
            statuses = []
            for url, client in ((a, "203.0.113.7"), (b, "203.0.113.7"), (a, "203.0.113.7"),
                                (b, "203.0.113.7"), (b, "203.0.113.8")):
                status, ws = refused_status(url, additional_headers={"X-Forwarded-For": client})
                statuses.append(status)
                if ws is not None:
                    opened.append(ws)
            return statuses

        statuses = yield self.in_thread(script)
        self.assertEqual(statuses, [None, None, 503, 503, None])
        refused = [service.getServiceNamed("relay").ws_factory.refused[TOO_MANY_FROM_ADDRESS]
                   for service, _ in self.nodes]
        self.assertEqual(refused, [1, 1])


class RedisDownTests(TwoNodes):
    ARGS = ["--max-connections-per-address", "2"]

    @defer.inlineCallbacks
    def test_fail_open_to_each_nodes_limits(self):
        """
        While Redis is stopped each node applies its own cap (2 here) and
        no more: the address gets 2 on each; once Redis is back the nodes
        write their tables again and the cluster's cap holds (the 4 open
        are over it, so a fifth is refused).
        """
        (_, a), (_, b) = self.nodes
        yield self.redis.stop()

        def down(opened):
            statuses = []
            for url in (a, a, a, b, b):
                status, ws = refused_status(url)
                statuses.append(status)
                if ws is not None:
                    opened.append(ws)
            return statuses, opened[:]

        statuses, held = yield self.deferToThread(lambda: down([]))
        self.addCleanup(self.deferToThread, lambda: [ws.close() for ws in held])
        self.assertEqual(statuses, [None, None, 503, None, None])
        resynced = [defer.Deferred(), defer.Deferred()]
        for index, d in enumerate(resynced):
            shared = self.shared(index)
            original = shared.resync

            def resync(protocol=None, shared=shared, original=original, d=d):
                result = original(protocol)
                result.addBoth(lambda r: (d.called or d.callback(None), r)[1])
                return result

            shared.resync = resync
        yield self.redis.start()
        yield defer.gatherResults(resynced)

        def up(opened):
            status, ws = refused_status(a)
            if ws is not None:
                opened.append(ws)
            return status

        status = yield self.in_thread(up)
        self.assertEqual(status, 503)


class FakeConnection:
    """
    A L{leeloo.redisstore.RedisConnection} stand-in: no protocol (Redis
    down) until C{protocol} is set; calls recorded and answered with
    C{answers} in turn.
    """

    class settings:
        prefix = "leeloo:"

    starting = False

    def __init__(self):
        self.protocol = None
        self.calls = []
        self.answers = []

    def call(self, *args, protocol=None):
        self.calls.append(args)
        d = defer.Deferred()
        self.answers.append(d)
        return d


class TableTests(SynchronousTestCase):
    """
    L{SharedLimits}'s own table and what it sends, over a fake connection.
    """

    def setUp(self):
        self.connection = FakeConnection()
        self.shared = SharedLimits(self.connection, None, node="n1")

    def script_names(self):
        from leeloo import sharedlimits

        digests = {digest: name for name, (digest, _) in sharedlimits._SCRIPTS.items()}
        return [digests[call[1]] for call in self.connection.calls]

    def test_fail_open_without_redis(self):
        """
        With no connection to Redis a connection is let in at once, held
        in the node's table, and the table is marked to be written again.
        """
        ticket, verdict = self.shared.admit("198.51.100.1", 1)
        self.assertIsNone(verdict)
        self.assertEqual((self.shared.alive, self.shared.dirty), ({"198.51.100.1": 1}, True))
        self.assertEqual(self.connection.calls, [])

    def test_resync_writes_fail_open_connections_then_release_uncounts(self):
        """
        A resync writes the connections let in while Redis was down; their
        release afterwards is sent to Redis, whereas one let in and closed
        before the resync sends nothing.
        """
        kept, _ = self.shared.admit("198.51.100.1", 5)
        gone, _ = self.shared.admit("198.51.100.1", 5)
        gone.release()
        self.connection.protocol = object()
        self.shared.resync()
        self.assertEqual(self.connection.calls[-1][4:], ("n1", 15000, "198.51.100.1", 1))
        kept.release()
        self.assertEqual(self.script_names(), ["RESYNC", "RELEASE"])
        self.assertEqual(self.shared.alive, {})

    def test_refused_by_cluster(self):
        """
        Redis's "count" answer is the per-address refusal, and the refused
        connection is not held nor released.
        """
        self.connection.protocol = object()
        ticket, verdict = self.shared.admit("198.51.100.1", 3)
        verdicts = []
        verdict.addCallback(verdicts.append)
        self.connection.answers[0].callback([b"count", b"3"])
        self.assertEqual(verdicts, [(TOO_MANY_FROM_ADDRESS, 1.0)])
        ticket.release()
        self.assertEqual((self.shared.alive, self.script_names()), ({}, ["ADMIT"]))

    def test_closed_while_asking(self):
        """
        A connection that closes while Redis is asked is released in Redis
        once it answers that it was let in.
        """
        self.connection.protocol = object()
        ticket, verdict = self.shared.admit("198.51.100.1", 3)
        ticket.release()
        self.connection.answers[0].callback([b"ok"])
        self.assertEqual((self.shared.alive, self.script_names()), ({}, ["ADMIT", "RELEASE"]))

    def test_heartbeat_resyncs_only_with_nothing_in_flight(self):
        """
        After a failed command the heartbeat writes the table again, but
        not while an admission is in flight (its count would be lost).
        """
        self.connection.protocol = object()
        self.shared.dirty = True
        self.shared.admit("198.51.100.1", 3)
        self.shared.beat()
        self.connection.answers[0].callback([b"ok"])
        self.shared.beat()
        self.assertEqual(self.script_names(), ["ADMIT", "HEARTBEAT", "RESYNC"])
