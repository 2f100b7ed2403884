"""
The device client in several crews (issue 16), against the real relay
service on loopback: crew_add, crew_leave and crews, sends naming a crew,
events tagged with their crew, positions per crew, and coming back to
every crew after a reconnection and a relay restart.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from leeloo.messages import InvalidCrewCode, NotInCrew

from .loopback import LoopbackRelay, start_device


class MultiCrewDeviceTests(TestCase):

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self).start()
        # Ann and Bob each made a crew of their own; Max made his.
        self.ann, self.ann_events = start_device(self, self.relay.url(), "Ann")
        self.bob, self.bob_events = start_device(self, self.relay.url(), "Bob")
        self.max_state = self.mktemp()
        self.max, self.max_events = start_device(self, self.relay.url(), "Max", self.max_state)
        connected = [e.wait("connected", after=0) for e in (self.ann_events, self.bob_events, self.max_events)]
        yield defer.gatherResults(connected)
        self.a, self.b, self.m = self.ann.crew_code, self.bob.crew_code, self.max.crew_code

    @defer.inlineCallbacks
    def in_three(self):
        """
        Max adds Ann's and Bob's crews to his own.
        """
        joined = [(yield self.max.crew_add(self.a)), (yield self.max.crew_add(self.b))]
        return joined

    @defer.inlineCallbacks
    def test_crew_add_fires_with_crew_joined(self):
        """
        crew_add fires with the relay's crew_joined for that crew; the crew
        hears member_joined; the device now holds its three crews, and says
        so in relay_state.json.
        """
        heard = self.ann_events.wait("member_joined")
        joined = yield self.in_three()
        self.assertEqual([(j["type"], j["crew_code"]) for j in joined],
                         [("crew_joined", self.a), ("crew_joined", self.b)])
        self.assertEqual((yield heard)["display_name"], "Max")
        self.assertEqual(self.max.held_crews, [self.m, self.a, self.b])
        with open(self.max.state.path("relay_state.json")) as f:
            saved = json.load(f)
        self.assertEqual((saved["multi_crew"], saved["crews"]), (True, [self.a, self.b]))

    @defer.inlineCallbacks
    def test_crews(self):
        """
        crews fires with the relay's list: the primary and each crew, in the
        order joined, counted with the device.
        """
        yield self.in_three()
        listed = yield self.max.crews()
        self.assertEqual(listed["primary"], self.m)
        self.assertEqual([(c["crew_code"], c["members_online"], c["member_names"]) for c in listed["crews"]],
                         [(self.m, 1, []), (self.a, 2, ["Ann"]), (self.b, 2, ["Bob"])])

    @defer.inlineCallbacks
    def test_events_tagged_and_sends_named(self):
        """
        Messages from each crew reach the device tagged with their crew; a
        send naming a crew reaches that crew only, and its sent frame names
        it; positions are kept per crew.
        """
        yield self.in_three()
        from_ann = self.max_events.wait("message", lambda f: f["payload"]["text"] == "from Ann")
        from_bob = self.max_events.wait("message", lambda f: f["payload"]["text"] == "from Bob")
        yield self.ann.send_text("from Ann")
        yield self.bob.send_text("from Bob")
        self.assertEqual([(yield from_ann)["crew_code"], (yield from_bob)["crew_code"]], [self.a, self.b])
        at_bob = self.bob_events.wait("message")
        sent = yield self.max.send_text("to Bob", crew_code=self.b)
        self.assertEqual(sent["crew_code"], self.b)
        self.assertEqual((yield at_bob)["payload"], {"text": "to Bob"})
        at_ann = self.ann_events.wait("message")
        yield self.max.send_text("to Ann", crew_code=self.a.lower())
        self.assertEqual((yield at_ann)["payload"], {"text": "to Ann"})
        self.assertEqual([f["payload"]["text"] for f in self.ann_events.frames("message")], ["to Ann"])
        self.assertEqual(self.max.state.last_seq[self.a], 1)
        self.assertEqual(self.max.state.last_seq[self.b], 1)

    @defer.inlineCallbacks
    def test_send_to_a_crew_not_held(self):
        """
        A send naming a crew the device is not in fails with NotInCrew at
        once, and nothing is queued.
        """
        yield self.assertFailure(self.max.send_text("hi", crew_code=self.a), NotInCrew)
        self.assertEqual(self.max.state.outbox, [])

    @defer.inlineCallbacks
    def test_crew_add_of_an_unknown_crew(self):
        """
        crew_add of a crew that does not exist fails with InvalidCrewCode
        (it is never created), and the device keeps its crew.
        """
        yield self.assertFailure(self.max.crew_add("LEELOO-NONE"), InvalidCrewCode)
        self.assertNotIn("LEELOO-NONE", self.relay.relay.crews)
        self.assertEqual(self.max.held_crews, [self.m])

    @defer.inlineCallbacks
    def test_crew_leave(self):
        """
        crew_leave fires with crew_left; the crew hears member_offline and
        the device hears nothing more of it; leaving a crew it is not in
        fails with NotInCrew.
        """
        yield self.in_three()
        offline = self.bob_events.wait("member_offline")
        left = yield self.max.crew_leave(self.b)
        self.assertEqual(left, {"type": "crew_left", "crew_code": self.b})
        self.assertEqual((yield offline)["display_name"], "Max")
        self.assertEqual(self.max.held_crews, [self.m, self.a])
        yield self.bob.send_text("gone?")
        marker = self.max_events.wait("message", lambda f: f["payload"]["text"] == "marker")
        yield self.ann.send_text("marker")
        yield marker
        self.assertEqual([f["payload"]["text"] for f in self.max_events.frames("message")], ["marker"])
        yield self.assertFailure(self.max.crew_leave(self.b), NotInCrew)

    @defer.inlineCallbacks
    def test_leaving_the_main_crew(self):
        """
        Leaving the main crew makes the earliest-added other crew the main
        one, in crew_config.json too.
        """
        yield self.in_three()
        yield self.max.crew_leave(self.m)
        self.assertEqual((self.max.crew_code, self.max.held_crews), (self.a, [self.a, self.b]))
        with open(self.max.state.path("crew_config.json")) as f:
            self.assertEqual(json.load(f)["crew_code"], self.a)

    @defer.inlineCallbacks
    def test_back_to_every_crew_after_a_relay_restart(self):
        """
        The device is stopped, the relay restarts, Ann and Bob write; the
        device started again on its state comes back to all three crews and
        gets what it missed in each, once, tagged.
        """
        yield self.in_three()
        yield self.max.stopService()
        yield self.relay.stop()
        yield self.relay.start()
        yield defer.gatherResults([self.ann_events.wait("connected"), self.bob_events.wait("connected")])
        yield self.ann.send_text("missed in Ann's")
        yield self.bob.send_text("missed in Bob's")
        again, events = start_device(self, self.relay.url(), "Max", self.max_state)
        got_a = events.wait("message", lambda f: f["payload"]["text"] == "missed in Ann's", after=0)
        got_b = events.wait("message", lambda f: f["payload"]["text"] == "missed in Bob's", after=0)
        self.assertEqual([(yield got_a)["crew_code"], (yield got_b)["crew_code"]], [self.a, self.b])
        live = events.wait("message", lambda f: f["payload"]["text"] == "live")
        yield self.bob.send_text("live")
        yield live
        listed = yield again.crews()
        self.assertEqual([c["crew_code"] for c in listed["crews"]], [self.m, self.a, self.b])
        self.assertEqual(sorted(f["payload"]["text"] for f in events.frames("message")),
                         ["live", "missed in Ann's", "missed in Bob's"])
