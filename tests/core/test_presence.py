"""
L{leeloo.core.presence}: member_offline only after the presence grace,
and quiet for a device that is back within it.
"""

from leeloo.core.defaults import PRESENCE_GRACE
from leeloo.fanout.local import LocalFanout
from tests.core.support import BoundsTestCase, RelayTestCase


class DisconnectTests(RelayTestCase):
    def test_member_offline(self):
        """
        When a device disconnects and does not come back within the presence
        grace, the rest of its crew hears member_offline.
        """
        a, b = self.crew_of(2)
        a.close()
        self.clock.advance(PRESENCE_GRACE - 0.1)
        self.assertEqual(b.take(), [])
        self.clock.advance(0.1)
        self.assertEqual(b.take(), [{"type": "member_offline", "device_id": "dev0", "display_name": "Dev 0",
                                     "crew_code": "ALPHA"}])
        self.assertEqual(self.relay.stats().devices, 1)


class PresenceTests(BoundsTestCase):
    def test_blip_unannounced(self):
        """
        A device that disconnects and is back within the grace is announced
        neither offline nor joined.
        """
        victim, blip = self.member("v"), self.member("b")
        victim.take()
        blip.close()
        self.clock.advance(PRESENCE_GRACE - 1)
        back = self.device()
        back.send(type="join_crew", crew_code="ALPHA", device_id="b")
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(victim.take(), [])

    def test_away_past_grace_announced(self):
        """
        Away longer than the grace: offline once it passes, then joined.
        """
        victim, away = self.member("v"), self.member("b", name="Bea")
        away.close()
        self.clock.advance(PRESENCE_GRACE)
        back = self.device()
        back.send(type="join_crew", crew_code="ALPHA", device_id="b", display_name="Bea")
        self.assertEqual(victim.take(), [
            {"type": "member_offline", "device_id": "b", "display_name": "Bea", "crew_code": "ALPHA"},
            {"type": "member_joined", "device_id": "b", "display_name": "Bea", "crew_code": "ALPHA"},
        ])

    def test_crew_hopping_quiet(self):
        """
        Devices alternating between two crews send the crews' other members
        no presence frames after their first arrival.
        """
        victim = self.member("v", "ALPHA")
        other = self.member("w", "BETA")
        hoppers = [self.member(f"h{i}", "ALPHA") for i in range(3)]
        victim.take()
        for _ in range(20):
            for h in hoppers:
                h.send(type="join_crew", crew_code="BETA")
            for h in hoppers:
                h.send(type="join_crew", crew_code="ALPHA")
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(victim.take(), [])
        self.assertEqual(other.types(), ["member_joined"] * 3 + ["member_offline"] * 3)

    def test_newcomer_hears_return(self):
        """
        A member who arrived while a device was briefly away hears it join
        when it comes back.
        """
        self.member("b", name="Bea").close()
        newcomer = self.device()
        newcomer.send(type="join_crew", crew_code="ALPHA", device_id="n")
        newcomer.take()
        back = self.device()
        back.send(type="join_crew", crew_code="ALPHA", device_id="b", display_name="Bea")
        self.assertEqual(newcomer.take(), [{"type": "member_joined", "device_id": "b", "display_name": "Bea",
                                             "crew_code": "ALPHA"}])

    def test_stop_cancels_announcements(self):
        """
        When the relay stops, no announcement is left waiting on the clock.
        """
        v = self.member("v")
        self.member("b").close()
        done = self.relay.shutdown(spread=0)
        # Its connection ends after the 1001, as a real transport's does.
        v.close()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _TwoNodeFanout(LocalFanout):
    """
    This node's fan-out, with members said to be online on another node
    (C{remote}: crew code -> device id -> (node, name)).
    """

    def __init__(self):
        super().__init__()
        self.remote = {}

    def elsewhere(self, crew_code):
        return self.remote.get(crew_code, {})


class ElsewhereTests(BoundsTestCase):
    """
    Members online on other nodes count as online here.
    """

    def setUp(self):
        self.fanout = _TwoNodeFanout()
        super().setUp()

    def make_relay(self, **kwargs):
        return super().make_relay(fanout=self.fanout, **kwargs)

    def test_back_on_another_node_unannounced(self):
        """
        A device that leaves this node and is online on another within
        the grace is not announced offline here.
        """
        victim, mover = self.member("v"), self.member("m")
        victim.take()
        mover.close()
        self.fanout.remote["ALPHA"] = {"m": ("other", "m")}
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(victim.take(), [])

    def test_counted_and_named(self):
        """
        crew_joined counts and names the members online on other nodes,
        once each, and so does the bot API's crew status.
        """
        self.member("v", name="Vee")
        self.fanout.remote["ALPHA"] = {"r": ("other", "Arr"), "v": ("other", "Vee")}
        joiner = self.device()
        joiner.send(type="join_crew", crew_code="ALPHA", device_id="j", display_name="Jay")
        [joined] = [m for m in joiner.take() if m["type"] == "crew_joined"]
        self.assertEqual((joined["crew_members"], sorted(joined["member_names"])), (3, ["Arr", "Vee"]))
        status = self.relay.crew_status("ALPHA")
        self.assertEqual(sorted(status.device_names), ["Arr", "Jay", "Vee"])
