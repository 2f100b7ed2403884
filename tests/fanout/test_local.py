"""
The fan-out of one process: L{leeloo.fanout.local.LocalFanout}, and that the
core reaches members only through L{IFanout}.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from leeloo.core.peer import Outgoing
from leeloo.fanout import IFanout
from leeloo.fanout.local import LocalFanout
from leeloo.relay import Relay
from leeloo.testing import Device, FakePeer


class Listener:
    """
    What the fan-out needs of a listener: a membership's session, peer,
    held list and position.
    """

    def __init__(self, session=None):
        self.session = session if session is not None else object()
        self.peer = FakePeer()
        self.held = None
        self.last_sent_seq = 0


class LocalFanoutTests(SynchronousTestCase):
    def setUp(self):
        self.fanout = LocalFanout()

    def test_provides_the_interface(self):
        """
        LocalFanout provides every method of IFanout.
        """
        self.assertTrue(verifyObject(IFanout, self.fanout))

    def test_subscribe_and_listeners(self):
        """
        A crew's listeners are its subscribers by device id; the first one
        puts the crew online, the last to go takes it offline.
        """
        a, b = Listener(), Listener()
        self.assertTrue(self.fanout.subscribe("C", "a", a))
        self.assertFalse(self.fanout.subscribe("C", "b", b))
        self.assertEqual(dict(self.fanout.listeners("C")), {"a": a, "b": b})
        self.assertEqual(self.fanout.crews_online, 1)
        self.assertTrue(self.fanout.unsubscribe("C", "a", a))
        self.assertTrue(self.fanout.unsubscribe("C", "b", b))
        self.assertEqual(dict(self.fanout.listeners("C")), {})
        self.assertEqual(self.fanout.stats(), {"devices": 0, "crews_online": 0})

    def test_unsubscribe_only_the_current_listener(self):
        """
        A listener replaced for its device id (a newer connection) does not
        unsubscribe its successor.
        """
        old, new = Listener(), Listener()
        self.fanout.subscribe("C", "a", old)
        self.fanout.subscribe("C", "a", new)
        self.assertFalse(self.fanout.unsubscribe("C", "a", old))
        self.assertIs(self.fanout.listeners("C")["a"], new)

    def test_publish_to_all_but_the_sender(self):
        """
        A publication reaches every listener of the crew but the sender's,
        encoded once, and says how many it reached; other crews hear
        nothing.
        """
        sender = object()
        a, b, c = Listener(sender), Listener(), Listener()
        self.fanout.subscribe("C", "a", a)
        self.fanout.subscribe("C", "b", b)
        self.fanout.subscribe("D", "c", c)
        out = Outgoing({"type": "message", "seq": 1})
        self.assertEqual(self.fanout.publish("C", out, sender, seq=1), 1)
        self.assertEqual((a.peer.sent, b.peer.sent, c.peer.sent), ([], [{"type": "message", "seq": 1}], []))
        self.assertEqual(b.last_sent_seq, 1)
        self.assertEqual(self.fanout.publish("NONE", out), 0)

    def test_publish_waits_behind_a_replay(self):
        """
        A crew message for a listener still catching up waits in its held
        list; a presence message (seq 0) does not.
        """
        a = Listener()
        a.held = []
        self.fanout.subscribe("C", "a", a)
        out = Outgoing({"type": "message"})
        self.fanout.publish("C", out, seq=5)
        self.assertEqual((a.held, a.peer.sent, a.last_sent_seq), ([(5, out)], [], 0))
        self.fanout.publish("C", Outgoing({"type": "member_joined"}))
        self.assertEqual(a.peer.sent, [{"type": "member_joined"}])

    def test_claim_replaces(self):
        """
        Claiming a device id returns the connection it replaces; claiming
        it again with the same one returns none; releasing by a replaced
        connection leaves the newer one.
        """
        old, new = object(), object()
        self.assertIsNone(self.fanout.claim("d", old))
        self.assertIs(self.fanout.claim("d", new), old)
        self.assertIsNone(self.fanout.claim("d", new))
        self.assertFalse(self.fanout.release("d", old))
        self.assertIs(self.fanout.connection("d"), new)
        self.assertTrue(self.fanout.release("d", new))
        self.assertIsNone(self.fanout.connection("d"))

    def test_send_to_device(self):
        """
        A message for a device reaches its connection, and says whether it
        is connected.
        """
        class Session:
            def __init__(self):
                self.sent = []

            def send(self, message):
                self.sent.append(message)

        s = Session()
        self.fanout.claim("d", s)
        self.assertTrue(self.fanout.send_to_device("d", {"type": "x"}))
        self.assertFalse(self.fanout.send_to_device("other", {"type": "x"}))
        self.assertEqual(s.sent, [{"type": "x"}])


@implementer(IFanout)
class RecordingFanout(LocalFanout):
    """
    A LocalFanout that records which of IFanout's methods the core calls.
    """

    def __init__(self):
        super().__init__()
        self.calls = []
        for name in IFanout.names():
            method = getattr(self, name)
            setattr(self, name, self._recorder(name, method))

    def _recorder(self, name, method):
        def record(*args, **kwargs):
            self.calls.append(name)
            return method(*args, **kwargs)
        return record


class CoreThroughFanoutTests(SynchronousTestCase):
    def test_core_goes_through_the_fanout(self):
        """
        The relay claims device ids, subscribes members, publishes crew
        messages and presence, and hands Spotify tokens through the
        fan-out it is given.
        """
        clock = Clock()
        fanout = RecordingFanout()
        relay = Relay(clock, fanout=fanout, presence_grace=0)
        a, b = Device(relay), Device(relay)
        a.send(type="register", device_id="a", crew_code="C")
        b.send(type="join_crew", device_id="b", crew_code="C")
        a.send(type="message", payload={"text": "hi"})
        self.assertTrue(relay.deliver_tokens("b", {"access_token": "t"}))
        b.close()
        for name in ("claim", "subscribe", "publish", "send_to_device", "unsubscribe", "release"):
            self.assertIn(name, fanout.calls)
        self.assertEqual([m["type"] for m in a.take()],
                         ["registered", "member_joined", "member_offline"])
        self.assertEqual([m.get("payload", {}).get("text", m["type"]) for m in b.take()],
                         ["crew_joined", "hi", "spotify_auth_complete"])
        self.assertEqual(json.loads(json.dumps(fanout.stats())), {"devices": 1, "crews_online": 1})
