"""
L{leeloo.fanout.mirror.ClusterMirror}: what a node knows of the others.
"""

from twisted.trial.unittest import SynchronousTestCase

from leeloo.fanout.mirror import ClusterMirror


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
