"""
L{leeloo.core.tokens}: Spotify tokens for a device, sent at once or
parked until it comes back within the hour.
"""

from leeloo.testing import strip_keys
from tests.core.support import RelayTestCase


class TokenTests(RelayTestCase):
    tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}

    def test_online_device_gets_tokens(self):
        """
        Tokens for an online device are sent to it at once.
        """
        d = self.device()
        d.send(type="register", device_id="d")
        d.take()
        self.assertTrue(self.relay.deliver_tokens("d", self.tokens))
        self.assertEqual(d.take(), [{"type": "spotify_auth_complete", "tokens": self.tokens}])

    def test_offline_device_gets_tokens_on_return(self):
        """
        Tokens for an offline device are kept and delivered once, right
        after its next register, create_crew or join_crew reply.
        """
        [member] = self.crew_of(1)
        for i, fields in enumerate([
            {"type": "register"},
            {"type": "create_crew"},
            {"type": "join_crew", "crew_code": "ALPHA"},
        ]):
            device_id = f"off{i}"
            self.assertFalse(self.relay.deliver_tokens(device_id, self.tokens))
            d = self.device()
            d.send(device_id=device_id, **fields)
            replies = d.take()
            self.assertEqual(replies[-1], {"type": "spotify_auth_complete", "tokens": self.tokens})
            self.assertEqual(len(replies), 2)
            d.close()
            d2 = self.device()
            d2.send(type="register", device_id=device_id)
            self.assertEqual(len(d2.take()), 1)

    def test_tokens_expire_after_an_hour(self):
        """
        A device that comes back after the hour gets no tokens.
        """
        self.relay.deliver_tokens("late", self.tokens)
        self.clock.advance(3601)
        d = self.device()
        d.send(type="register", device_id="late")
        self.assertEqual(strip_keys(d.take()), [{"type": "registered", "device_id": "late"}])

    def test_expire_forgets_stale_tokens(self):
        """
        expire() forgets tokens past their hour and keeps fresh ones.
        """
        self.relay.deliver_tokens("old", self.tokens)
        self.clock.advance(1800)
        self.relay.deliver_tokens("new", self.tokens)
        self.clock.advance(1801)
        self.assertEqual(self.relay.expire(), 1)
        self.assertEqual(list(self.relay.pending_tokens), ["new"])
