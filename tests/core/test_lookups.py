"""
The store as the authority: what one relay does not hold, it looks up in
the store (another node sharing the engine made it), and a connection's
frames are handled in arrival order while a lookup waits.

Two L{Relay}s on one L{MemoryStore} stand for two nodes of one engine.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.relay import Relay
from leeloo.sealing import Sealer
from leeloo.store import MemoryStore, StoreError
from leeloo.testing import Device

T0 = 1_700_000_000.0


class SlowStore(MemoryStore):
    """
    A shared engine whose lookups answer when the test says so.
    """

    def __init__(self):
        super().__init__()
        self.slow = False
        self.waiting: list[tuple[Deferred, Deferred]] = []

    def _later(self, answer):
        if not self.slow:
            return answer
        later = Deferred()
        self.waiting.append((answer, later))
        return later

    def find_crew(self, code):
        return self._later(super().find_crew(code))

    def find_device(self, device_id):
        return self._later(super().find_device(device_id))

    def answer(self):
        waiting, self.waiting = self.waiting, []
        for answer, later in waiting:
            later.callback(answer)


class TwoNodesTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)
        self.store = SlowStore()
        # Nodes on one store share its secrets key (--secrets-key-file).
        sealer = Sealer()
        self.a = Relay(self.clock, self.store, presence_grace=0, sealer=sealer)
        self.b = Relay(self.clock, self.store, presence_grace=0, sealer=sealer)

    def device(self, relay, device_id, **join):
        d = Device(relay, "127.0.0.1")
        if join:
            d.send(type="join_crew", device_id=device_id, display_name=device_id, **join)
        return d


class CrewLookupTests(TwoNodesTestCase):
    def test_crew_made_on_another_node(self):
        """
        A crew created on node A (durable there) is found by node B, which
        did not hold it: a device on B joins it with its members known.
        """
        ann = Device(self.a, "127.0.0.1")
        ann.send(type="create_crew", device_id="ann", display_name="Ann", crew_code="HOME")
        self.clock.advance(1)
        self.assertEqual([m["type"] for m in ann.take()], ["crew_created"])
        self.assertNotIn("HOME", self.b.crews)
        bob = self.device(self.b, "bob", crew_code="HOME")
        [joined] = bob.take()
        self.assertEqual((joined["type"], joined["crew_code"]), ("crew_joined", "HOME"))
        self.assertEqual(set(self.b.crews["HOME"].members), {"ann", "bob"})

    def test_unknown_everywhere(self):
        """
        A code no node and no store holds is still invalid_crew_code.
        """
        bob = self.device(self.b, "bob", crew_code="NOWHERE")
        self.assertEqual([m.get("error") for m in bob.take()], ["invalid_crew_code"])

    def test_sequences_shared(self):
        """
        Messages to one crew from two nodes get distinct, increasing
        sequence numbers: the store mints them, not each node.
        """
        ann = Device(self.a, "127.0.0.1")
        ann.send(type="create_crew", device_id="ann", crew_code="HOME")
        self.clock.advance(1)
        bob = self.device(self.b, "bob", crew_code="HOME")
        seqs = []
        for sender, text in ((ann, "1"), (bob, "2"), (ann, "3"), (bob, "4")):
            sender.send(type="message", payload={"text": text}, client_msg_id=text)
            self.clock.advance(1)
            [sent] = [m for m in sender.take() if m["type"] == "sent"]
            seqs.append(sent["seq"])
        self.assertEqual(seqs, [1, 2, 3, 4])
        self.assertEqual([e.seq for e in self.store.log["HOME"]], [1, 2, 3, 4])


class OrderTests(TwoNodesTestCase):
    def test_message_waits_for_the_join(self):
        """
        join_crew waiting on a slow lookup, then a message: the message is
        handled after the join (never not_in_crew), and a ping after both
        (the memory store answers the message as soon as it is written).
        """
        ann = Device(self.a, "127.0.0.1")
        ann.send(type="create_crew", device_id="ann", crew_code="HOME")
        self.clock.advance(1)
        ann.take()
        self.store.slow = True
        bob = Device(self.b, "127.0.0.1")
        bob.send(type="join_crew", device_id="bob", display_name="Bob", crew_code="HOME")
        bob.send(type="message", payload={"text": "hi"}, client_msg_id="m1")
        bob.send(type="ping")
        self.assertEqual(bob.take(), [])
        self.store.slow = False
        self.store.answer()
        self.clock.advance(1)
        self.assertEqual([m["type"] for m in bob.take()], ["crew_joined", "sent", "pong"])
        self.assertEqual([e.payload for e in self.store.log["HOME"]][-1].count(b'"hi"'), 1)

    def test_refusal_while_waiting_keeps_the_order(self):
        """
        A frame after a waiting join that is refused is refused in its turn
        (after the join's answer), and the connection goes on.
        """
        self.store.slow = True
        bob = Device(self.b, "127.0.0.1")
        bob.send(type="join_crew", device_id="bob", crew_code="NOWHERE")
        bob.send(type="nonsense")
        bob.send(type="ping")
        self.assertEqual(bob.take(), [])
        self.store.slow = False
        self.store.answer()
        self.assertEqual([m.get("error", m["type"]) for m in bob.take()],
                         ["invalid_crew_code", "unknown_type", "pong"])

    def test_closed_while_waiting(self):
        """
        A connection closed while its join waits gets no answer and joins
        nothing.
        """
        ann = Device(self.a, "127.0.0.1")
        ann.send(type="create_crew", device_id="ann", crew_code="HOME")
        self.clock.advance(1)
        self.store.slow = True
        bob = Device(self.b, "127.0.0.1")
        bob.send(type="join_crew", device_id="bob", crew_code="HOME")
        bob.close()
        bob.session.closing = True
        self.store.answer()
        self.assertEqual(bob.take(), [])
        self.assertNotIn("bob", self.b.devices)

    def test_lookup_failure_answered(self):
        """
        A lookup the store fails is answered store_unavailable; the next
        frame is handled.
        """
        class Broken(MemoryStore):
            def find_crew(self, code):
                from twisted.internet.defer import fail
                return fail(StoreError("disk on fire"))

        relay = Relay(self.clock, Broken())
        d = Device(relay, "127.0.0.1")
        d.send(type="join_crew", device_id="d", crew_code="SOMEWHERE")
        d.send(type="ping")
        self.assertEqual([m.get("error", m["type"]) for m in d.take()], ["store_unavailable", "pong"])
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class DeviceLookupTests(TwoNodesTestCase):
    def test_key_bound_on_another_node(self):
        """
        A device id whose key was bound on node A is refused on node B
        without it: B looked the id up.
        """
        first = Device(self.a, "127.0.0.1")
        first.send(type="register")
        [registered] = first.take()
        key = registered["device_key"]
        again = Device(self.a, "127.0.0.1")
        again.send(type="register", device_id=registered["device_id"], device_key=key)
        self.clock.advance(1)
        thief = Device(self.b, "127.0.0.1")
        thief.send(type="register", device_id=registered["device_id"])
        self.assertEqual([m.get("error") for m in thief.take()], ["device_auth_failed"])
        owner = Device(self.b, "127.0.0.1")
        owner.send(type="register", device_id=registered["device_id"], device_key=key)
        self.assertEqual([m["type"] for m in owner.take()], ["registered"])


class TokenLookupTests(TwoNodesTestCase):
    def test_tokens_parked_on_another_node(self):
        """
        Spotify tokens parked by node A for an offline device reach it when
        it comes back on node B, and B hands them over once.
        """
        self.assertFalse(self.a.deliver_tokens("d", {"access_token": "t"}))
        self.clock.advance(1)
        back = Device(self.b, "127.0.0.1")
        back.send(type="register", device_id="d")
        self.assertEqual([m["type"] for m in back.take()], ["registered", "spotify_auth_complete"])
        self.clock.advance(1)
        again = Device(self.b, "127.0.0.1")
        again.send(type="register", device_id="d")
        self.assertEqual([m["type"] for m in again.take()], ["registered"])
        self.assertIsNone(self.store.find_token("d"))

    def test_taken_tokens_not_taken_again(self):
        """
        A device back twice before the store has deleted its handed-over
        tokens gets them once: the store's copy is not adopted again.
        """
        class SlowWrites(MemoryStore):
            def __init__(self):
                super().__init__()
                self.held = []

            def write(self, ops):
                if any(kind == "delete_token" for kind, _ in ops):
                    d = Deferred()
                    self.held.append((d, ops))
                    return d
                return super().write(ops)

        store = SlowWrites()
        relay = Relay(self.clock, store)
        relay.deliver_tokens("d", {"access_token": "t"})
        self.clock.advance(1)
        first = Device(relay, "127.0.0.1")
        first.send(type="register", device_id="d")
        self.clock.advance(1)
        second = Device(relay, "127.0.0.1")
        second.send(type="register", device_id="d")
        self.assertEqual([m["type"] for m in first.take()], ["registered", "spotify_auth_complete"])
        self.assertEqual([m["type"] for m in second.take()], ["registered"])
        [(d, ops)] = store.held
        super(SlowWrites, store).write(ops).chainDeferred(d)
        self.assertIsNone(store.find_token("d"))


class SentLookupTests(TwoNodesTestCase):
    def test_resend_through_another_node(self):
        """
        A message sent with a client_msg_id through node A, resent through
        node B (the device moved): B answers sent with A's id and sequence,
        and stores nothing twice.
        """
        ann = Device(self.a, "127.0.0.1")
        ann.send(type="create_crew", device_id="ann", crew_code="HOME")
        self.clock.advance(1)
        self.device(self.b, "bob", crew_code="HOME")
        ann.send(type="message", payload={"text": "once"}, client_msg_id="c1")
        self.clock.advance(1)
        [sent] = [m for m in ann.take() if m["type"] == "sent"]
        ann.close()
        moved = Device(self.b, "127.0.0.1")
        moved.send(type="register", device_id="ann", crew_code="HOME")
        moved.take()
        moved.send(type="message", payload={"text": "once"}, client_msg_id="c1")
        self.clock.advance(1)
        [again] = [m for m in moved.take() if m["type"] == "sent"]
        self.assertEqual((again["id"], again["seq"]), (sent["id"], sent["seq"]))
        self.assertEqual(len(self.store.log["HOME"]), 1)

    def test_failed_lookup_names_the_message(self):
        """
        When the store cannot say whether a client_msg_id was sent already,
        the message is answered store_unavailable naming its client_msg_id
        (as a failed write is), nothing is stored, and the next frame is
        handled.
        """
        class Broken(MemoryStore):
            def find_sent(self, crew_code, sender, client_msg_id):
                from twisted.internet.defer import fail
                return fail(StoreError("Redis went away"))

        store = Broken()
        relay = Relay(self.clock, store)
        d = Device(relay, "127.0.0.1")
        d.send(type="create_crew", device_id="ann", crew_code="HOME")
        self.clock.advance(1)
        d.take()
        d.send(type="message", payload={"text": "hi"}, client_msg_id="c1")
        d.send(type="ping")
        self.clock.advance(1)
        [refused, pong] = d.take()
        self.assertEqual((refused["error"], refused["client_msg_id"], pong["type"]),
                         ("store_unavailable", "c1", "pong"))
        self.assertEqual(store.log.get("HOME", []), [])
