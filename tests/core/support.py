"""
What the core's tests share: a relay driven with method calls, L{Device}s
(a recording L{leeloo.testing.FakePeer} each) and a L{Clock} started at
C{T0}.  Each base case sets the relay up the way its tests need it, and
connects its devices from its own client address.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo import web
from leeloo.limits import Rate, RelayLimits
from leeloo.relay import Relay
from leeloo.store import MemoryStore
from leeloo.testing import Device, FailingMemoryStore

T0 = 1_700_000_000.0


def bot_crews(relay, user_id):
    """
    What the bot API answers for C{user_id}'s crews.
    """
    return [web.bot_crew(c) for c in relay.bot_user_crews(user_id)]


class HeldStore(MemoryStore):
    """
    A MemoryStore whose writes wait until the test releases them (C{held}
    holds a Deferred per write; firing it applies the write).
    """

    def __init__(self):
        super().__init__()
        self.held = []

    def write(self, ops):
        d = Deferred()
        self.held.append(d)
        return d.addCallback(lambda _: MemoryStore.write(self, ops))

    def release(self):
        while self.held:
            self.held.pop(0).callback(None)


class ClockTestCase(SynchronousTestCase):
    """
    A test whose clock starts at C{T0}.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)


class RelayTestCase(ClockTestCase):
    """
    A relay with no store (it keeps its state in memory) whose message ids
    count m1, m2, ...; devices connect from 127.0.0.1.
    """

    def setUp(self):
        super().setUp()
        ids = iter(range(1, 10**6))
        self.relay = Relay(self.clock, message_id=lambda: f"m{next(ids)}")

    def device(self):
        return Device(self.relay, "127.0.0.1")

    def crew_of(self, n, code="ALPHA"):
        """
        n devices registered in crew C{code}, their replies taken.
        """
        devices = []
        for _ in range(n):
            i = self.numbered = getattr(self, "numbered", -1) + 1
            d = self.device()
            d.send(type="register", device_id=f"dev{i}", crew_code=code, device_name=f"Dev {i}")
            d.take()
            devices.append(d)
        return devices


class DeliveryTestCase(ClockTestCase):
    """
    A relay on a L{FailingMemoryStore} with a replay limit of
    C{replay_limit}; devices connect from no address.
    """

    replay_limit = 50

    def setUp(self):
        super().setUp()
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()

    def make_relay(self, **kwargs):
        return Relay(self.clock, self.store, replay_limit=self.replay_limit, **kwargs)

    def device(self, device_id, crew="ALPHA", relay=None, **extra):
        d = Device(relay or self.relay)
        d.send(type="register", device_id=device_id, crew_code=crew, device_name=device_id.title(), **extra)
        return d

    def say(self, device, text, **extra):
        self.clock.advance(0.05)  # a person's pace, within the message rate limit
        device.send(type="message", payload={"text": text}, **extra)


class BoundsTestCase(ClockTestCase):
    """
    A relay on a L{FailingMemoryStore} with C{limits} (generous by
    default); devices connect from 192.0.2.1.
    """

    limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate.per_window(1000, 600))

    def setUp(self):
        super().setUp()
        self.store = FailingMemoryStore()
        self.relay = self.make_relay()

    def make_relay(self, **kwargs):
        kwargs.setdefault("limits", self.limits)
        return Relay(self.clock, self.store, **kwargs)

    def device(self, address="192.0.2.1"):
        return Device(self.relay, address)

    def member(self, device_id, code="ALPHA", name=None):
        d = self.device()
        d.send(type="register", device_id=device_id, crew_code=code, device_name=name or device_id)
        d.take()
        return d


class CoreTestCase(ClockTestCase):
    """
    A relay on a L{MemoryStore} with C{limits} (the defaults unless a test
    sets them); devices connect from 203.0.113.5.
    """

    limits = RelayLimits()

    def setUp(self):
        super().setUp()
        self.store = MemoryStore()
        self.relay = Relay(self.clock, self.store, limits=self.limits)

    def device(self, address="203.0.113.5"):
        return Device(self.relay, address)
