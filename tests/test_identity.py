"""
Letting no one in where they don't belong, in the core: device keys (trust
on first use), crew-entry limits on every path into a crew, the message
rate limit, and the bot API's join limit.
"""

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from leeloo.limits import Bucket, Limiter, Rate, RelayLimits
from leeloo.messages import RateLimited
from leeloo.relay import CLOSE_ABUSE, CLOSE_REPLACED, Relay, key_hash
from leeloo.store import MemoryStore
from leeloo.testing import Device

T0 = 1_700_000_000.0


class CoreTestCase(SynchronousTestCase):
    limits = RelayLimits()

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.relay = Relay(self.clock, self.store, limits=self.limits)

    def device(self, address="203.0.113.5"):
        return Device(self.relay, address)


class BucketTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """
        A bucket allows a burst, then one action per 1/rate seconds, and
        says how long to wait.
        """
        rate = Rate(2.0, 3.0)
        bucket = Bucket(rate.burst, 0.0)
        self.assertEqual([bucket.take(0.0, rate) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(bucket.take(0.0, rate), 0.5)
        self.assertEqual(bucket.take(0.5, rate), 0.0)

    def test_limiter_forgets_full_buckets(self):
        """
        Limiter.sweep forgets keys whose buckets have refilled.
        """
        clock = Clock()
        limiter = Limiter(clock, Rate.per_window(10, 600))
        limiter.take("a")
        clock.advance(30)
        limiter.take("b")
        clock.advance(40)
        self.assertEqual(limiter.sweep(), 1)
        self.assertEqual(list(limiter.buckets), ["b"])


class DeviceKeyTests(CoreTestCase):
    def test_key_issued_to_new_device(self):
        """
        A device id without a key is issued one in its reply; only its hash
        is stored.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_000000000001")
        reply = d.last()
        key = reply["device_key"]
        self.assertGreaterEqual(len(key), 32)
        record = self.store.devices["leeloo_000000000001"]
        self.assertEqual(record.key_hash, key_hash(key))
        self.assertFalse(record.bound)
        self.assertNotIn(key, repr(self.store.__dict__))

    def test_key_in_every_reply_kind(self):
        """
        crew_created and crew_joined carry device_key too.
        """
        a, b = self.device(), self.device()
        a.send(type="create_crew", device_id="a")
        created = a.last()
        b.send(type="join_crew", crew_code=created["crew_code"], device_id="b")
        self.assertIn("device_key", created)
        self.assertIn("device_key", b.last())

    def test_bound_key_required(self):
        """
        Once a device has presented its key, a connection claiming its id
        without the key, or with a wrong one, is refused with
        device_auth_failed, and the real device's connection, crew and
        tokens are untouched.
        """
        real = self.device()
        real.send(type="register", device_id="victim")
        key = real.last()["device_key"]
        real.send(type="register", device_id="victim", crew_code="HOME", device_key=key)
        self.assertNotIn("device_key", real.take()[0])
        self.assertTrue(self.store.devices["victim"].bound)
        friend = self.device()
        friend.send(type="register", device_id="friend", crew_code="HOME")
        friend.take()
        self.relay.pending_tokens["victim"] = ({"access_token": "t"}, T0 + 3600)
        for attempt in ({}, {"device_key": "guess"}):
            thief = self.device("198.51.100.7")
            thief.send(type="register", device_id="victim", crew_code="HOME", **attempt)
            [reply] = thief.take()
            self.assertEqual((reply["type"], reply["error"]), ("error", "device_auth_failed"))
        self.assertIsNone(real.peer.closed)
        self.assertIs(self.relay.devices["victim"], real.session)
        self.assertIn("victim", self.relay.pending_tokens)
        friend.send(type="reaction", reaction_type="love")
        self.assertEqual(real.last()["type"], "reaction")

    def test_key_survives_restart(self):
        """
        A bound key is still required after a restart.
        """
        d = self.device()
        d.send(type="register", device_id="dev")
        d.send(type="register", device_id="dev", device_key=d.take()[0]["device_key"])
        relay = Relay(self.clock, self.store)
        thief = Device(relay, "203.0.113.5")
        thief.send(type="register", device_id="dev")
        self.assertEqual(thief.last()["error"], "device_auth_failed")

    def test_reboot_with_key_replaces(self):
        """
        The same device reconnecting with its key replaces its old
        connection (closed 4001) without a member_offline.
        """
        old = self.device()
        old.send(type="register", device_id="dev", crew_code="HOME")
        key = old.take()[0]["device_key"]
        old.send(type="register", device_id="dev", device_key=key)
        friend = self.device()
        friend.send(type="register", device_id="friend", crew_code="HOME")
        friend.take()
        new = self.device()
        new.send(type="register", device_id="dev", crew_code="HOME", device_key=key)
        self.assertEqual(old.peer.closed[0], CLOSE_REPLACED)
        self.assertEqual(friend.take(), [])
        self.assertEqual(new.take()[0], {"type": "registered", "device_id": "dev"})

    def test_legacy_devices_keep_working(self):
        """
        A deployed device that never sends a key keeps working, and is
        issued a fresh key each time (it ignores it).
        """
        for _ in range(2):
            d = self.device()
            d.send(type="register", device_id="old", crew_code="HOME")
            self.assertEqual(d.last()["type"], "registered")
            d.close()

    def test_require_device_key(self):
        """
        With require_device_key, a legacy id is refused, while a new device
        (no id) gets an id and a key.
        """
        relay = Relay(self.clock, self.store, limits=RelayLimits(require_device_key=True))
        legacy = Device(relay, "203.0.113.5")
        legacy.send(type="register", device_id="old")
        self.assertEqual(legacy.last()["error"], "device_auth_failed")
        fresh = Device(relay, "203.0.113.5")
        fresh.send(type="register")
        reply = fresh.last()
        self.assertEqual(reply["type"], "registered")
        again = Device(relay, "203.0.113.5")
        again.send(type="register", device_id=reply["device_id"], device_key=reply["device_key"])
        self.assertEqual(again.last(), {"type": "registered", "device_id": reply["device_id"]})

    def test_unknown_key_binds(self):
        """
        A device presenting a key for an id the relay has no record of (its
        state was lost) has that key bound.
        """
        d = self.device()
        d.send(type="register", device_id="dev", device_key="k" * 32)
        self.assertEqual(d.last(), {"type": "registered", "device_id": "dev"})
        self.assertEqual(self.store.devices["dev"].key_hash, key_hash("k" * 32))
        self.assertTrue(self.store.devices["dev"].bound)


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
