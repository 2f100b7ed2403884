"""
L{leeloo.device.client.LeelooDevice} driven in memory: a fake connection
in place of the WebSocket, a L{Clock} in place of the reactor.  What it
sends, what it keeps on disk and how it reacts to everything the relay may
say.
"""

import json
import os
import stat

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from leeloo import messages
from leeloo.device import DeviceStopped, FullJitter, LeelooDevice, OutboxFull
from leeloo.device.client import DeviceReplaced

from .loopback import RefusingEndpoint

URL = "ws://relay.test/ws"


class FakeConnection:
    """
    Stands in for a L{DeviceProtocol}: records the frames the device sends.
    """

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.closed: int | None = None

    def send_frame(self, message: dict) -> None:
        # What goes on the wire: encoded by the protocol module.
        self.sent.append(json.loads(messages.encode(message)))

    def sendClose(self, code=None, reason=None) -> None:
        self.closed = code

    def take(self) -> list[dict]:
        sent, self.sent = self.sent, []
        return sent


class DeviceTestCase(SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.state_dir = self.mktemp()
        os.makedirs(self.state_dir)

    def write(self, name, obj):
        with open(os.path.join(self.state_dir, name), "w") as f:
            f.write(obj if isinstance(obj, str) else json.dumps(obj))

    def read(self, name):
        with open(os.path.join(self.state_dir, name)) as f:
            return json.load(f)

    def device(self, **kwargs):
        kwargs.setdefault("retry_policy", FullJitter(random=lambda: 0.5))
        kwargs.setdefault("fsync", False)
        device = LeelooDevice(URL, self.state_dir, kwargs.pop("name", None), reactor=self.clock,
                              endpoint=RefusingEndpoint(self.clock), **kwargs)
        self.events = []
        device.observe(lambda event, frame: self.events.append((event, frame)))
        return device

    def open(self, device):
        conn = FakeConnection()
        device._opened(conn)
        return conn

    def says(self, device, conn, **frame):
        device._received(conn, messages.encode(frame))

    def ready(self, device, crew="ALPHA", device_id="leeloo_aaaaaaaaaaaa"):
        """
        Open a connection and answer its entry; return the connection with
        its frames taken.
        """
        conn = self.open(device)
        [entry] = conn.take()
        reply = {"join_crew": "crew_joined", "create_crew": "crew_created"}[entry["type"]]
        self.says(device, conn, type=reply, device_id=device_id, crew_code=crew, crew_members=1, member_names=[])
        conn.take()
        return conn

    def fired(self, event):
        return [f for e, f in self.events if e == event]


class EntryTests(DeviceTestCase):

    def test_saved_crew_is_joined_with_identity_and_position(self):
        """
        A device with a saved crew joins it presenting its device id, its
        device key and the last sequence it handled there.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_id": "ALPHA",
                                        "crew_code": "ALPHA", "display_name": "Ann"})
        self.write("device_key", "the-key\n")
        self.write("relay_state.json", {"last_seq": {"ALPHA": 7}})
        conn = self.open(self.device())
        self.assertEqual(conn.take(), [{"type": "join_crew", "crew_code": "ALPHA", "display_name": "Ann",
                                        "device_id": "leeloo_aaaaaaaaaaaa", "device_key": "the-key",
                                        "last_seq": 7}])

    def test_older_config_format_is_joined(self):
        """
        The older crew_config.json form (name, invite_code) names the crew
        and the display name.
        """
        self.write("crew_config.json", {"name": "Bob", "invite_code": "LEELOO-7X3K", "is_creator": True,
                                        "members": ["Ann"]})
        conn = self.open(self.device())
        self.assertEqual(conn.take(), [{"type": "join_crew", "crew_code": "LEELOO-7X3K", "display_name": "Bob"}])

    def test_fresh_device_creates_a_crew_and_saves_its_identity(self):
        """
        A device with no state creates a crew, then saves the id, the crew
        (crew_config.json, as deployed devices write it) and the issued key
        (a file of its own, mode 0600), and presents the key at once to
        bind it.
        """
        device = self.device(name="Ann")
        conn = self.open(device)
        self.assertEqual(conn.take(), [{"type": "create_crew", "display_name": "Ann"}])
        self.says(device, conn, type="crew_created", device_id="leeloo_aaaaaaaaaaaa", crew_code="LEELOO-7X3K",
                  device_key="k3y")
        self.assertEqual(conn.take(), [{"type": "register", "device_id": "leeloo_aaaaaaaaaaaa",
                                        "device_key": "k3y"}])
        self.assertEqual(self.read("crew_config.json"), {"device_id": "leeloo_aaaaaaaaaaaa",
                                                         "crew_id": "LEELOO-7X3K", "crew_code": "LEELOO-7X3K",
                                                         "display_name": "Ann"})
        key_path = os.path.join(self.state_dir, "device_key")
        with open(key_path) as f:
            self.assertEqual(f.read().strip(), "k3y")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(self.fired("connected")[0]["crew_code"], "LEELOO-7X3K")
        self.assertTrue(device.connected)

    def test_bind_answer_is_not_taken_for_an_entry(self):
        """
        The relay's answer to presenting a fresh key (registered) does not
        complete a later join the application asked for.
        """
        device = self.device()
        conn = self.open(device)
        conn.take()
        self.says(device, conn, type="crew_created", device_id="leeloo_aaaaaaaaaaaa", crew_code="A1",
                  device_key="k3y")
        joined = device.join_crew("b2")
        self.says(device, conn, type="registered", device_id="leeloo_aaaaaaaaaaaa")
        self.assertNoResult(joined)
        self.says(device, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="B2",
                  crew_members=2, member_names=["Bob"])
        self.assertEqual(self.successResultOf(joined), "B2")
        self.assertEqual(self.read("crew_config.json")["crew_code"], "B2")

    def test_saved_crew_the_relay_lost_is_created_again(self):
        """
        When the relay does not know the saved crew (it lost its data), the
        device creates it again under the same code, as deployed devices
        do, and forgets its position there.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "ALPHA"})
        self.write("relay_state.json", {"last_seq": {"ALPHA": 7}})
        device = self.device()
        conn = self.open(device)
        conn.take()
        self.says(device, conn, type="error", error="invalid_crew_code", message="Crew ALPHA not found")
        self.assertEqual(conn.take(), [{"type": "create_crew", "display_name": "LEELOO", "crew_code": "ALPHA",
                                        "device_id": "leeloo_aaaaaaaaaaaa"}])
        self.assertEqual(self.read("relay_state.json"), {"last_seq": {}})

    def test_joining_an_unknown_crew_fails_and_keeps_the_crew(self):
        """
        join_crew for a crew the relay does not know fails with its
        invalid_crew_code, and the device goes back to its own crew.
        """
        device = self.device()
        conn = self.ready(device, crew="ALPHA")
        joined = device.join_crew("nope")
        self.assertEqual(conn.take()[0]["crew_code"], "NOPE")
        self.says(device, conn, type="error", error="invalid_crew_code", message="Crew NOPE not found")
        failure = self.failureResultOf(joined, messages.InvalidCrewCode)
        self.assertEqual(failure.value.code, "invalid_crew_code")
        self.assertEqual(conn.take()[0]["crew_code"], "ALPHA")
        self.assertEqual(self.read("crew_config.json")["crew_code"], "ALPHA")

    def test_invalid_last_seq_drops_the_position_and_rejoins(self):
        """
        invalid_last_seq (the relay lost its log) makes the device forget
        its position in that crew and join again without one.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "ALPHA"})
        self.write("relay_state.json", {"last_seq": {"ALPHA": 7, "OTHER": 2}})
        device = self.device()
        conn = self.open(device)
        self.assertEqual(conn.take()[0]["last_seq"], 7)
        self.says(device, conn, type="error", error="invalid_last_seq", message="from the future")
        [again] = conn.take()
        self.assertEqual((again["type"], "last_seq" in again), ("join_crew", False))
        self.assertEqual(self.read("relay_state.json"), {"last_seq": {"OTHER": 2}})

    def test_rate_limited_entry_waits_retry_after(self):
        """
        An entry answered rate_limited is tried again after retry_after
        seconds, not before.
        """
        self.write("crew_config.json", {"crew_code": "ALPHA"})
        device = self.device()
        conn = self.open(device)
        conn.take()
        self.says(device, conn, type="error", error="rate_limited", message="slow down", retry_after=3)
        self.clock.advance(2.9)
        self.assertEqual(conn.take(), [])
        self.clock.advance(0.1)
        self.assertEqual([f["type"] for f in conn.take()], ["join_crew"])

    def test_unanswered_entry_closes_the_connection(self):
        """
        A relay that does not answer the entry within open_timeout gets the
        connection closed (then the device reconnects with backoff).
        """
        device = self.device(open_timeout=4.0)
        conn = self.open(device)
        self.clock.advance(3.9)
        self.assertIsNone(conn.closed)
        self.clock.advance(0.1)
        self.assertEqual(conn.closed, 1000)

    def test_answered_entry_keeps_the_connection(self):
        """
        Once the relay answered the entry, the entry timeout no longer
        applies.
        """
        device = self.device(open_timeout=4.0)
        conn = self.ready(device)
        self.clock.advance(60)
        self.assertIsNone(conn.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_new_display_name_is_saved(self):
        """
        A display name given to the device replaces the saved one in
        crew_config.json once the device is in its crew.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_id": "ALPHA",
                                        "crew_code": "ALPHA", "display_name": "Old"})
        device = self.device(name="New")
        self.ready(device)
        self.assertEqual(self.read("crew_config.json")["display_name"], "New")

    def test_device_auth_failed_stops_and_reports(self):
        """
        device_auth_failed stops the device for good: a stopped event names
        the code, and a send waiting in the outbox fails with
        DeviceStopped (it stays in the outbox).
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "ALPHA"})
        device = self.device()
        device.startService()
        pending = device.send_text("hi")
        conn = self.open(device)
        conn.take()
        self.says(device, conn, type="error", error="device_auth_failed", message="the device key does not match")
        self.clock.advance(0)
        [stopped] = self.fired("stopped")
        self.assertEqual(stopped["error"], "device_auth_failed")
        self.assertIsInstance(self.failureResultOf(pending, DeviceStopped).value.reason,
                              messages.DeviceAuthFailed)
        self.assertFalse(device.running)
        self.assertEqual(len(self.read("outbox.json")["messages"]), 1)


class CloseTests(DeviceTestCase):

    def test_replaced_does_not_reconnect(self):
        """
        A 4001 close (a newer connection took this device id) stops the
        device and says so, instead of reconnecting.
        """
        device = self.device()
        device.startService()
        conn = self.ready(device)
        attempts = len(device.endpoint.attempts)
        device._closed(conn, 4001, "replaced by a newer connection for this device")
        self.clock.advance(0)
        [stopped] = self.fired("stopped")
        self.assertEqual(stopped["error"], DeviceReplaced.code)
        self.assertIn("4001", stopped["message"])
        self.assertIn("not reconnecting", stopped["message"])
        self.clock.advance(3600)
        self.assertEqual(len(device.endpoint.attempts), attempts)
        self.assertFalse(device.running)

    def test_abuse_close_waits_the_backoff_cap(self):
        """
        After a 4029 close the next reconnect waits at least the backoff
        cap; the one after goes back to the ordinary backoff.
        """
        device = self.device(retry_policy=FullJitter(cap=60.0, random=lambda: 0.5))
        conn = self.ready(device)
        device._closed(conn, 4029, "too many refused requests")
        self.assertGreaterEqual(device._retry_delay(1), 60.0)
        self.assertEqual(device._retry_delay(1), 0.5)

    def test_connections_closed_before_entry_back_off(self):
        """
        Connections the relay closes before the device is in its crew count
        as failures: the backoff grows as if they were refused.
        """
        device = self.device(retry_policy=FullJitter(initial=1.0, cap=60.0, random=lambda: 1.0))
        for _ in range(5):
            conn = self.open(device)
            device._closed(conn, 1011, "internal error")
        self.assertEqual(device._retry_delay(1), 16.0)
        self.ready(device)
        self.assertEqual(device._retry_delay(1), 1.0)

    def test_keepalive_pings(self):
        """
        The device's WebSocket pings the relay (Autobahn's auto-ping) every
        ping_interval and drops a connection whose pong is late.
        """
        device = self.device(ping_interval=12.0, ping_timeout=7.0)
        self.assertEqual((device.factory.autoPingInterval, device.factory.autoPingTimeout), (12.0, 7.0))

    def test_default_backoff_is_full_jitter_capped_at_60(self):
        """
        Without a retry policy the device backs off with full jitter capped
        at 60 seconds.
        """
        device = LeelooDevice(URL, self.state_dir, reactor=self.clock, endpoint=RefusingEndpoint(self.clock))
        self.assertIsInstance(device.policy, FullJitter)
        self.assertEqual(device.policy.cap, 60.0)


class ReceiveTests(DeviceTestCase):

    def message(self, seq, msg_type="text", payload=None):
        return dict(type="message", from_device="leeloo_bbbbbbbbbbbb", from_name="Bob", msg_type=msg_type,
                    payload=payload or {"text": f"m{seq}"}, timestamp=1, seq=seq, id=f"id{seq}")

    def test_crew_message_is_handled_once_recorded_and_acked(self):
        """
        A crew message reaches the observers, then its seq is saved and
        acknowledged; the same seq again (a replay overlapping live
        traffic) is neither handed on nor acknowledged again.
        """
        device = self.device()
        conn = self.ready(device)
        self.says(device, conn, **self.message(3))
        self.says(device, conn, **self.message(3))
        self.assertEqual([f["seq"] for f in self.fired("message")], [3])
        self.assertEqual(conn.take(), [{"type": "ack", "seq": 3}])
        self.assertEqual(self.read("relay_state.json"), {"last_seq": {"ALPHA": 3}})

    def test_share_music_and_reaction_frames_are_events_too(self):
        """
        The relay's top-level music_shared and reaction fan-outs (from
        clients that send share_music or reaction) reach their own
        observers and are acknowledged like messages.
        """
        device = self.device()
        conn = self.ready(device)
        self.says(device, conn, type="music_shared", spotify_uri="spotify:track:1", artist="A", track="T",
                  album="L", pushed_by="Bob", timestamp=1, seq=1, id="a")
        self.says(device, conn, type="reaction", reaction_type="love", **{"from": "Bob"}, timestamp=1, seq=2, id="b")
        self.assertEqual(self.fired("music_shared")[0]["track"], "T")
        self.assertEqual(self.fired("reaction")[0]["reaction_type"], "love")
        self.assertEqual(conn.take(), [{"type": "ack", "seq": 1}, {"type": "ack", "seq": 2}])

    def test_observers_by_msg_type(self):
        """
        on_message observers see only their msg_type; a type no deployed
        device knows is handed on too.
        """
        device = self.device()
        songs, new = [], []
        device.on_message("song_push", songs.append)
        device.on_message("brand_new", new.append)
        conn = self.ready(device)
        self.says(device, conn, **self.message(1, "text"))
        self.says(device, conn, **self.message(2, "song_push", {"track": "T"}))
        self.says(device, conn, **self.message(3, "brand_new", {"x": 1}))
        self.assertEqual([f["payload"] for f in songs], [{"track": "T"}])
        self.assertEqual([f["payload"] for f in new], [{"x": 1}])

    def test_failing_observer_does_not_stop_delivery(self):
        """
        An observer that raises is logged; the others still run and the
        message still counts as handled.
        """
        device = self.device()
        seen = []

        def broken(frame):
            raise RuntimeError("UI bug")

        device.on("message", broken)
        device.on("message", seen.append)
        conn = self.ready(device)
        self.says(device, conn, **self.message(1))
        self.assertEqual(len(seen), 1)
        self.assertEqual(conn.take(), [{"type": "ack", "seq": 1}])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_member_and_replay_events(self):
        """
        member_joined, member_offline and replay_truncated reach their
        observers as the relay sent them.
        """
        device = self.device()
        conn = self.ready(device)
        self.says(device, conn, type="member_joined", device_id="leeloo_bbbbbbbbbbbb", display_name="Bob")
        self.says(device, conn, type="replay_truncated", from_seq=1, to_seq=40)
        self.says(device, conn, type="member_offline", device_id="leeloo_bbbbbbbbbbbb", display_name="Bob")
        self.assertEqual(self.fired("member_joined")[0]["display_name"], "Bob")
        self.assertEqual(self.fired("replay_truncated"), [{"type": "replay_truncated", "from_seq": 1, "to_seq": 40}])
        self.assertEqual(len(self.fired("member_offline")), 1)

    def test_spotify_tokens_are_saved_exactly(self):
        """
        spotify_auth_complete writes exactly its tokens object to
        spotify_tokens.json (mode 0600) and reaches the observers.
        """
        device = self.device()
        conn = self.ready(device)
        tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
        self.says(device, conn, type="spotify_auth_complete", tokens=tokens)
        self.assertEqual(self.read("spotify_tokens.json"), tokens)
        path = os.path.join(self.state_dir, "spotify_tokens.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(self.fired("spotify_auth_complete")[0]["tokens"], tokens)

    def test_frames_that_are_not_json_are_ignored(self):
        """
        A frame that is not a JSON object with a type is ignored; the
        device keeps going.
        """
        device = self.device()
        conn = self.ready(device)
        device._received(conn, b"not json")
        device._received(conn, b"[1]")
        self.says(device, conn, **self.message(1))
        self.assertEqual(len(self.fired("message")), 1)

    def test_malformed_known_frame_is_ignored(self):
        """
        A known frame with a field of the wrong type (a crew message whose
        seq is not a number) is ignored, neither handed on nor acked; the
        device keeps going.
        """
        device = self.device()
        conn = self.ready(device)
        self.says(device, conn, **{**self.message(1), "seq": "one"})
        # (A sent without client_msg_id is share_now_playing's answer: an id that is no string is malformed.)
        self.says(device, conn, type="sent", client_msg_id="c1", id=5, seq=1)
        self.assertEqual((self.fired("message"), self.fired("sent"), conn.take()), ([], [], []))
        self.says(device, conn, **self.message(2))
        self.assertEqual([f["seq"] for f in self.fired("message")], [2])

    def test_unknown_frames_reach_observers_whole(self):
        """
        A frame of a type the device does not know (a newer relay's) is an
        event of that type, with every field the relay sent; so are the
        extra fields of a known one.
        """
        device = self.device()
        conn = self.ready(device)
        self.says(device, conn, type="weather", sky="blue")
        self.says(device, conn, type="member_joined", device_id="leeloo_b", display_name="Bob", mood="happy")
        self.assertEqual(self.fired("weather"), [{"type": "weather", "sky": "blue"}])
        self.assertEqual(self.fired("member_joined"),
                         [{"type": "member_joined", "device_id": "leeloo_b", "display_name": "Bob", "mood": "happy"}])


class SendTests(DeviceTestCase):

    def test_send_fires_with_sent(self):
        """
        A send goes out with a client_msg_id, waits in outbox.json, and
        fires with the relay's sent (its seq); then the outbox is empty.
        """
        device = self.device()
        conn = self.ready(device)
        d = device.push_song("spotify:track:1", "A", "T", "L", "http://art", "listen")
        [frame] = conn.take()
        self.assertEqual(frame["msg_type"], "song_push")
        self.assertEqual(frame["payload"], {"artist": "A", "track": "T", "album": "L",
                                            "spotify_uri": "spotify:track:1", "album_art_url": "http://art",
                                            "note": "listen"})
        self.assertEqual(len(self.read("outbox.json")["messages"]), 1)
        self.assertNoResult(d)
        sent = {"type": "sent", "client_msg_id": frame["client_msg_id"], "id": "x", "seq": 5}
        self.says(device, conn, **sent)
        self.assertEqual(self.successResultOf(d), sent)
        self.assertEqual(self.read("outbox.json"), {"messages": []})

    def test_repeated_confirmation_is_reported_once(self):
        """
        A second sent for the same client_msg_id (the answer to a resend)
        fires no second sent event.
        """
        device = self.device()
        conn = self.ready(device)
        device.send_text("one")
        [frame] = conn.take()
        sent = {"type": "sent", "client_msg_id": frame["client_msg_id"], "id": "x", "seq": 5}
        self.says(device, conn, **sent)
        self.says(device, conn, **sent)
        self.assertEqual(self.fired("sent"), [sent])

    def test_every_send_is_a_message_of_its_type(self):
        """
        Reactions, songs, nudges and hangs go out as message frames with
        the msg_type and payload deployed devices understand.
        """
        device = self.device()
        conn = self.ready(device)
        device.send_text("hi")
        device.react("fire", "leeloo_bbbbbbbbbbbb")
        device.nudge()
        device.propose_hang("2026-12-24 20:00", "dinner")
        device.confirm_hang()
        sent = [(f["type"], f["msg_type"], f["payload"]) for f in conn.take()]
        self.assertEqual(sent, [
            ("message", "text", {"text": "hi"}),
            ("message", "reaction", {"reaction": "fire", "to_device": "leeloo_bbbbbbbbbbbb"}),
            ("message", "nudge", {}),
            ("message", "hang_propose", {"datetime": "2026-12-24 20:00", "description": "dinner"}),
            ("message", "hang_confirm", {}),
        ])

    def test_offline_sends_go_out_once_after_entry(self):
        """
        Sends made offline wait in the persisted outbox and go out once the
        device is back in its crew, in order.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_code": "ALPHA"})
        device = self.device()
        device.send_text("one")
        device.send_text("two")
        self.assertEqual([m["message"]["payload"]["text"] for m in self.read("outbox.json")["messages"]],
                         ["one", "two"])
        conn = self.open(device)
        self.assertEqual([f["type"] for f in conn.take()], ["join_crew"])
        self.says(device, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="ALPHA",
                  crew_members=1, member_names=[])
        self.assertEqual([f["payload"]["text"] for f in conn.take()], ["one", "two"])

    def test_outbox_survives_a_restart_with_its_ids(self):
        """
        A new device on the same state resends what the last one had not
        had confirmed, under the same client_msg_id (so the relay stores it
        once).
        """
        device = self.device()
        conn = self.ready(device)
        device.send_text("one")
        [first] = conn.take()
        again = self.device()
        conn = self.open(again)
        self.assertEqual(conn.take()[0]["type"], "join_crew")
        self.says(again, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="ALPHA",
                  crew_members=1, member_names=[])
        self.assertEqual(conn.take(), [first])

    def test_full_outbox_fails_at_once(self):
        """
        When the outbox holds outbox_limit unconfirmed messages, a send
        fails at once with OutboxFull and is not queued.
        """
        device = self.device(outbox_limit=2)
        device.send_text("one")
        device.send_text("two")
        failure = self.failureResultOf(device.send_text("three"), OutboxFull)
        self.assertEqual(failure.value.code, "outbox_full")
        self.assertEqual(len(self.read("outbox.json")["messages"]), 2)

    def test_default_outbox_holds_100(self):
        """
        By default the outbox takes 100 unconfirmed messages; the 101st
        send fails at once.
        """
        device = self.device()
        for i in range(100):
            device.send_text(f"m{i}")
        self.failureResultOf(device.send_text("one too many"), OutboxFull)
        self.assertEqual(len(self.read("outbox.json")["messages"]), 100)

    def test_message_the_relay_would_refuse_fails_with_its_code(self):
        """
        A message the relay's decoder refuses fails at once with the same
        typed error (invalid_message), as does one over the size limit.
        """
        device = self.device(max_message_size=200)
        conn = self.ready(device)
        too_long_type = self.failureResultOf(device.send_message("x" * 100), messages.InvalidMessage)
        too_big = self.failureResultOf(device.send_text("y" * 300), messages.InvalidMessage)
        self.assertEqual((too_long_type.value.code, too_big.value.code), ("invalid_message", "invalid_message"))
        self.assertEqual(conn.take(), [])

    def test_rate_limited_sends_wait_retry_after(self):
        """
        rate_limited holds the sends until retry_after has passed, then
        sends everything unconfirmed (the relay drops a resend it stored).
        """
        device = self.device()
        conn = self.ready(device)
        device.send_text("one")
        conn.take()
        self.says(device, conn, type="error", error="rate_limited", message="slow down", retry_after=2)
        device.send_text("two")
        self.assertEqual(conn.take(), [])
        self.clock.advance(2)
        self.assertEqual([f["payload"]["text"] for f in conn.take()], ["one", "two"])

    def test_store_unavailable_resends_later(self):
        """
        store_unavailable (the message was not stored) resends the outbox
        after resend_delay.
        """
        device = self.device(resend_delay=5.0)
        conn = self.ready(device)
        d = device.send_text("one")
        conn.take()
        self.says(device, conn, type="error", error="store_unavailable", message="not stored")
        self.clock.advance(5)
        self.assertEqual([f["payload"]["text"] for f in conn.take()], ["one"])
        self.assertNoResult(d)

    def test_send_without_a_crew_fails(self):
        """
        A device that may not create a crew and is in none refuses sends
        with the relay's not_in_crew.
        """
        device = self.device(auto_create=False)
        failure = self.failureResultOf(device.send_text("hi"), messages.NotInCrew)
        self.assertEqual(failure.value.code, "not_in_crew")


class SeveralCrewsTests(DeviceTestCase):
    """
    A device in several crews (issue 16), in memory: what it sends and
    keeps, and how it takes the relay's answers.
    """

    def multi(self, crews=("BRAVO",), last_seq=None):
        """
        A device whose state says it is in ALPHA (its main crew) and
        C{crews}; ready, with the frames of its entry taken.
        """
        self.write("crew_config.json", {"device_id": "leeloo_aaaaaaaaaaaa", "crew_id": "ALPHA",
                                        "crew_code": "ALPHA", "display_name": "Ann"})
        self.write("relay_state.json", {"last_seq": last_seq or {}, "multi_crew": True, "crews": list(crews)})
        device = self.device()
        conn = self.open(device)
        [entry] = conn.take()
        self.assertEqual(entry["type"], "join_crew")
        self.says(device, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="ALPHA",
                  crew_members=1, member_names=[])
        return device, conn

    def test_other_crews_added_again_on_entry(self):
        """
        Entered in its main crew, a multi-crew device adds its other crews
        again, one at a time, each with the last sequence it handled there.
        """
        device, conn = self.multi(("BRAVO", "CHARLIE"), {"BRAVO": 4})
        self.assertEqual(conn.take(), [{"type": "crew_add", "crew_code": "BRAVO", "last_seq": 4}])
        self.says(device, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="BRAVO",
                  crew_members=1, member_names=[])
        self.assertEqual(conn.take(), [{"type": "crew_add", "crew_code": "CHARLIE"}])

    def test_crew_the_relay_lost_is_dropped(self):
        """
        An other crew the relay no longer knows (invalid_crew_code to the
        device's own crew_add) is no longer one of its crews.
        """
        device, conn = self.multi(("BRAVO", "CHARLIE"))
        conn.take()
        self.says(device, conn, type="error", error="invalid_crew_code", message="Crew BRAVO not found")
        self.assertEqual(conn.take(), [{"type": "crew_add", "crew_code": "CHARLIE"}])
        self.assertEqual(device.held_crews, ["ALPHA", "CHARLIE"])
        self.assertEqual(self.read("relay_state.json")["crews"], ["CHARLIE"])

    def test_rate_limited_crew_add_is_sent_again(self):
        """
        A crew_add answered rate_limited is sent again after retry_after,
        and its Deferred fires with the crew_joined that answers it then.
        """
        device = self.device()
        conn = self.ready(device)
        d = device.crew_add("bravo")
        self.assertEqual(conn.take(), [{"type": "crew_add", "crew_code": "BRAVO"}])
        self.says(device, conn, type="error", error="rate_limited", message="slow down", retry_after=3)
        self.clock.advance(2)
        self.assertEqual(conn.take(), [])
        self.clock.advance(1)
        self.assertEqual(conn.take(), [{"type": "crew_add", "crew_code": "BRAVO"}])
        self.says(device, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="BRAVO",
                  crew_members=2, member_names=["Bob"], crew_name="The band")
        self.assertEqual(self.successResultOf(d)["crew_name"], "The band")
        self.assertEqual(device.held_crews, ["ALPHA", "BRAVO"])
        self.assertEqual(self.read("relay_state.json"), {"last_seq": {}, "multi_crew": True, "crews": ["BRAVO"]})

    def test_crew_limit_fails_the_add(self):
        """
        crew_limit fails crew_add with the relay's error; the crew is not
        saved and the device stays single-crew.
        """
        device = self.device()
        conn = self.ready(device)
        d = device.crew_add("BRAVO")
        conn.take()
        self.says(device, conn, type="error", error="crew_limit", message="in 8 crews")
        self.assertEqual(self.failureResultOf(d).value.code, "crew_limit")
        self.assertEqual((device.held_crews, device.state.multi), (["ALPHA"], False))

    def test_crew_joined_of_another_crew_is_not_the_entry_answer(self):
        """
        While entering a crew, a crew_joined for another crew (the answer
        to an earlier crew_add) is not taken for the entry's answer.
        """
        device = self.device()
        conn = self.ready(device)
        device.crew_add("BRAVO")
        device.join_crew("CHARLIE")
        conn.take()
        self.says(device, conn, type="crew_joined", device_id="leeloo_aaaaaaaaaaaa", crew_code="BRAVO",
                  crew_members=1, member_names=[])
        self.assertEqual((device.phase, device.crew_code), ("entering", "ALPHA"))

    def test_positions_and_acks_per_crew(self):
        """
        Crew messages are deduplicated, saved and acknowledged per crew (the
        ack naming it); a replayed copy in one crew is skipped.
        """
        device, conn = self.multi(("BRAVO",), {"ALPHA": 5})
        conn.take()
        for crew, seq in (("ALPHA", 6), ("BRAVO", 6), ("BRAVO", 6), ("ALPHA", 5)):
            self.says(device, conn, type="message", from_device="x", from_name="X", msg_type="text",
                      payload={"text": f"{crew} {seq}"}, seq=seq, id=f"m{seq}", crew_code=crew)
        self.assertEqual([f["payload"]["text"] for f in self.fired("message")], ["ALPHA 6", "BRAVO 6"])
        self.assertEqual(conn.take(), [{"type": "ack", "seq": 6, "crew_code": "ALPHA"},
                                       {"type": "ack", "seq": 6, "crew_code": "BRAVO"}])
        self.assertEqual(self.read("relay_state.json")["last_seq"], {"ALPHA": 6, "BRAVO": 6})

    def test_single_crew_device_sends_as_before(self):
        """
        A device that never added a crew sends and acknowledges exactly as
        before: no crew_code in its frames.
        """
        device = self.device()
        conn = self.ready(device)
        device.send_text("hi")
        self.says(device, conn, type="message", from_device="x", from_name="X", msg_type="text",
                  payload={}, seq=1, id="m1", crew_code="ALPHA")
        sent = conn.take()
        self.assertNotIn("crew_code", sent[0])
        self.assertEqual(sent[1], {"type": "ack", "seq": 1})

    def test_multi_crew_device_names_its_main_crew(self):
        """
        A multi-crew device names the crew on every send, its main one
        when none is given; the outbox keeps each send's crew.
        """
        device, conn = self.multi()
        conn.take()
        device.send_text("to main")
        device.send_text("to bravo", crew_code="bravo")
        self.assertEqual([(f["payload"]["text"], f["crew_code"]) for f in conn.take()],
                         [("to main", "ALPHA"), ("to bravo", "BRAVO")])
        self.assertEqual([e["crew_code"] for e in self.read("outbox.json")["messages"]], ["ALPHA", "BRAVO"])
