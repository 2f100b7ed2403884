"""
One device in several crews (issue 16): C{crew_add}, C{crew_leave},
C{crews}, C{crew_primary}, crew messages and acks naming a crew, and the
crew limit, through the real core.
"""

import json

from leeloo import messages
from leeloo.core.delivery import client_digest
from leeloo.limits import Rate, RelayLimits
from leeloo.relay import Relay
from leeloo.store import DELETE_MEMBER, PUT_MULTI_CREW, MemoryStore, MultiCrewRecord
from leeloo.testing import Device

from tests.core.support import ClockTestCase


class MultiCrewTestCase(ClockTestCase):
    """
    A relay on its in-memory store, with no presence grace; crews ALPHA,
    BRAVO and CHARLIE each have one member (a1, b1, c1) online.
    """

    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1000, 600))

    def setUp(self):
        super().setUp()
        self.relay = self.make_relay()
        self.a1 = self.device("a1", "ALPHA")
        self.b1 = self.device("b1", "BRAVO")
        self.c1 = self.device("c1", "CHARLIE")
        self.flush()
        for d in (self.a1, self.b1, self.c1):
            d.take()

    def make_relay(self, **kwargs):
        kwargs.setdefault("limits", self.limits)
        kwargs.setdefault("presence_grace", 0)
        return Relay(self.clock, **kwargs)

    def flush(self):
        self.clock.advance(0.05)

    def device(self, device_id, crew=None, **extra):
        d = Device(self.relay, "192.0.2.7")
        fields = dict(type="register", device_id=device_id, device_name=device_id.upper(), **extra)
        if crew is not None:
            fields["crew_code"] = crew
        d.send(**fields)
        self.flush()
        return d

    def in_three(self):
        """
        Device m, in ALPHA (its primary), then BRAVO and CHARLIE by crew_add.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.send(type="crew_add", crew_code="CHARLIE")
        self.flush()
        m.take()
        for d in (self.a1, self.b1, self.c1):
            d.take()
        return m

    def say(self, device, text, **extra):
        device.send(type="message", payload={"text": text}, **extra)
        self.flush()


class CrewAddTests(MultiCrewTestCase):
    def test_answered_crew_joined(self):
        """
        C{crew_add} is answered C{crew_joined} as C{join_crew} is: the
        crew's code, the members online with the device, the others' names.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_add", crew_code="bravo")
        self.assertEqual(m.take()[0], {"type": "crew_joined", "device_id": "m", "crew_code": "BRAVO",
                                       "crew_members": 2, "member_names": ["B1"]})

    def test_crew_hears_member_joined(self):
        """
        The crew added hears C{member_joined}; the crew kept hears nothing.
        """
        m = self.device("m", "ALPHA")
        self.a1.take()
        m.send(type="crew_add", crew_code="BRAVO")
        self.assertEqual([f["type"] for f in self.b1.take()], ["member_joined"])
        self.assertEqual(self.a1.take(), [])

    def test_keeps_the_other_crews(self):
        """
        After C{crew_add} the device is in both crews, the first still primary.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        self.assertEqual(m.session.primary.crew.code, "ALPHA")
        self.assertEqual([x.crew.code for x in m.session.memberships()], ["ALPHA", "BRAVO"])

    def test_unknown_crew(self):
        """
        C{crew_add} never creates a crew: an unknown one is C{invalid_crew_code}.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_add", crew_code="NOSUCH")
        self.assertEqual(m.last()["error"], "invalid_crew_code")
        self.assertNotIn("NOSUCH", self.relay.crews_part.crews)

    def test_already_held(self):
        """
        A crew already held is answered C{crew_joined} again, and its crew
        hears no C{member_joined}.
        """
        m = self.in_three()
        m.send(type="crew_add", crew_code="BRAVO")
        self.assertEqual([f["type"] for f in m.take()], ["crew_joined"])
        self.assertEqual(self.b1.take(), [])

    def test_not_registered(self):
        """
        Before a device is bound, C{crew_add}, C{crew_leave}, C{crews} and
        C{crew_primary} are each answered C{not_registered}.
        """
        d = Device(self.relay, "192.0.2.7")
        for frame in ({"type": "crew_add", "crew_code": "ALPHA"}, {"type": "crew_leave", "crew_code": "ALPHA"},
                      {"type": "crews"}, {"type": "crew_primary", "crew_code": "ALPHA"}):
            d.send(**frame)
            self.assertEqual(d.last()["error"], "not_registered", frame)

    def test_crew_code_required(self):
        """
        C{crew_add} without a C{crew_code} is C{invalid_message}.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_add")
        self.assertEqual(m.last()["error"], "invalid_message")

    def test_replays_what_was_missed(self):
        """
        C{crew_add} with C{last_seq} first replays what the device missed in
        that crew after it, marked replayed.
        """
        for text in ("one", "two", "three"):
            self.say(self.b1, text)
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_add", crew_code="BRAVO", last_seq=1)
        self.flush()
        got = [f for f in m.take() if f["type"] == "message"]
        self.assertEqual([(f["payload"]["text"], f["seq"], f["replayed"]) for f in got],
                         [("two", 2, True), ("three", 3, True)])

    def test_last_seq_from_the_future(self):
        """
        C{last_seq} past the crew's latest is C{invalid_last_seq}, and the
        crew is not added.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_add", crew_code="BRAVO", last_seq=5)
        self.assertEqual(m.last()["error"], "invalid_last_seq")
        self.assertIsNone(m.session.membership("BRAVO"))


class CrewMessageTests(MultiCrewTestCase):
    def test_each_crew_only(self):
        """
        A device in three crews sends to each by C{crew_code}, and only that
        crew receives it.
        """
        m = self.in_three()
        for code, text in (("ALPHA", "to a"), ("BRAVO", "to b"), ("CHARLIE", "to c")):
            self.say(m, text, crew_code=code)
        self.assertEqual(self.a1.texts(), ["to a"])
        self.assertEqual(self.b1.texts(), ["to b"])
        self.assertEqual(self.c1.texts(), ["to c"])

    def test_default_is_primary(self):
        """
        A crew message with no C{crew_code} goes to the primary crew only.
        """
        m = self.in_three()
        self.say(m, "hello")
        self.assertEqual((self.a1.texts(), self.b1.texts(), self.c1.texts()), (["hello"], [], []))

    def test_share_music_and_reaction(self):
        """
        C{share_music} and C{reaction} go to the crew they name.
        """
        m = self.in_three()
        m.send(type="share_music", spotify_uri="spotify:track:1", artist="A", track="T", album="L",
               crew_code="CHARLIE")
        m.send(type="reaction", reaction_type="love", crew_code="BRAVO")
        self.flush()
        self.assertEqual([f["type"] for f in self.c1.take()], ["music_shared"])
        self.assertEqual([f["type"] for f in self.b1.take()], ["reaction"])
        self.assertEqual(self.a1.take(), [])

    def test_crew_not_held(self):
        """
        A crew message naming a crew the device is not in is C{not_in_crew},
        and nobody receives it.
        """
        m = self.device("m", "ALPHA")
        m.take()
        self.say(m, "sneaky", crew_code="BRAVO")
        self.assertEqual(m.last()["error"], "not_in_crew")
        self.assertEqual((self.a1.texts(), self.b1.texts()), ([], []))

    def test_sequences_per_crew(self):
        """
        Each crew numbers its own messages.
        """
        m = self.in_three()
        self.say(m, "a", crew_code="ALPHA")
        self.say(m, "b", crew_code="BRAVO")
        self.say(m, "b2", crew_code="BRAVO")
        self.assertEqual([f["seq"] for f in self.a1.take()], [1])
        self.assertEqual([f["seq"] for f in self.b1.take()], [1, 2])

    def test_sent_per_crew(self):
        """
        One C{client_msg_id} used in two crews is two messages, each answered
        C{sent} with its crew's sequence.
        """
        m = self.in_three()
        self.say(m, "x", crew_code="ALPHA", client_msg_id="c1")
        self.say(m, "x", crew_code="BRAVO", client_msg_id="c1")
        self.assertEqual([f["seq"] for f in m.take() if f["type"] == "sent"], [1, 1])
        self.assertEqual((self.a1.texts(), self.b1.texts()), (["x"], ["x"]))

    def test_rate_limit_shared(self):
        """
        The message rate is the connection's across all its crews: sending
        to another crew is no way around it.
        """
        self.relay = Relay(self.clock, limits=RelayLimits(messages=Rate(0.001, 3),
                                                          entries=Rate.per_window(1000, 600)),
                           presence_grace=0)
        self.device("b1", "BRAVO")
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.take()
        # The burst of 3 went on register, crew_add and this:
        self.say(m, "1", crew_code="ALPHA")
        self.say(m, "2", crew_code="BRAVO")
        self.assertEqual(m.last()["error"], "rate_limited")


class AckTests(MultiCrewTestCase):
    def test_ack_names_crew(self):
        """
        C{ack} with C{crew_code} acknowledges in that crew; without it, in
        the primary.
        """
        m = self.in_three()
        self.say(self.b1, "b")
        self.say(self.a1, "a")
        m.take()
        m.send(type="ack", seq=1, crew_code="BRAVO")
        m.send(type="ack", seq=1)
        self.assertEqual(m.take(), [])
        self.assertEqual(self.relay.crews_part.crews["BRAVO"].members["m"].acked_seq, 1)
        self.assertEqual(self.relay.crews_part.crews["ALPHA"].members["m"].acked_seq, 1)
        self.assertIsNone(self.relay.crews_part.crews["CHARLIE"].members["m"].acked_seq)

    def test_ack_past_what_that_crew_sent(self):
        """
        An C{ack} is checked against what its crew sent: C{invalid_ack}.
        """
        m = self.in_three()
        self.say(self.a1, "a")
        m.take()
        m.send(type="ack", seq=1, crew_code="BRAVO")
        self.assertEqual(m.last()["error"], "invalid_ack")

    def test_ack_crew_not_held(self):
        """
        An C{ack} naming a crew the device is not in is C{not_in_crew}.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="ack", seq=0, crew_code="BRAVO")
        self.assertEqual(m.last()["error"], "not_in_crew")


class CrewsAndPrimaryTests(MultiCrewTestCase):
    def test_crews(self):
        """
        C{crews} lists the primary and every crew held in the order joined,
        counted as C{crew_joined} counts.
        """
        m = self.in_three()
        m.send(type="crews")
        self.assertEqual(m.last(), {"type": "crews", "primary": "ALPHA", "crews": [
            {"crew_code": "ALPHA", "crew_name": None, "members_online": 2, "member_names": ["A1"]},
            {"crew_code": "BRAVO", "crew_name": None, "members_online": 2, "member_names": ["B1"]},
            {"crew_code": "CHARLIE", "crew_name": None, "members_online": 2, "member_names": ["C1"]},
        ]})

    def test_crews_when_in_none(self):
        """
        A device registered without a crew is answered no primary and no crews.
        """
        m = self.device("m")
        m.take()
        m.send(type="crews")
        self.assertEqual(m.last(), {"type": "crews", "primary": None, "crews": []})

    def test_primary_changes_default(self):
        """
        C{crew_primary} is answered, and messages with no C{crew_code} then
        go to that crew.
        """
        m = self.in_three()
        m.send(type="crew_primary", crew_code="charlie")
        self.assertEqual(m.last(), {"type": "crew_primary", "crew_code": "CHARLIE"})
        self.say(m, "now c")
        self.assertEqual((self.a1.texts(), self.c1.texts()), ([], ["now c"]))

    def test_primary_not_held(self):
        """
        C{crew_primary} for a crew not held is C{not_in_crew}; the primary stays.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_primary", crew_code="BRAVO")
        self.assertEqual(m.last()["error"], "not_in_crew")
        self.assertEqual(m.session.primary.crew.code, "ALPHA")

    def test_crews_order_kept_after_primary(self):
        """
        After C{crew_primary}, C{crews} still lists the crews in join order.
        """
        m = self.in_three()
        m.send(type="crew_primary", crew_code="CHARLIE")
        m.send(type="crews")
        reply = m.last()
        self.assertEqual((reply["primary"], [c["crew_code"] for c in reply["crews"]]),
                         ("CHARLIE", ["ALPHA", "BRAVO", "CHARLIE"]))


class CrewLeaveTests(MultiCrewTestCase):
    def test_answered_and_announced(self):
        """
        C{crew_leave} is answered C{crew_left}; the crew hears
        C{member_offline}; C{crews} no longer lists it.
        """
        m = self.in_three()
        m.send(type="crew_leave", crew_code="BRAVO")
        self.assertEqual(m.take(), [{"type": "crew_left", "crew_code": "BRAVO"}])
        self.assertEqual([f["type"] for f in self.b1.take()], ["member_offline"])
        m.send(type="crews")
        self.assertEqual([c["crew_code"] for c in m.last()["crews"]], ["ALPHA", "CHARLIE"])

    def test_no_more_messages(self):
        """
        After C{crew_leave} the device receives nothing more of that crew.
        """
        m = self.in_three()
        m.send(type="crew_leave", crew_code="BRAVO")
        m.take()
        self.say(self.b1, "gone?")
        self.assertEqual(m.texts(), [])

    def test_ends_replay(self):
        """
        A crew left is not replayed: added again later, the device gets
        nothing of what was said meanwhile.
        """
        m = self.in_three()
        m.send(type="crew_leave", crew_code="BRAVO")
        self.say(self.b1, "while away")
        self.assertNotIn("m", self.relay.crews_part.crews["BRAVO"].members)
        m.send(type="crew_add", crew_code="BRAVO")
        self.flush()
        self.assertEqual(m.texts(), [])

    def test_leaving_primary(self):
        """
        Leaving the primary crew makes the earliest-joined remaining crew
        primary.
        """
        m = self.in_three()
        m.send(type="crew_primary", crew_code="CHARLIE")
        m.send(type="crew_leave", crew_code="CHARLIE")
        m.send(type="crews")
        self.assertEqual(m.last()["primary"], "ALPHA")
        self.say(m, "to a")
        self.assertEqual(self.a1.texts(), ["to a"])

    def test_not_held(self):
        """
        Leaving a crew not held is C{not_in_crew}.
        """
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_leave", crew_code="BRAVO")
        self.assertEqual(m.last()["error"], "not_in_crew")


class LimitTests(MultiCrewTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1000, 600), max_crews_per_device=2)

    def test_crew_limit(self):
        """
        Past C{max_crews_per_device} crews, C{crew_add} is C{crew_limit}, and
        the crew is not added.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.take()
        m.send(type="crew_add", crew_code="CHARLIE")
        self.assertEqual(m.last()["error"], "crew_limit")
        self.assertIsNone(m.session.membership("CHARLIE"))
        self.assertEqual(self.c1.take(), [])

    def test_held_crew_past_limit(self):
        """
        At the limit, adding a crew already held is still answered C{crew_joined}.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.take()
        m.send(type="crew_add", crew_code="ALPHA")
        self.assertEqual(m.last()["type"], "crew_joined")

    def test_entry_rate_shared(self):
        """
        C{crew_add} counts against the entry rate as C{join_crew} does.
        """
        self.relay = Relay(self.clock, limits=RelayLimits(entries=Rate.per_window(2, 600)), presence_grace=0)
        self.device("b1", "BRAVO")
        m = self.device("m")
        m.take()
        for code in ("X1", "X2", "BRAVO"):
            m.send(type="crew_add", crew_code=code)
        self.assertEqual(m.last()["error"], "rate_limited")


class LegacyTests(MultiCrewTestCase):
    def test_join_crew_still_moves(self):
        """
        A device that never sent C{crew_add} is moved by C{join_crew}: it
        leaves its crew (which hears C{member_offline}) and is in one crew.
        """
        m = self.device("m", "ALPHA")
        self.a1.take()
        m.send(type="join_crew", crew_code="BRAVO")
        self.assertEqual([x.crew.code for x in m.session.memberships()], ["BRAVO"])
        self.assertEqual([f["type"] for f in self.a1.take()], ["member_offline"])

    def test_join_crew_adds_once_multi(self):
        """
        After its first C{crew_add}, C{join_crew} adds a crew instead of moving.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        self.a1.take()
        m.send(type="join_crew", crew_code="CHARLIE")
        self.assertEqual([x.crew.code for x in m.session.memberships()], ["ALPHA", "BRAVO", "CHARLIE"])
        self.assertEqual(self.a1.take(), [])

    def test_disconnect_leaves_every_crew(self):
        """
        A multi-crew device that disconnects goes offline in each of its crews.
        """
        m = self.in_three()
        m.close()
        for d in (self.a1, self.b1, self.c1):
            self.assertEqual([f["type"] for f in d.take()], ["member_offline"])


class TaggedTests(MultiCrewTestCase):
    """
    Every event about a crew carries its C{crew_code}.
    """

    def test_fanout_tagged(self):
        """
        A fan-out carries the code of the crew it was sent to, so a device in
        several crews can tell them apart.
        """
        m = self.in_three()
        self.say(self.b1, "from b")
        self.say(self.c1, "from c")
        self.assertEqual([(f["payload"]["text"], f["crew_code"]) for f in m.take()],
                         [("from b", "BRAVO"), ("from c", "CHARLIE")])

    def test_music_and_reaction_tagged(self):
        """
        C{music_shared} and C{reaction} carry their crew's code.
        """
        m = self.in_three()
        self.b1.send(type="share_music", spotify_uri="spotify:track:1", artist="A", track="T", album="L")
        self.c1.send(type="reaction", reaction_type="fire")
        self.flush()
        self.assertEqual([(f["type"], f["crew_code"]) for f in m.take()],
                         [("music_shared", "BRAVO"), ("reaction", "CHARLIE")])

    def test_member_joined_and_offline_tagged(self):
        """
        C{member_joined} and C{member_offline} carry the crew's code.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        self.assertEqual(self.b1.take(), [{"type": "member_joined", "device_id": "m", "display_name": "M",
                                           "crew_code": "BRAVO"}])
        m.send(type="crew_leave", crew_code="BRAVO")
        self.assertEqual(self.b1.take(), [{"type": "member_offline", "device_id": "m", "display_name": "M",
                                           "crew_code": "BRAVO"}])

    def test_sent_tagged(self):
        """
        C{sent} carries the crew the message went to, and so does the answer
        to a resend.
        """
        m = self.in_three()
        self.say(m, "x", crew_code="BRAVO", client_msg_id="c1")
        self.say(m, "x", crew_code="BRAVO", client_msg_id="c1")
        self.assertEqual([(f["type"], f["crew_code"]) for f in m.take()], [("sent", "BRAVO")] * 2)

    def test_replayed_tagged(self):
        """
        What a returning member is replayed carries its crew's code, once.
        """
        self.say(self.b1, "one")
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO", last_seq=0)
        self.flush()
        [got] = [f for f in m.take() if f["type"] == "message"]
        self.assertEqual((got["crew_code"], got["replayed"]), ("BRAVO", True))

    def test_replay_truncated_tagged(self):
        """
        C{replay_truncated} names its crew.
        """
        self.relay = self.make_relay(replay_limit=1)
        b1 = self.device("b1", "BRAVO")
        for text in ("1", "2", "3"):
            self.say(b1, text)
        m = self.device("m", "ALPHA")
        m.take()
        m.send(type="crew_add", crew_code="BRAVO", last_seq=0)
        self.flush()
        [truncated] = [f for f in m.take() if f["type"] == "replay_truncated"]
        self.assertEqual(truncated, {"type": "replay_truncated", "from_seq": 1, "to_seq": 2, "crew_code": "BRAVO"})

    def test_entries_stored_before_get_crew_code(self):
        """
        A log entry stored before fan-outs carried C{crew_code} is replayed
        with it.
        """
        old = b'{"type":"message","from_device":"a","from_name":"A","msg_type":"text","payload":{},' \
              b'"timestamp":1,"seq":1,"id":"m1"}'
        self.assertEqual(json.loads(messages.replayed(old, "ALPHA")),
                         {**json.loads(old), "crew_code": "ALPHA", "replayed": True})

    def test_new_entries_not_tagged_twice(self):
        """
        An entry stored with its C{crew_code} is replayed as stored, marked
        replayed.
        """
        new = messages.encode(messages.stamped({"type": "reaction", "reaction_type": "x", "from": "A"},
                                               1, 1, "m1", "ALPHA"))
        self.assertEqual(messages.replayed(new, "ALPHA"), new[:-1] + b',"replayed":true}')

    def test_device_side_reads_crew_code(self):
        """
        The device side of the protocol reads the C{crew_code} of the events
        it is tagged on.
        """
        frames = [
            {"type": "message", "from_device": "a", "from_name": "A", "msg_type": "text", "payload": {},
             "crew_code": "BRAVO"},
            {"type": "member_joined", "device_id": "a", "display_name": "A", "crew_code": "BRAVO"},
            {"type": "member_offline", "device_id": "a", "display_name": "A", "crew_code": "BRAVO"},
            {"type": "sent", "client_msg_id": "c", "id": "m", "seq": 1, "crew_code": "BRAVO"},
            {"type": "replay_truncated", "from_seq": 1, "to_seq": 2, "crew_code": "BRAVO"},
        ]
        for frame in frames:
            typed = messages.relay_message_from(frame)
            self.assertEqual((typed.crew_code, typed.to_dict()), ("BRAVO", frame))


class DecodeTests(MultiCrewTestCase):
    def test_decode(self):
        """
        The new messages decode to their typed forms, crew codes normalized.
        """
        self.assertEqual(messages.decode('{"type":"crew_add","crew_code":" bravo ","last_seq":3}'),
                         messages.CrewAdd("BRAVO", 3))
        self.assertEqual(messages.decode('{"type":"crew_leave","crew_code":"bravo"}'), messages.CrewLeave("BRAVO"))
        self.assertEqual(messages.decode('{"type":"crews"}'), messages.Crews())
        self.assertEqual(messages.decode('{"type":"crew_primary","crew_code":"b"}'), messages.CrewPrimary("B"))
        self.assertEqual(messages.decode('{"type":"ack","seq":2,"crew_code":"b"}'), messages.Ack(2, "B"))

    def test_bad_fields(self):
        """
        A missing or malformed C{crew_code}, or a bad C{last_seq}, is refused
        with its error code.
        """
        for frame, code in (('{"type":"crew_leave"}', "invalid_message"),
                            ('{"type":"crew_primary","crew_code":7}', "invalid_message"),
                            ('{"type":"crew_add","crew_code":"   "}', "invalid_crew_code"),
                            ('{"type":"crew_add","crew_code":"B","last_seq":-1}', "invalid_last_seq"),
                            ('{"type":"message","crew_code":"a\\u0001"}', "invalid_crew_code")):
            with self.assertRaises(messages.ProtocolError) as e:
                messages.decode(frame)
            self.assertEqual(e.exception.code, code, frame)

    def test_digest_ignores_crew_code(self):
        """
        A crew message's digest (what tells a resend from a different
        message) is the same with or without C{crew_code}, so digests
        stored before it existed still match.
        """
        self.assertEqual(client_digest(messages.CrewMessage("text", {"t": 1}, "c1")),
                         client_digest(messages.CrewMessage("text", {"t": 1}, "c1", "ALPHA")))


class CountsTests(MultiCrewTestCase):
    def test_stats_count_a_device_once(self):
        """
        The landing page's figures count a device in three crews as one
        device, and each of its crews as online.
        """
        self.in_three()
        stats = self.relay.stats()
        self.assertEqual((stats.devices, stats.crews_online), (4, 3))

    def test_crew_status_lists_the_device_in_each_crew(self):
        """
        The bot API's crew status names a device in several crews in each of
        them, and no longer in a crew it left.
        """
        m = self.in_three()
        m.send(type="crew_leave", crew_code="CHARLIE")
        self.assertEqual(sorted(self.relay.crew_status("BRAVO").device_names), ["B1", "M"])
        self.assertEqual(self.relay.crew_status("CHARLIE").device_names, ["C1"])


class DeviceSideTests(MultiCrewTestCase):
    def test_replies_read_back(self):
        """
        The relay's answers to C{crews}, C{crew_leave} and C{crew_primary}
        read back on the device side as their typed forms, unchanged.
        """
        m = self.in_three()
        for frame in ({"type": "crews"}, {"type": "crew_primary", "crew_code": "BRAVO"},
                      {"type": "crew_leave", "crew_code": "ALPHA"}):
            m.send(**frame)
            reply = m.last()
            typed = messages.relay_message_from(reply)
            self.assertEqual((typed.type, typed.to_dict()), (reply["type"], reply))

    def test_bad_listing(self):
        """
        A C{crews} frame whose list holds no objects is C{invalid_message}.
        """
        with self.assertRaises(messages.InvalidMessage):
            messages.relay_message_from({"type": "crews", "primary": None, "crews": ["X"]})

    def test_listing_missing_field_named(self):
        """
        A listed crew without its C{crew_code} is C{invalid_message} saying
        so, named as a field of C{crews}.
        """
        with self.assertRaises(messages.InvalidMessage) as caught:
            messages.relay_message_from({"type": "crews", "primary": None,
                                         "crews": [{"members_online": 1, "member_names": []}]})
        self.assertEqual(str(caught.exception), "crews crew_code is required")


class ComingBackTests(MultiCrewTestCase):
    """
    A multi-crew device that reconnects (C{register} with its id) to the
    same relay (across a restart: L{RestartTests}).
    """

    def test_reenters_every_crew(self):
        """
        Back with C{register}, a multi-crew device re-enters all its crews and
        gets what it missed in each, in order per crew, tagged.
        """
        m = self.in_three()
        m.close()
        self.say(self.a1, "a1")
        self.say(self.b1, "b1")
        self.say(self.b1, "b2")
        self.say(self.c1, "c1")
        back = self.device("m")
        got = [(f["crew_code"], f["payload"]["text"]) for f in back.take() if f["type"] == "message"]
        self.assertEqual(sorted(got), [("ALPHA", "a1"), ("BRAVO", "b1"), ("BRAVO", "b2"), ("CHARLIE", "c1")])
        self.assertEqual([t for c, t in got if c == "BRAVO"], ["b1", "b2"])
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["ALPHA", "BRAVO", "CHARLIE"])

    def test_primary_kept(self):
        """
        The primary set with C{crew_primary} is still the primary after the
        device comes back, and it stays multi-crew.
        """
        m = self.in_three()
        m.send(type="crew_primary", crew_code="BRAVO")
        m.close()
        back = self.device("m")
        self.assertEqual(back.session.primary.crew.code, "BRAVO")
        back.send(type="join_crew", crew_code="ALPHA")
        self.assertEqual(len(back.session.memberships()), 3)

    def test_crew_left_not_reentered(self):
        """
        A crew left with C{crew_leave} is not re-entered.
        """
        m = self.in_three()
        m.send(type="crew_leave", crew_code="ALPHA")
        m.close()
        back = self.device("m")
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["BRAVO", "CHARLIE"])

    def test_legacy_device_comes_back_to_nothing_more(self):
        """
        A device that never sent C{crew_add} and registers again with no crew
        is in no crew, as before.
        """
        m = self.device("m", "ALPHA")
        m.close()
        back = self.device("m")
        self.assertEqual(back.session.memberships(), [])
        self.assertFalse(back.session.multi)

    def test_join_crew_comes_back_too(self):
        """
        Back on a new connection with C{join_crew} (not C{register}), a
        multi-crew device re-enters all its crews as well, and the crew it
        names is added.
        """
        self.device("d1", "DELTA")
        m = self.in_three()
        m.close()
        back = Device(self.relay, "192.0.2.7")
        back.send(type="join_crew", device_id="m", crew_code="DELTA")
        self.flush()
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["ALPHA", "BRAVO", "CHARLIE", "DELTA"])
        self.assertEqual(back.session.primary.crew.code, "ALPHA")

    def test_register_last_seq_is_for_its_crew(self):
        """
        A multi-crew device's C{register} with a crew and C{last_seq}
        resumes that crew after it; its other crews resume where they were.
        """
        m = self.in_three()
        self.say(self.b1, "b1")
        self.say(self.a1, "a1")
        m.take()
        m.prove()
        m.close()
        self.say(self.a1, "a2")
        back = self.device("m", "BRAVO", last_seq=0)
        got = sorted((f["crew_code"], f["payload"]["text"]) for f in back.take() if f["type"] == "message")
        self.assertEqual(got, [("ALPHA", "a2"), ("BRAVO", "b1")])


class RestartTests(MultiCrewTestCase):
    """
    What a multi-crew device is survives a restart of the relay on the same
    store (here in memory; on SQLite: tests/test_multicrew_store.py; a
    real twistd process: tests/test_durability.py).
    """

    def make_relay(self, **kwargs):
        if not hasattr(self, "store"):
            self.store = MemoryStore()
        kwargs.setdefault("store", self.store)
        return super().make_relay(**kwargs)

    def restart(self):
        """
        A new relay on the store (the old one crashed: its connections
        gone without a word); a1, b1 and c1 come back to their crews.
        """
        self.relay = self.make_relay()
        self.a1 = self.device("a1", "ALPHA")
        self.b1 = self.device("b1", "BRAVO")
        self.c1 = self.device("c1", "CHARLIE")
        for d in (self.a1, self.b1, self.c1):
            d.take()

    def test_reenters_all_three_after_restart(self):
        """
        After a relay restart the device re-enters all three crews and gets
        what it missed in each, in order per crew, tagged with its crew.
        """
        m = self.in_three()
        m.close()
        self.restart()
        self.say(self.a1, "a1")
        self.say(self.b1, "b1")
        self.say(self.b1, "b2")
        self.say(self.c1, "c1")
        back = self.device("m")
        got = [(f["crew_code"], f["payload"]["text"]) for f in back.take() if f["type"] == "message"]
        self.assertEqual(sorted(got), [("ALPHA", "a1"), ("BRAVO", "b1"), ("BRAVO", "b2"), ("CHARLIE", "c1")])
        self.assertEqual([t for c, t in got if c == "BRAVO"], ["b1", "b2"])
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["ALPHA", "BRAVO", "CHARLIE"])
        self.say(self.c1, "live")
        self.assertEqual([(f["crew_code"], f["payload"]["text"]) for f in back.take()], [("CHARLIE", "live")])

    def test_primary_survives(self):
        """
        The primary set with C{crew_primary} is the primary after a restart:
        a message naming no crew goes there.
        """
        m = self.in_three()
        m.send(type="crew_primary", crew_code="CHARLIE")
        m.close()
        self.restart()
        back = self.device("m")
        back.take()
        self.say(back, "default")
        self.assertEqual((self.a1.texts(), self.b1.texts(), self.c1.texts()), ([], [], ["default"]))
        back.send(type="crews")
        reply = back.last()
        self.assertEqual((reply["primary"], [c["crew_code"] for c in reply["crews"]]),
                         ("CHARLIE", ["ALPHA", "BRAVO", "CHARLIE"]))

    def test_still_multi_after_restart(self):
        """
        A device multi-crew before a restart is after it: C{join_crew} adds
        a crew, its other crews kept and not told it left.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.close()
        self.restart()
        back = self.device("m")
        self.a1.take()
        back.send(type="join_crew", crew_code="CHARLIE")
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["ALPHA", "BRAVO", "CHARLIE"])
        self.assertEqual(self.a1.take(), [])

    def test_multi_with_no_crew_survives(self):
        """
        A multi-crew device that left every crew is still multi-crew after
        a restart: its next two C{join_crew} add two crews.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.send(type="crew_leave", crew_code="ALPHA")
        m.send(type="crew_leave", crew_code="BRAVO")
        m.close()
        self.assertEqual(self.store.multi_crew["m"], MultiCrewRecord("m", (), None))
        self.restart()
        back = self.device("m")
        self.assertEqual(back.session.memberships(), [])
        back.send(type="join_crew", crew_code="BRAVO")
        back.send(type="join_crew", crew_code="CHARLIE")
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["BRAVO", "CHARLIE"])
        self.assertEqual(back.session.primary.crew.code, "BRAVO")

    def test_crew_left_ends_replay_after_restart(self):
        """
        A crew left with C{crew_leave} is neither re-entered after a
        restart nor replayed when added again: its member row is gone.
        """
        m = self.in_three()
        m.send(type="crew_leave", crew_code="BRAVO")
        self.say(self.b1, "while away")
        m.close()
        self.assertNotIn(("BRAVO", "m"), self.store.members)
        self.restart()
        back = self.device("m")
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["ALPHA", "CHARLIE"])
        back.take()
        back.send(type="crew_add", crew_code="BRAVO")
        self.flush()
        self.assertEqual(back.texts(), [])

    def test_legacy_device_still_moves_after_restart(self):
        """
        A device that never sent C{crew_add} is not multi-crew after a
        restart: it comes back to nothing more, and C{join_crew} moves it.
        """
        m = self.device("m", "ALPHA")
        m.send(type="join_crew", crew_code="BRAVO")
        m.close()
        self.restart()
        back = self.device("m")
        self.assertEqual((back.session.memberships(), back.session.multi), ([], False))
        back.send(type="join_crew", crew_code="ALPHA")
        back.send(type="join_crew", crew_code="CHARLIE")
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["CHARLIE"])
        self.assertNotIn("m", self.store.multi_crew)

    def test_forgotten_crew_not_reentered(self):
        """
        A crew the relay forgets (idle past its time) is dropped from a
        multi-crew device's crews, so a crew made again under its code is
        not entered for it.
        """
        m = self.device("m", "ALPHA")
        self.device("d1", "DELTA").close()
        m.send(type="crew_add", crew_code="DELTA")
        m.send(type="crew_primary", crew_code="DELTA")
        m.close()
        self.relay.crews_part.forget(self.relay.crews_part.crews["DELTA"])
        self.assertEqual(self.store.multi_crew["m"], MultiCrewRecord("m", ("ALPHA",), "ALPHA"))
        self.restart()
        self.device("x1", "DELTA")
        back = self.device("m")
        self.assertEqual([x.crew.code for x in back.session.memberships()], ["ALPHA"])

    def test_idle_device_forgotten_with_its_crews(self):
        """
        A multi-crew device in no crew whose id retention forgets (not seen
        for crew_ttl) is no longer stored as multi-crew.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.send(type="crew_leave", crew_code="ALPHA")
        m.send(type="crew_leave", crew_code="BRAVO")
        m.close()
        for d in (self.a1, self.b1, self.c1):
            d.close()
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertNotIn("m", self.relay.crews_part.multi)
        self.assertNotIn("m", self.store.multi_crew)

    def test_stored_once_per_change(self):
        """
        A multi-crew device coming back with nothing changed writes no
        multi-crew record; crew_leave deletes the member row.
        """
        m = self.in_three()
        m.close()
        writes = []
        original = self.store.write
        self.patch(self.store, "write", lambda ops: writes.extend(kind for kind, _ in ops) or original(ops))
        back = self.device("m")
        self.assertNotIn(PUT_MULTI_CREW, writes)
        back.send(type="crew_leave", crew_code="BRAVO")
        self.flush()
        self.assertEqual((writes.count(PUT_MULTI_CREW), writes.count(DELETE_MEMBER)), (1, 1))


class CrewNameTests(MultiCrewTestCase):
    """
    C{create_crew}'s C{crew_name}: at most 40 characters, carried by
    C{crews} and C{crew_joined}.
    """

    def named(self, name, code="NAMED"):
        creator = Device(self.relay, "192.0.2.8")
        creator.send(type="create_crew", device_id="n1", crew_code=code, crew_name=name)
        self.flush()
        return creator

    def test_crews_carries_name(self):
        """
        C{crews} lists each crew's name, null for one without.
        """
        self.named("The band")
        m = self.device("m", "NAMED")
        m.send(type="crew_add", crew_code="ALPHA")
        m.take()
        m.send(type="crews")
        self.assertEqual([(c["crew_code"], c["crew_name"]) for c in m.last()["crews"]],
                         [("NAMED", "The band"), ("ALPHA", None)])

    def test_crew_joined_carries_name(self):
        """
        C{join_crew} and C{crew_add} of a named crew are answered
        C{crew_joined} with its C{crew_name}.
        """
        self.named("  Old friends ")
        j = self.device("j")
        j.take()
        j.send(type="join_crew", crew_code="named")
        self.assertEqual(j.last()["crew_name"], "Old friends")
        a = self.device("a", "ALPHA")
        a.take()
        a.send(type="crew_add", crew_code="NAMED")
        self.assertEqual(a.last()["crew_name"], "Old friends")

    def test_unnamed_crew_joined_unchanged(self):
        """
        A crew with no name is answered C{crew_joined} exactly as before:
        no C{crew_name} field.
        """
        j = self.device("j")
        j.take()
        j.send(type="join_crew", crew_code="ALPHA")
        self.assertNotIn("crew_name", j.last())

    def test_at_most_40_characters(self):
        """
        A name of 40 characters is kept; one of 41 is C{invalid_message}
        saying the limit, and no crew is created.
        """
        self.named("x" * 40, "FORTY")
        self.assertEqual(self.relay.crews_part.crews["FORTY"].name, "x" * 40)
        error = self.named("x" * 41, "LONGER").last()
        self.assertEqual(error["error"], "invalid_message")
        self.assertIn("crew_name must be at most 40 characters", error["message"])
        self.assertNotIn("LONGER", self.relay.crews_part.crews)

    def test_not_a_string(self):
        """
        A C{crew_name} that is not a string is C{invalid_message}.
        """
        creator = self.named(7)
        self.assertEqual(creator.last()["error"], "invalid_message")

    def test_existing_crew_keeps_its_name(self):
        """
        C{create_crew} with a code that exists joins it; its name stays.
        """
        self.named("First")
        self.named("Second")
        self.assertEqual(self.relay.crews_part.crews["NAMED"].name, "First")

    def test_name_survives_restart(self):
        """
        A crew's name is stored: a relay restarted on the store lists it.
        """
        store = MemoryStore()
        self.relay = self.make_relay(store=store)
        self.named("Family")
        self.relay = self.make_relay(store=store)
        self.assertEqual(self.relay.crews_part.crews["NAMED"].name, "Family")


class MultiLimitTests(MultiCrewTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1000, 600), max_crews_per_device=2)

    def test_join_crew_past_the_limit(self):
        """
        A multi-crew device at the limit is answered C{crew_limit} by
        C{join_crew}, C{create_crew} and C{register} naming another crew,
        and stays in its crews; naming a crew it holds is fine.
        """
        m = self.device("m", "ALPHA")
        m.send(type="crew_add", crew_code="BRAVO")
        m.take()
        for frame in ({"type": "join_crew", "crew_code": "CHARLIE"}, {"type": "create_crew"},
                      {"type": "create_crew", "crew_code": "NEW"},
                      {"type": "register", "device_id": "m", "crew_code": "CHARLIE"}):
            m.send(**frame)
            self.assertEqual(m.last()["error"], "crew_limit", frame)
        self.assertEqual([x.crew.code for x in m.session.memberships()], ["ALPHA", "BRAVO"])
        self.assertEqual(self.c1.take(), [])
        m.send(type="join_crew", crew_code="BRAVO")
        self.assertEqual(m.last()["type"], "crew_joined")

    def test_legacy_device_has_no_limit_to_reach(self):
        """
        A device that never sent C{crew_add} moves as often as it likes.
        """
        m = self.device("m", "ALPHA")
        for code in ("BRAVO", "CHARLIE", "ALPHA"):
            m.send(type="join_crew", crew_code=code)
            self.assertEqual(m.last()["type"], "crew_joined")
