"""
L{leeloo.core.admission}: crew-entry budgets on every path into a crew,
the message rate, the bot API's join limit, and the strikes that close
a connection that keeps being refused.
"""

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from leeloo.limits import Rate, RelayLimits
from leeloo.messages import CLOSE_ABUSE, RateLimited
from leeloo.relay import Relay
from leeloo.testing import Device
from tests.core.support import BoundsTestCase, CoreTestCase


class CrewEntryLimitTests(CoreTestCase):
    limits = RelayLimits(entries=Rate.per_window(10, 600), abuse_strikes=5)

    def setUp(self):
        super().setUp()
        owner = self.device("192.0.2.1")
        owner.send(type="create_crew", crew_code="LEELOO-SAFE", device_id="owner")

    def guesses(self, device, path):
        """
        Try 30 wrong codes, then the right one, through C{path}.
        """
        replies = []
        for i in range(31):
            code = "LEELOO-SAFE" if i == 30 else f"LEELOO-{i:04d}"
            device.send(device_id="guesser", crew_code=code, **path)
            replies.extend(device.take())
            if device.peer.closed:
                break
        return replies

    def assertStopped(self, replies, device):
        codes = [r.get("error") for r in replies]
        self.assertIn("rate_limited", codes)
        self.assertNotIn("guesser", self.relay.crews["LEELOO-SAFE"].members)
        self.assertEqual(device.peer.closed[0], CLOSE_ABUSE)
        limited = [r for r in replies if r.get("error") == "rate_limited"][0]
        self.assertGreater(limited["retry_after"], 0)

    def test_join_crew_brute_force(self):
        """
        Guessing codes with join_crew is stopped after 10 attempts and the
        connection closed after repeated refusals.
        """
        d = self.device()
        replies = self.guesses(d, {"type": "join_crew"})
        self.assertEqual([r.get("error") for r in replies[:10]], ["invalid_crew_code"] * 10)
        self.assertStopped(replies, d)

    def test_abuse_close_logged_by_field(self):
        """
        The warning for a connection closed after repeated refusals names
        the client address and the last refusal's error code in the
        client_address and error_code fields.
        """
        d = self.device()
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.guesses(d, {"type": "join_crew"})
        [warning] = [e for e in events if "refusals" in e.get("log_format", "")]
        self.assertEqual((warning["client_address"], warning["error_code"]), ("203.0.113.5", "rate_limited"))

    def test_register_brute_force(self):
        """
        Guessing with register and a crew_code is stopped too.
        """
        d = self.device()
        self.assertStopped(self.guesses(d, {"type": "register"}), d)

    def test_create_crew_brute_force(self):
        """
        Guessing with create_crew naming existing codes is stopped too.
        """
        d = self.device()
        self.assertStopped(self.guesses(d, {"type": "create_crew"}), d)

    def test_per_address(self):
        """
        A fresh connection from the same address does not get a fresh
        budget.
        """
        first = self.device()
        for i in range(10):
            first.send(type="join_crew", crew_code=f"X{i}")
        second = self.device()
        second.send(type="join_crew", crew_code="LEELOO-SAFE")
        self.assertEqual(second.last()["error"], "rate_limited")
        other_address = self.device("198.51.100.99")
        other_address.send(type="join_crew", crew_code="LEELOO-SAFE")
        self.assertEqual(other_address.last()["type"], "crew_joined")

    def test_budget_refills(self):
        """
        The budget refills over the window.
        """
        d = self.device()
        d.send(type="register")  # bound: not closed by the bind timeout
        for i in range(10):
            d.send(type="join_crew", crew_code=f"X{i}")
        d.take()
        d.send(type="join_crew", crew_code="LEELOO-SAFE")
        self.assertEqual(d.last()["error"], "rate_limited")
        self.clock.advance(60)
        d.send(type="join_crew", crew_code="LEELOO-SAFE")
        self.assertEqual(d.last()["type"], "crew_joined")

    def test_members_come_back_free(self):
        """
        A member returning to its own crew never spends the budget.
        """
        d = self.device()
        d.send(type="join_crew", crew_code="LEELOO-SAFE", device_id="m")
        for _ in range(30):
            d.send(type="register", device_id="m", crew_code="LEELOO-SAFE")
        self.assertEqual(d.last()["type"], "registered")

    def test_bot_joins_limited(self):
        """
        The bot API's joins are limited per Telegram user.
        """
        for i in range(10):
            self.assertRaises(Exception, self.relay.bot_join_crew, "77", f"NOPE{i}", "T")
        error = self.assertRaises(RateLimited, self.relay.bot_join_crew, "77", "LEELOO-SAFE", "T")
        self.assertGreater(error.retry_after, 0)
        self.assertEqual(self.relay.bot_join_crew("78", "LEELOO-SAFE", "U")[0], "LEELOO-SAFE")

    def test_longer_codes(self):
        """
        crew_code_length makes new crews' codes longer.
        """
        relay = Relay(self.clock, limits=RelayLimits(crew_code_length=8))
        d = Device(relay, "203.0.113.5")
        d.send(type="create_crew")
        self.assertRegex(d.last()["crew_code"], r"^LEELOO-[A-HJ-NP-Z2-9]{8}$")


class MessageRateTests(CoreTestCase):
    limits = RelayLimits(messages=Rate(20.0, 40.0), abuse_strikes=10)

    def test_flood_limited_others_served(self):
        """
        A device flooding its crew is refused past its burst and then
        closed; the rest of the crew keeps being served.
        """
        flooder, a, b = self.device(), self.device(), self.device()
        for d, name in ((flooder, "f"), (a, "a"), (b, "b")):
            d.send(type="register", device_id=name, crew_code="HOME")
        for d in (flooder, a, b):
            d.take()
        for i in range(100):
            if flooder.peer.closed:
                break
            flooder.send(type="message", payload={"text": str(i)})
        refused = [m for m in flooder.take() if m.get("error") == "rate_limited"]
        self.assertEqual(len(refused), 10)
        self.assertEqual(flooder.peer.closed[0], CLOSE_ABUSE)
        self.assertEqual(len([m for m in b.take() if m["type"] == "message"]), 39)
        a.send(type="message", payload={"text": "still here"})
        self.assertEqual(b.take()[-1]["payload"], {"text": "still here"})

    def test_steady_rate_allowed(self):
        """
        A device within the rate is never refused.
        """
        d = self.device()
        d.send(type="register", device_id="d", crew_code="HOME")
        for _ in range(200):
            self.clock.advance(0.05)
            d.send(type="ping")
        self.assertNotIn("error", [m["type"] for m in d.take()])


class EntryBudgetTests(BoundsTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(3, 600))

    def test_create_without_code_counts(self):
        """
        create_crew without a code spends the connection's entry budget.
        """
        d = self.device()
        for _ in range(3):
            d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa")
            self.assertEqual(d.types(), ["crew_created"])
        d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa")
        [error] = d.take()
        self.assertEqual(error["error"], "rate_limited")

    def test_creates_count_per_address(self):
        """
        New connections from the same address share its entry budget.
        """
        for _ in range(3):
            d = self.device()
            d.send(type="create_crew", crew_code="X" + str(len(self.relay.crews)))
            self.assertEqual(d.types(), ["crew_created"])
        d = self.device()
        d.send(type="create_crew")
        self.assertEqual(d.take()[0]["error"], "rate_limited")
        other = self.device("192.0.2.99")
        other.send(type="create_crew")
        self.assertEqual(other.types(), ["crew_created"])

    def test_returning_member_create_free(self):
        """
        A member's create_crew naming its own crew (a deployed device
        coming back) costs nothing.
        """
        d = self.device()
        d.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code="HOME")
        d.take()
        for _ in range(5):
            again = self.device("192.0.2.1")
            again.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code="HOME")
            self.assertEqual(again.types(), ["crew_created"])

    def test_register_new_device_ids_count(self):
        """
        Registering device ids the relay has never seen spends the budget;
        a known id registers freely.
        """
        for i in range(3):
            d = self.device()
            d.send(type="register", device_id=f"leeloo_{i:012x}")
            self.assertEqual(d.types(), ["registered"])
        d = self.device()
        d.send(type="register", device_id="leeloo_ffffffffffff")
        self.assertEqual(d.take()[0]["error"], "rate_limited")
        d = self.device()
        d.send(type="register")
        self.assertEqual(d.take()[0]["error"], "rate_limited")
        known = self.device()
        known.send(type="register", device_id="leeloo_000000000000")
        self.assertEqual(known.types(), ["registered"])


class RefusedCreateTests(BoundsTestCase):
    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1, 600))

    def test_refused_create_searches_no_code(self):
        """
        A create_crew refused by the entry budget does not search for a code.
        """
        calls = []
        self.relay = self.make_relay(crew_code=lambda length: calls.append(length) or f"LEELOO-{len(calls)}")
        d = self.device()
        d.send(type="create_crew")
        d.take()
        del calls[:]
        d.send(type="create_crew")
        self.assertEqual((d.take()[0]["error"], calls), ("rate_limited", []))
