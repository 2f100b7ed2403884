"""
L{leeloo.fanout.redis.RedisFanout}'s scripts on a real C{redis-server}:
dead nodes are reaped once, by one node, and generated crew codes are
reserved for one node only.
"""

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from leeloo.fanout.redis import RedisFanout
from leeloo.redisurl import parse_redis_url

from ..redis_support import SKIP, RedisServer
from . import fakes


class ScriptTests(TestCase):
    skip = SKIP
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.settings = parse_redis_url(self.redis.url)

    def fanout(self, node):
        fanout = RedisFanout(self.settings, reactor, heartbeat=0.1, node=node)
        fanout.commands.start()
        self.addCleanup(fanout.commands.stop)
        return fanout

    @defer.inlineCallbacks
    def test_dead_node_reaped_once(self):
        """
        Two nodes beating at once after a third's heartbeat expired: one
        of them reaps it (its part is gone from Redis), the other sees
        nothing to reap.
        """
        a, b = self.fanout("a"), self.fanout("b")
        yield a.commands.call("ZADD", "leeloo:nodes", "1", "dead")
        yield a.commands.call("HSET", "leeloo:node:dead:online", "DUO\0d1", "Ann")
        yield a.commands.call("SADD", "leeloo:node:dead:devices", "d1")
        yield a.commands.call("HSET", "leeloo:where", "d1", "dead")
        yield defer.gatherResults([a.beat(), b.beat()])
        self.assertEqual(sorted([a.reaped, b.reaped]), [0, 1])
        left = yield a.commands.call("ZRANGE", "leeloo:nodes", "0", "-1")
        self.assertEqual(sorted(left), [b"a", b"b"])
        for key in ("leeloo:node:dead:online", "leeloo:node:dead:devices", "leeloo:where"):
            exists = yield a.commands.call("EXISTS", key)
            self.assertEqual(exists, b"0" if isinstance(exists, bytes) else 0, key)

    @defer.inlineCallbacks
    def test_live_node_not_reaped(self):
        """
        A node that beat within its three heartbeats is not reaped.
        """
        a, b = self.fanout("a"), self.fanout("b")
        yield a.beat()
        yield b.beat()
        self.assertEqual((a.reaped, b.reaped), (0, 0))

    @defer.inlineCallbacks
    def test_code_reserved_once(self):
        """
        A generated code is reserved for the first node that asks; the
        second, and any node once a crew has the code, is refused.
        """
        a, b = self.fanout("a"), self.fanout("b")
        first, second = yield defer.gatherResults([a.reserve("LEELOO-ABCD"), b.reserve("LEELOO-ABCD")])
        self.assertEqual(sorted([first, second]), [False, True])
        yield a.commands.call("HSET", "leeloo:crews", "LEELOO-WXYZ", "{}")
        taken = yield b.reserve("LEELOO-WXYZ")
        self.assertFalse(taken)


class ReconnectTests(TestCase):
    skip = SKIP
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.fanout = RedisFanout(parse_redis_url(self.redis.url), reactor, heartbeat=5, node="n")
        self.fanout.commands.start()
        self.addCleanup(self.fanout.commands.stop)
        self.fanout.relay = fakes.Relay()

    @defer.inlineCallbacks
    def test_resubscribed_fills_gaps(self):
        """
        Subscribed again (the state read a second time), the node sends
        its listeners what their crews' logs hold past what they were
        sent: a listener sent 3 of a crew at 5 is caught up, one sent 5 is
        not, and the crew's last sequence here becomes 5.
        """
        yield self.fanout.commands.call("HSET", "leeloo:seq", "DUO", "5")
        crew = fakes.Crew("DUO", 3)
        behind, current = fakes.Membership(crew, 3), fakes.Membership(crew, 5)
        self.fanout._crews["DUO"] = {"d1": behind, "d2": current}
        yield self.fanout._loaded([])
        self.assertEqual(self.fanout.relay.replayer.caught_up, [])
        yield self.fanout._loaded([])
        self.assertEqual((self.fanout.relay.replayer.caught_up, crew.fanned_seq), ([behind], 5))

    @defer.inlineCallbacks
    def test_heartbeat_lasts_three_beats(self):
        """
        A beat keeps the node alive for three heartbeats by Redis's clock
        (15 s at the default 5 s: a dead node is reaped within 20 s).
        """
        yield self.fanout.beat()
        score = yield self.fanout.commands.call("ZSCORE", "leeloo:nodes", "n")
        seconds, micros = yield self.fanout.commands.call("TIME")
        now = int(seconds) * 1000 + int(micros) // 1000
        self.assertTrue(14_000 <= float(score) - now <= 15_000, float(score) - now)
