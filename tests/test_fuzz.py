"""
Fuzzing: hypothesis-generated frames (random JSON, wrong types, huge and
deeply nested values, invalid UTF-8, random bytes) against the core and over
a real connection.  The relay never raises an unhandled error, never closes
a different connection, and the crew state stays consistent.
"""

import json

import txaio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo.limits import Rate, RelayLimits
from leeloo.relay import Relay
from leeloo.testing import Device, MemoryWebSocketClients
from leeloo.web import make_site
from leeloo.websocket import RelayServerFactory, WebSocketLimits

txaio.use_twisted()

TYPES = ["register", "create_crew", "join_crew", "message", "share_music", "reaction", "ping", "ack",
         "crew_add", "crew_leave", "crews", "crew_primary", "nope", ""]
FIELDS = ["device_id", "crew_code", "device_name", "display_name", "msg_type", "payload", "reaction_type",
          "spotify_uri", "artist", "track", "album", "last_seq", "seq", "client_msg_id", "device_key"]

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=80)
    | st.sampled_from(["dev1", "dev2", "dev3", "CREW1", "crew1", "LEELOO-AAAA", "text", "k" * 32])
)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                    max_size=3), max_leaves=10)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES)},
    optional={name: values for name in FIELDS},
).map(lambda m: json.dumps(m).encode())
junk = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=64).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.just(b'{"type":"message","payload":{"text":"' + b"x" * 20000 + b'"}}'),
)
ids = st.sampled_from(["dev1", "dev2", "dev3"])
codes = st.sampled_from(["CREW1", "crew2", "LEELOO-AAAA"])
well_formed = st.one_of(
    st.builds(lambda d, c, n: {"type": "register", "device_id": d, "crew_code": c, "device_name": n},
              ids, codes | st.none(), st.text(max_size=5)),
    st.builds(lambda d, c: {"type": "join_crew", "device_id": d, "crew_code": c}, ids, codes),
    st.builds(lambda d, c: {"type": "create_crew", "device_id": d, "crew_code": c}, ids | st.none(),
              codes | st.none()),
    st.builds(lambda t, c, k: {"type": "message", "payload": {"text": t}, "client_msg_id": c, "crew_code": k},
              st.text(max_size=5), st.none() | st.sampled_from(["c1", "c2"]), codes | st.none()),
    st.builds(lambda n, k: {"type": "ack", "seq": n, "crew_code": k}, st.integers(min_value=0, max_value=5),
              codes | st.none()),
    st.builds(lambda r, k: {"type": "reaction", "reaction_type": r, "crew_code": k},
              st.sampled_from(["love", "fire"]), codes | st.none()),
    # Several crews per device.
    st.builds(lambda c, n: {"type": "crew_add", "crew_code": c, "last_seq": n}, codes,
              st.none() | st.integers(min_value=0, max_value=3)),
    st.builds(lambda c: {"type": "crew_leave", "crew_code": c}, codes),
    st.builds(lambda c: {"type": "crew_primary", "crew_code": c}, codes),
    st.just({"type": "crews"}),
    st.just({"type": "ping"}),
).map(lambda m: json.dumps(m).encode())
frames = st.one_of(well_formed, well_formed, messages, junk)


class RelayMachine(RuleBasedStateMachine):
    """
    Random connections and frames against one relay core.
    """

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.limits = RelayLimits(messages=Rate(1000, 1000), entries=Rate(1000, 1000))
        self.relay = Relay(self.clock, limits=self.limits)
        self.devices = []

    @rule()
    def connect(self):
        self.devices.append(Device(self.relay, "127.0.0.1"))

    @precondition(lambda self: self.devices)
    @rule(index=st.integers(min_value=0), frame=frames)
    def send(self, index, frame):
        self.devices[index % len(self.devices)].send_frame(frame)

    @precondition(lambda self: self.devices)
    @rule(index=st.integers(min_value=0), device_id=ids, crews=st.lists(codes, min_size=1, max_size=3))
    def several_crews(self, index, device_id, crews):
        """
        A device registers in a crew (made if need be) and adds others:
        the common way to several crews, which random frames seldom find.
        """
        for code in crews:
            self.relay.crews_part.crews.get(code.upper()) or self.relay.crews_part.create(code.upper(), None)
        device = self.devices[index % len(self.devices)]
        device.send(type="register", device_id=device_id, crew_code=crews[0])
        for code in crews[1:]:
            device.send(type="crew_add", crew_code=code)

    @precondition(lambda self: self.devices)
    @rule(index=st.integers(min_value=0))
    def disconnect(self, index):
        self.devices.pop(index % len(self.devices)).close()

    @rule()
    def tick(self):
        self.clock.advance(1)

    @rule()
    def restart(self):
        """
        A new relay on the store (the old one crashed): it knows every
        multi-crew device's crews and primary as the old one did.
        """
        before = dict(self.relay.crews_part.multi)
        self.relay = Relay(self.clock, store=self.relay.store, limits=self.limits)
        self.devices = []
        assert self.relay.crews_part.multi == before

    @invariant()
    def consistent(self):
        relay = self.relay
        for device_id, session in relay.devices.items():
            assert session.device_id == device_id
            assert session in relay.sessions
        for code, crew in relay.crews.items():
            assert crew.code == code
            for device_id, membership in relay.fanout.listeners(code).items():
                session = membership.session
                assert session.membership(code) is membership
                assert session.device_id == device_id
                assert relay.devices.get(device_id) is session
                assert membership.member is crew.members[device_id]
        for session in relay.sessions:
            held = session.memberships()
            # A device in crews has a primary; each membership is its
            # device's listener in its crew, once; a single-crew device
            # (one that never sent crew_add) is in one crew at most.
            assert (session.primary is None) == (not held)
            assert len({m.crew.code for m in held}) == len(held) <= relay.limits.max_crews_per_device
            assert session.multi or len(held) <= 1
            for membership in held:
                assert membership.session is session
                assert relay.fanout.listeners(membership.crew.code).get(session.device_id) is membership
                assert relay.crews.get(membership.crew.code) is membership.crew
        for device_id, record in relay.crews_part.multi.items():
            # What is stored of a multi-crew device: its crews once each,
            # within the limit, a primary among them exactly when it has
            # one; on its connection, the crews it holds and its primary.
            assert len(set(record.crews)) == len(record.crews) <= relay.limits.max_crews_per_device
            assert (record.primary is None) == (not record.crews)
            assert record.primary is None or record.primary in record.crews
            session = relay.devices.get(device_id)
            if session is not None and session.multi:
                assert {m.crew.code for m in session.memberships()} == set(record.crews)
                assert (session.primary.crew.code if session.primary else None) == record.primary

    @invariant()
    def only_protocol_messages(self):
        for device in self.devices:
            for message in device.take():
                assert isinstance(message, dict) and isinstance(message.get("type"), str)
                if message["type"] == "error":
                    assert isinstance(message["error"], str) and isinstance(message["message"], str)


RelayMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)


class CoreFuzzTests(RelayMachine.TestCase):
    """
    The core under random connections and frames keeps consistent crew
    state and answers only with protocol messages.
    """


class ConnectionFuzzTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        previous = txaio.config.loop
        txaio.config.loop = self.clock
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.relay = Relay(self.clock, limits=RelayLimits(messages=Rate(10**6, 10**6), entries=Rate(10**6, 10**6)))
        factory = RelayServerFactory(self.relay, WebSocketLimits(max_message_size=16 * 1024))
        self.net = MemoryWebSocketClients(make_site(self.relay, factory, None, None, reactor=self.clock))
        self.bystander = self.net.connect()
        self.bystander.send_json({"type": "register", "device_id": "bystander", "crew_code": "CREW1"})
        self.net.flush()
        self.bystander.take()

    def test_random_frames_over_a_connection(self):
        """
        Whatever frames one client sends, the relay logs no unhandled error
        and the bystander in its crew stays connected and served.
        """
        from hypothesis import given

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(st.tuples(frames, st.booleans()), min_size=1, max_size=8))
        def attack(sequence):
            client = self.net.connect()
            client.send_json({"type": "register", "device_id": "fuzzer", "crew_code": "CREW1"})
            for frame, binary in sequence:
                if client.closed:
                    break
                client.sendMessage(frame, isBinary=binary)
                self.net.flush()
            client.sendClose(1000)
            self.net.flush()
            self.assertFalse(self.bystander.closed)
            self.bystander.send_json({"type": "ping"})
            self.net.flush()
            self.assertIn({"type": "pong"}, self.bystander.take())

        attack()
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(set(self.relay.devices), {"bystander"})
