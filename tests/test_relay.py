"""
The relay facade, L{leeloo.relay.Relay}: it decodes each frame and
dispatches it to the core's parts, answers malformed and binary frames
with the contract's errors, and counts what C{health} reports.  The
parts themselves are tested in L{tests.core}.
"""

from leeloo import web
from tests.core.support import RelayTestCase


class RefusalTests(RelayTestCase):
    def test_errors_keep_session(self):
        """
        Each bad frame gets an error with the contract's code, and the
        session keeps working afterwards.
        """
        a, b = self.crew_of(2)
        cases = [
            (b"not json", "invalid_json"),
            (b"[1,2]", "invalid_message"),
            (b'{"device_id":"x"}', "invalid_message"),
            (b'{"type":"warp"}', "unknown_type"),
            (b'{"type":"register","device_id":["x"]}', "invalid_message"),
            (b'{"type":"message","payload":"text"}', "invalid_message"),
        ]
        for data, code in cases:
            a.send_frame(data)
            [reply] = a.take()
            self.assertEqual((reply["type"], reply["error"]), ("error", code))
            self.assertIsInstance(reply["message"], str)
        self.assertEqual(b.take(), [])
        a.send(type="reaction", reaction_type="love")
        self.assertEqual(b.take()[0]["type"], "reaction")

    def test_binary(self):
        """
        A binary frame gets binary_not_supported.
        """
        d = self.device()
        self.relay.receive_binary(d.session)
        self.assertEqual(d.take()[0]["error"], "binary_not_supported")


class HealthTests(RelayTestCase):
    def test_health(self):
        """
        health counts connected devices and known crews, and the uptime.
        """
        self.crew_of(2, "A")
        self.crew_of(1, "B")
        self.clock.advance(42)
        self.assertEqual(web.health(self.relay.stats()),
                         {"status": "ok", "devices": 3, "crews": 2, "crews_online": 2, "uptime": 42})


class StoreFigureTests(RelayTestCase):
    def test_store_figures(self):
        """
        The store journal's queue and batch times are among the relay's
        figures.
        """
        from leeloo.relay import Relay
        from tests.core.support import HeldStore

        store = HeldStore()
        self.relay = Relay(self.clock, store)
        self.crew_of(1)
        self.assertGreater(self.relay.stats().store.queue_depth, 0)
        while store.held:
            self.clock.advance(0.01)
            store.held.pop(0).callback(None)
        stats = self.relay.stats().store
        self.assertEqual(stats.queue_depth, 0)
        self.assertGreater(stats.batch_seconds.count, 0)
        self.assertAlmostEqual(stats.batch_seconds.sum, 0.01 * stats.batch_seconds.count)
