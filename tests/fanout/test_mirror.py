"""
L{leeloo.fanout.mirror.ClusterMirror}: what a node knows of the others.
"""

from twisted.trial.unittest import SynchronousTestCase

from leeloo.fanout.mirror import ClusterMirror

from . import fakes


class MirrorTests(SynchronousTestCase):
    def setUp(self):
        self.mirror = ClusterMirror("me")

    def test_join_and_leave(self):
        """
        A member online on another node is listed with its node and name
        and routes the crew to that node; leaving removes both.
        """
        self.mirror.apply("b", 1, [["J", "DUO", "d1", "Ann"]])
        self.assertEqual(dict(self.mirror.elsewhere("DUO")), {"d1": ("b", "Ann")})
        self.assertEqual(self.mirror.nodes_of, {"DUO": {"b": 1}})
        self.mirror.apply("b", 2, [["L", "DUO", "d1"]])
        self.assertEqual((dict(self.mirror.elsewhere("DUO")), self.mirror.nodes_of), ({}, {}))

    def test_own_batches_ignored(self):
        """
        The node's own batches change nothing (its own part is its local
        fan-out's).
        """
        self.mirror.apply("me", 1, [["J", "DUO", "d1", "Ann"], ["C", "d1"]])
        self.assertEqual((self.mirror.crews, self.mirror.devices), ({}, {}))

    def test_old_batches_skipped(self):
        """
        A batch numbered at or below the last applied from its node is
        skipped (the loaded state holds it already).
        """
        self.mirror.apply("b", 5, [["J", "DUO", "d1", "Ann"]])
        self.mirror.apply("b", 5, [["L", "DUO", "d1"]])
        self.mirror.apply("b", 4, [["L", "DUO", "d1"]])
        self.assertIn("d1", self.mirror.elsewhere("DUO"))

    def test_leave_of_replaced_ignored(self):
        """
        A device that moved to node c stays listed there when node b,
        which it left, says it left.
        """
        self.mirror.apply("b", 1, [["J", "DUO", "d1", "Ann"], ["C", "d1"]])
        self.mirror.apply("c", 1, [["J", "DUO", "d1", "Ann"], ["C", "d1"]])
        self.mirror.apply("b", 2, [["L", "DUO", "d1"], ["R", "d1"]])
        self.assertEqual(dict(self.mirror.elsewhere("DUO")), {"d1": ("c", "Ann")})
        self.assertEqual(self.mirror.nodes_of, {"DUO": {"c": 1}})
        self.assertEqual(self.mirror.devices, {"d1": "c"})

    def test_claim_is_taken(self):
        """
        A device claimed by another node is reported taken (the node that
        holds it closes it).
        """
        effects = self.mirror.apply("b", 1, [["C", "d1"]])
        self.assertEqual((effects.taken, self.mirror.devices), (["d1"], {"d1": "b"}))

    def test_dead_node(self):
        """
        A dead node's members are reported gone (to show offline) and
        forgotten, with its devices; other nodes' stay.
        """
        self.mirror.apply("b", 1, [["J", "DUO", "d1", "Ann"], ["C", "d1"]])
        self.mirror.apply("c", 1, [["J", "DUO", "d2", "Bob"], ["C", "d2"]])
        effects = self.mirror.apply("b", 0, [["D"]])
        self.assertEqual(effects.gone, [("DUO", "d1", "Ann")])
        self.assertEqual(dict(self.mirror.elsewhere("DUO")), {"d2": ("c", "Bob")})
        self.assertEqual(self.mirror.devices, {"d2": "c"})
        # Its numbering starts again if it comes back.
        self.mirror.apply("b", 1, [["J", "DUO", "d1", "Ann"]])
        self.assertIn("d1", self.mirror.elsewhere("DUO"))

    def test_reaped_while_alive(self):
        """
        A node reaped while it lived states its part again: its members
        are reported back (to show online again), once; a restatement from
        a node never reaped reports nobody back.
        """
        self.mirror.apply("b", 1, [["J", "DUO", "d1", "Ann"], ["C", "d1"]])
        self.mirror.apply("c", 1, [["J", "DUO", "d2", "Bob"]])
        self.mirror.apply("b", 0, [["D"]])
        effects = self.mirror.apply("b", 7, [["X"], ["J", "DUO", "d1", "Ann"], ["C", "d1"]])
        self.assertEqual(effects.back, [("DUO", "d1", "Ann")])
        self.assertEqual(dict(self.mirror.elsewhere("DUO")), {"d1": ("b", "Ann"), "d2": ("c", "Bob")})
        again = self.mirror.apply("b", 8, [["X"], ["J", "DUO", "d1", "Ann"]])
        restated = self.mirror.apply("c", 2, [["X"], ["J", "DUO", "d2", "Bob"]])
        self.assertEqual((again.back, restated.back), ([], []))

    def test_reset(self):
        """
        ["X"] forgets the node's part, and the rest of its batch states it
        again, without a member reported gone.
        """
        self.mirror.apply("b", 1, [["J", "DUO", "d1", "Ann"], ["J", "TRIO", "d3", "Cy"]])
        effects = self.mirror.apply("b", 2, [["X"], ["J", "DUO", "d1", "Ann"]])
        self.assertEqual(effects.gone, [])
        self.assertEqual(dict(self.mirror.elsewhere("DUO")), {"d1": ("b", "Ann")})
        self.assertEqual(dict(self.mirror.elsewhere("TRIO")), {})

    def test_loading_holds_batches(self):
        """
        Batches arriving while the state is read wait for it; those the
        state already holds are skipped, later ones applied.
        """
        self.mirror.loading()
        self.mirror.apply("b", 3, [["L", "DUO", "d1"]])
        self.mirror.apply("b", 4, [["J", "DUO", "d2", "Bob"]])
        self.assertEqual(self.mirror.crews, {})
        self.mirror.loaded([("b", 3, [("DUO", "d1", "Ann")], ["d1"]), ("me", 9, [("DUO", "x", "Me")], [])])
        self.assertEqual(dict(self.mirror.elsewhere("DUO")), {"d1": ("b", "Ann"), "d2": ("b", "Bob")})
        self.assertEqual(self.mirror.devices, {"d1": "b"})

    def test_changed(self):
        """
        ["K", code] reports the crew changed.
        """
        self.assertEqual(self.mirror.apply("b", 1, [["K", "DUO"]]).changed, ["DUO"])


class FillTests(SynchronousTestCase):
    """
    A member coming online on another node is sent, from the store, what
    this node published to its crew before it knew of it.
    """

    def setUp(self):
        from twisted.internet.task import Clock

        from leeloo.fanout.redis import RedisFanout
        from leeloo.redisurl import parse_redis_url

        self.fanout = RedisFanout(parse_redis_url("redis://127.0.0.1:1/0"), Clock(), node="me")
        self.published = []
        self.fanout._publish = lambda channel, frame: self.published.append((channel, frame))
        self.fanout.relay = fakes.Relay()

    def test_fill_notice_sent(self):
        """
        A node that published seq 7 to a crew tells a node where a member
        of it came online to fill up to 7.
        """
        from leeloo.core.peer import Outgoing

        self.fanout.publish("DUO", Outgoing(None, b"{}"), None, 7)
        self.fanout._received(b"leeloo:presence", b'b\x001\x00[["J", "DUO", "d1", "Ann"]]')
        self.assertEqual(self.published, [("leeloo:to:b", b"F3:DUO7:")])

    def test_no_notice_without_publishing(self):
        """
        A node that published nothing to the crew sends nothing.
        """
        self.fanout._received(b"leeloo:presence", b'b\x001\x00[["J", "DUO", "d1", "Ann"]]')
        self.assertEqual(self.published, [])

    def test_fill_notice_received(self):
        """
        A fill notice up to 7 catches up a listener sent 5 (and raises the
        crew's last sequence), not one sent 7.
        """
        crew = fakes.Crew("DUO", 5)
        behind, current = fakes.Membership(crew, 5), fakes.Membership(crew, 7)
        self.fanout._crews["DUO"] = {"d1": behind, "d2": current}
        self.fanout._received(b"leeloo:to:me", b"F3:DUO7:")
        self.assertEqual((self.fanout.relay.replayer.caught_up, crew.fanned_seq), ([behind], 7))


class RevivedTests(SynchronousTestCase):
    """
    Members of a node reaped while it lived are shown online again to
    their crews here when it states its part again.
    """

    def test_member_joined_again(self):
        from twisted.internet.task import Clock

        from leeloo import messages
        from leeloo.fanout.redis import RedisFanout
        from leeloo.redisurl import parse_redis_url

        fanout = RedisFanout(parse_redis_url("redis://127.0.0.1:1/0"), Clock(), node="me")
        fanout._publish = lambda channel, frame: None
        listener = fakes.Membership(fakes.Crew("DUO", 0), 0)
        listener.peer = fakes.Peer()
        fanout._crews["DUO"] = {"d2": listener}
        fanout._received(b"leeloo:presence", b'b\x001\x00[["J", "DUO", "d1", "Ann"]]')
        fanout._received(b"leeloo:presence", b'b\x000\x00[["D"]]')
        fanout._received(b"leeloo:presence", b'b\x004\x00[["X"], ["J", "DUO", "d1", "Ann"]]')
        self.assertEqual([type(m) for m in listener.peer.sent], [messages.MemberOffline, messages.MemberJoined])
        self.assertEqual((listener.peer.sent[1].device_id, listener.peer.sent[1].display_name), ("d1", "Ann"))
