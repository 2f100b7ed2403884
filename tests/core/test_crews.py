"""
L{leeloo.core.crews}: crew codes, membership (entering, leaving,
switching crews), fan-out to a crew's members, and how many crews have
a member online.
"""

from twisted.trial.unittest import SynchronousTestCase

from leeloo.core.crews import generate_crew_code
from leeloo.core.defaults import CODE_TRIES, MAX_GENERATED_CODE_LENGTH, PRESENCE_GRACE
from leeloo.messages import CrewLimit
from leeloo.relay import Relay
from leeloo.store import StoreError
from leeloo.testing import Device
from tests.core.support import BoundsTestCase, DeliveryTestCase, RelayTestCase


class IdentifierTests(SynchronousTestCase):
    def test_crew_code_format(self):
        """
        Generated crew codes are LEELOO- and four unambiguous characters.
        """
        for _ in range(200):
            self.assertRegex(generate_crew_code(), r"^LEELOO-[ABCDEFGHJKLMNPQRSTUVWXYZ23456789]{4}$")


class CreateCrewTests(RelayTestCase):
    def test_generated_codes_do_not_collide(self):
        """
        A generated code never names a crew that already exists.
        """
        codes = iter(["LEELOO-AAAA", "LEELOO-AAAA", "LEELOO-BBBB"])
        relay = Relay(self.clock, crew_code=lambda length: next(codes))
        a, b = Device(relay, "127.0.0.1"), Device(relay, "127.0.0.1")
        a.send(type="create_crew")
        b.send(type="create_crew")
        self.assertEqual([a.take()[0]["crew_code"], b.take()[0]["crew_code"]], ["LEELOO-AAAA", "LEELOO-BBBB"])


class CrewCodeTests(BoundsTestCase):
    def test_longer_code_when_taken(self):
        """
        When random codes keep naming existing crews, the relay tries a
        few, then makes codes one character longer.
        """
        calls = []

        def same(length):
            calls.append(length)
            return "LEELOO-" + "A" * length

        self.relay = self.make_relay(crew_code=same)
        a, b = self.device(), self.device()
        a.send(type="create_crew")
        b.send(type="create_crew")
        self.assertEqual([a.take()[0]["crew_code"], b.take()[0]["crew_code"]], ["LEELOO-AAAA", "LEELOO-AAAAA"])
        self.assertEqual(calls, [4] + [4] * CODE_TRIES + [5])

    def test_codes_run_out(self):
        """
        When no code up to the longest is free, create_crew is answered
        crew_limit after a bounded number of tries, and the connection
        still works.
        """
        calls = []

        def one(length):
            calls.append(length)
            if len(calls) > 1000:
                raise AssertionError("the code search does not end")
            return "LEELOO-ONLY"

        self.relay = self.make_relay(crew_code=one)
        a, b = self.device(), self.device()
        a.send(type="create_crew")
        del calls[:]
        b.send(type="create_crew")
        [error] = b.take()
        self.assertEqual(error["error"], "crew_limit")
        self.assertEqual(len(calls), CODE_TRIES * (MAX_GENERATED_CODE_LENGTH - 4 + 1))
        b.send(type="ping")
        self.assertEqual(b.take(), [{"type": "pong"}])

    def test_bot_codes_run_out(self):
        """
        The bot API's crew creation gives up with CrewLimit too.
        """
        self.relay = self.make_relay(crew_code=lambda length: "LEELOO-ONLY")
        self.successResultOf(self.relay.bot_create_crew("1", "Tina"))
        self.assertRaises(CrewLimit, self.relay.bot_create_crew, "2", "Tom")


class JoinCrewTests(RelayTestCase):
    def test_switching_crews(self):
        """
        Joining another crew leaves the first: it hears member_offline (once
        the presence grace has passed) and no longer receives the device's
        messages.
        """
        a, b = self.crew_of(2, "ALPHA")
        [c] = self.crew_of(1, "BETA")
        b.send(type="join_crew", crew_code="BETA")
        self.clock.advance(PRESENCE_GRACE)
        self.assertEqual(a.take(), [{"type": "member_offline", "device_id": "dev1", "display_name": "Dev 1", "crew_code": "ALPHA"}])
        b.send(type="reaction", reaction_type="fire")
        self.assertEqual(a.take(), [])
        self.assertEqual(c.take()[-1]["type"], "reaction")


class DisconnectTests(RelayTestCase):
    def test_crew_survives_everyone_leaving(self):
        """
        A crew stays known after its last member disconnects, and can be
        joined again.
        """
        [a] = self.crew_of(1)
        a.close()
        self.assertEqual(self.relay.stats().crews, 1)
        d = self.device()
        d.send(type="join_crew", crew_code="ALPHA")
        self.assertEqual(d.take()[0]["crew_members"], 1)


class FanoutTests(RelayTestCase):
    def test_only_the_crew(self):
        """
        A crew's traffic never reaches another crew.
        """
        a, b = self.crew_of(2, "ALPHA")
        [c] = self.crew_of(1, "BETA")
        a.send(type="reaction", reaction_type="love")
        self.assertEqual(len(b.take()), 1)
        self.assertEqual(c.take(), [])

    def test_encoded_once(self):
        """
        One fan-out encodes its message once: every member gets the same
        bytes object.
        """
        a, b, c = self.crew_of(3)
        a.send(type="message", payload={"text": "x"})
        self.assertIs(b.peer.payloads[-1], c.peer.payloads[-1])


class HealthTests(RelayTestCase):
    def test_crews_online_counts_crews_with_a_member_online(self):
        """
        crews_online counts the crews with at least one member connected
        now: a crew whose members have all gone offline is known but not
        online, and counts again when one comes back.
        """
        [a1, a2] = self.crew_of(2, "A")
        [b] = self.crew_of(1, "B")
        a1.close()
        self.assertEqual(self.relay.stats().crews_online, 2)
        a2.close()
        self.assertEqual((self.relay.stats().crews, self.relay.stats().crews_online), (2, 1))
        back = self.device()
        back.send(type="join_crew", crew_code="A", device_id="dev9", display_name="Nine")
        self.assertEqual(self.relay.stats().crews_online, 2)

    def test_crews_online_after_a_replaced_connection(self):
        """
        A device whose newer connection replaces its older one keeps its
        crew counted once; the crew stops counting when it leaves.
        """
        self.crew_of(1, "A")
        again = self.device()
        again.send(type="register", device_id="dev0", crew_code="A")
        self.assertEqual(self.relay.stats().crews_online, 1)
        again.close()
        self.assertEqual(self.relay.stats().crews_online, 0)

    def test_crews_online_after_a_move(self):
        """
        A device that moves to another crew takes the online count with it.
        """
        [d] = self.crew_of(1, "A")
        self.crew_of(0, "B")
        d.send(type="create_crew", crew_code="B")
        self.assertEqual((self.relay.stats().crews, self.relay.stats().crews_online), (2, 1))
        d.close()
        self.assertEqual(self.relay.stats().crews_online, 0)


class StoreFailureTests(DeliveryTestCase):
    def test_state_retried(self):
        """
        Crew and membership writes that fail are retried until the store
        recovers.
        """
        self.store.fail_with = StoreError("locked")
        self.device("a", crew="NEWCREW")
        self.assertNotIn("NEWCREW", self.store.crews)
        self.store.fail_with = None
        self.clock.advance(1)
        self.assertIn("NEWCREW", self.store.crews)
        self.assertIn(("NEWCREW", "a"), self.store.members)
