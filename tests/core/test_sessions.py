"""
L{leeloo.core.sessions}: connections, the bind timeout, a device's newer
connection replacing its older one, and shutdown closing everyone
without a reconnect storm.
"""

from leeloo.messages import CLOSE_BIND_TIMEOUT, CLOSE_GOING_AWAY, CLOSE_REPLACED
from leeloo.relay import Relay
from leeloo.testing import Device, FakePeer
from tests.core.support import RelayTestCase


class DisconnectTests(RelayTestCase):
    def test_reconnect_replaces(self):
        """
        A second connection with the same device id replaces the first: the
        old one is closed with 4001 and the crew hears no member_offline.
        """
        a, b = self.crew_of(2)
        again = self.device()
        again.send(type="register", device_id="dev0", crew_code="ALPHA")
        self.assertEqual(a.peer.closed[0], CLOSE_REPLACED)
        a.close()
        self.assertEqual(b.take(), [])
        b.send(type="reaction", reaction_type="love")
        self.assertEqual(again.take()[-1]["type"], "reaction")
        self.assertEqual(a.take(), [])

    def test_shutdown_closes_everyone(self):
        """
        shutdown closes every connection with 1001 going away, and fires
        once they are all closed and the store is flushed.
        """
        a, b = self.crew_of(2)
        idle = self.device()
        done = self.relay.shutdown()
        self.clock.advance(2)
        for d in (a, b, idle):
            self.assertEqual(d.peer.closed[0], CLOSE_GOING_AWAY)
            d.close()
        self.successResultOf(done)

    def test_shutdown_waits_for_every_connection_to_go(self):
        """
        shutdown fires only once every connection it closed has gone (its
        transport wrote the close and the connection ended), not when the
        last close was asked for.
        """
        devices = self.crew_of(3)
        done = self.relay.shutdown(spread=0)
        self.assertTrue(all(d.peer.closed for d in devices))
        devices[0].close()
        devices[1].close()
        self.clock.advance(5)
        self.assertNoResult(done)
        devices[2].close()
        self.successResultOf(done)
        self.assertEqual(self.relay.sessions, set())

    def test_shutdown_gives_up_on_a_connection_after_grace(self):
        """
        A connection still open C{grace} seconds after it was closed is
        given up on: shutdown fires, and the device is offline in its crew.
        """
        a, b = self.crew_of(2)
        done = self.relay.shutdown(spread=0, grace=3)
        b.close()
        self.clock.advance(2.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)
        self.assertEqual((self.relay.sessions, self.relay.devices), (set(), {}))
        self.assertEqual(self.relay.crew_status("ALPHA").device_names, [])

    def test_connection_opening_during_shutdown_is_closed(self):
        """
        A connection that opens while the relay stops is closed with 1001
        at once, and shutdown waits for it too.
        """
        a = self.device()
        done = self.relay.shutdown(spread=0)
        late = self.device()
        self.assertEqual(late.peer.closed[0], CLOSE_GOING_AWAY)
        a.close()
        self.assertNoResult(done)
        late.close()
        self.successResultOf(done)

    def test_shutdown_spreads_closes(self):
        """
        shutdown spreads its closes over the spread window, so the fleet
        does not reconnect in one burst.
        """
        devices = self.crew_of(100)
        done = self.relay.shutdown(spread=2.0, steps=10)
        closed_at_start = sum(d.peer.closed is not None for d in devices)
        self.clock.advance(1.0)
        closed_halfway = sum(d.peer.closed is not None for d in devices)
        self.assertNoResult(done)
        self.clock.advance(1.0)
        self.assertEqual(closed_at_start, 10)
        self.assertEqual(closed_halfway, 60)
        self.assertTrue(all(d.peer.closed for d in devices))
        for d in devices:
            d.close()
        self.successResultOf(done)


class BindTimeoutTests(RelayTestCase):
    def test_unbound_closed(self):
        """
        A connection that binds no device within the bind timeout is closed
        with 4008.
        """
        idle = self.device()
        self.clock.advance(59.9)
        self.assertIsNone(idle.peer.closed)
        self.clock.advance(0.1)
        self.assertEqual(idle.peer.closed[0], CLOSE_BIND_TIMEOUT)

    def test_failed_entries_do_not_bind(self):
        """
        A join_crew that is refused (and a create_crew fallback refused
        too) binds nothing: the connection is still closed.
        """
        d = self.device()
        d.send(type="join_crew", crew_code="nowhere")
        d.send(type="create_crew", crew_code="a\u0000b")
        self.assertEqual([m["error"] for m in d.take()], ["invalid_crew_code", "invalid_crew_code"])
        self.clock.advance(60)
        self.assertEqual(d.peer.closed[0], CLOSE_BIND_TIMEOUT)

    def test_bound_stays(self):
        """
        register, create_crew or join_crew within the timeout keep the
        connection open.
        """
        self.crew_of(1, "HOME")
        devices = [self.device() for _ in range(3)]
        devices[0].send(type="register")
        devices[1].send(type="create_crew")
        devices[2].send(type="join_crew", crew_code="home")
        self.clock.advance(3600)
        self.assertEqual([d.peer.closed for d in devices], [None, None, None])

    def test_closed_connection_cancels(self):
        """
        A connection that closes before the timeout leaves no timer behind.
        """
        d = self.device()
        d.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_off(self):
        """
        A bind timeout of 0 never closes anyone.
        """
        relay = Relay(self.clock, bind_timeout=0)
        d = Device(relay, "127.0.0.1")
        self.clock.advance(86400)
        self.assertIsNone(d.peer.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ShutdownWaitTests(RelayTestCase):
    def test_waits_for_answers(self):
        """
        Shutdown fires once every connection is gone (the
        devices answered the close), not before.
        """
        a, b = self.crew_of(2)
        done = self.relay.shutdown(spread=0, grace=5)
        self.assertNoResult(done)
        a.close()
        self.assertNoResult(done)
        b.close()
        self.successResultOf(done)

    def test_gives_up(self):
        """
        shutdown waits at most its grace for connections to go.
        """
        self.crew_of(2)
        done = self.relay.shutdown(spread=0, grace=5)
        self.clock.advance(4.9)
        self.assertNoResult(done)
        self.clock.advance(0.1)
        self.successResultOf(done)


class ConnectTests(RelayTestCase):
    def test_connect_all_or_nothing(self):
        """
        A connection whose registration fails part-way (here its peer
        raising when a stopping relay closes it) leaves nothing behind: no
        session and no bind timer.
        """
        class BrokenPeer(FakePeer):
            def close(self, code, reason):
                raise ZeroDivisionError("a bug")

        self.relay.shutdown(spread=0)
        self.assertRaises(ZeroDivisionError, self.relay.connect, BrokenPeer())
        self.assertEqual(self.relay.sessions, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
