"""
L{leeloo.core.identity}: device ids, and their keys, trusted on first use.
"""

from twisted.trial.unittest import SynchronousTestCase

from leeloo.core.identity import generate_device_id, key_hash
from leeloo.limits import RelayLimits
from leeloo.messages import CLOSE_REPLACED
from leeloo.relay import Relay
from leeloo.testing import Device
from tests.core.support import T0, CoreTestCase


class IdentifierTests(SynchronousTestCase):
    def test_device_id_format(self):
        """
        Generated device ids are leeloo_ and 12 hex digits.
        """
        self.assertRegex(generate_device_id(), r"^leeloo_[0-9a-f]{12}$")


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
