"""
L{leeloo.core.retention}: what the relay forgets, and when: old log
entries, idle crews, unused device ids.
"""

from leeloo.core.defaults import DAY
from tests.core.support import BoundsTestCase, DeliveryTestCase


class RetentionTests(DeliveryTestCase):
    def test_prune_old_messages(self):
        """
        prune drops log entries older than the retention window, keeping
        each crew's newest.
        """
        a = self.device("a")
        for text in ("1", "2", "3"):
            self.say(a, text)
        self.clock.advance(8 * DAY)
        self.say(a, "4")
        deleted, crews = self.successResultOf(self.relay.prune())
        self.assertEqual((deleted, crews), (3, 0))
        self.assertEqual([e.seq for e in self.store.log["ALPHA"]], [4])

    def test_newest_client_msg_id_remembered(self):
        """
        The crew's newest message (which the store keeps past retention)
        stays known by its client_msg_id: a resend of it is answered sent,
        not stored again.
        """
        a = self.device("a")
        self.say(a, "only", client_msg_id="c1")
        a.take()
        self.clock.advance(8 * DAY)
        self.successResultOf(self.relay.prune())
        self.say(a, "only", client_msg_id="c1")
        self.assertEqual(a.take()[0]["type"], "sent")
        self.assertEqual(len(self.store.log["ALPHA"]), 1)

    def test_prune_idle_crews(self):
        """
        A crew with no message and no member seen for crew_ttl is forgotten,
        in memory and in the store; an active crew is kept.
        """
        self.device("a", crew="OLD").close()
        self.clock.advance(80 * DAY)
        busy = self.device("b", crew="BUSY")
        self.clock.advance(11 * DAY)
        deleted, crews = self.successResultOf(self.relay.prune())
        self.assertEqual(crews, 1)
        self.assertNotIn("OLD", self.relay.crews)
        self.assertNotIn("OLD", self.store.crews)
        self.assertIn("BUSY", self.relay.crews)
        busy.send(type="ping")
        self.assertEqual(busy.take()[-1], {"type": "pong"})


class DevicePruneTests(BoundsTestCase):
    def test_unused_device_pruned(self):
        """
        A device id in no crew and not seen for the crew TTL is forgotten,
        in memory and in the store.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        d.close()
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertNotIn("leeloo_aaaaaaaaaaaa", self.relay.device_keys)
        self.assertNotIn("leeloo_aaaaaaaaaaaa", self.store.devices)

    def test_seen_device_kept(self):
        """
        A device id in no crew that registered within the crew TTL is kept.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        d.close()
        self.clock.advance(self.relay.crew_ttl - DAY)
        again = self.device()
        again.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        again.close()
        self.clock.advance(2 * DAY)
        self.successResultOf(self.relay.prune())
        self.assertIn("leeloo_aaaaaaaaaaaa", self.store.devices)

    def test_member_device_kept(self):
        """
        A device that belongs to a crew keeps its record, however long ago
        it was created.
        """
        self.member("leeloo_aaaaaaaaaaaa").close()
        self.member("leeloo_bbbbbbbbbbbb")
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertIn("leeloo_aaaaaaaaaaaa", self.store.devices)

    def test_online_device_kept(self):
        """
        A device online now keeps its record.
        """
        d = self.device()
        d.send(type="register", device_id="leeloo_aaaaaaaaaaaa")
        self.clock.advance(self.relay.crew_ttl + 1)
        self.successResultOf(self.relay.prune())
        self.assertIn("leeloo_aaaaaaaaaaaa", self.relay.device_keys)
