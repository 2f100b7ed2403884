"""
What deployed devices do in the field, over loopback, with real WebSocket
clients that behave like them (no ``ack``, no ``last_seq``): crew codes as
the original relay read them, no stale storms on their return, nothing lost
on a link that dies without a close (a device frozen with SIGSTOP), no
connection left open by a device that never binds, and a bot that can
rebuild its state after a restart.
"""

import json
import os
import urllib.error
import urllib.request

import txaio
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from websockets.exceptions import ConnectionClosed

from leeloo.tap import Options, build_service

from .support import TIMEOUT, DeviceProcess, RelayProcess, listening_port, recv, ws_session

SECRET = "test-secret"
# Keepalive within seconds, so that a frozen device is dropped soon (with
# room for a busy machine to answer in time).
FAST_KEEPALIVE = ("--ping-interval", "0.5", "--ping-timeout", "2")
# The tests wait for member_offline as the sign that a device is gone.
NO_GRACE = ("--presence-grace", "0")
ANN = "leeloo_aaaaaaaaaaaa"
BOB = "leeloo_bbbbbbbbbbbb"


def send(ws, **fields):
    ws.send(json.dumps(fields))


def messages_until(ws, predicate):
    """
    Receive from C{ws} until C{predicate(message)}; return everything.
    """
    received = []
    while True:
        received.append(recv(ws))
        if predicate(received[-1]):
            return received


def texts(frames):
    return [f["payload"]["text"] for f in frames if f.get("type") == "message" and f.get("msg_type") == "text"]


def say(ws, text, msg_type="text", **payload):
    """
    Send a crew message and wait until the relay answers that it is
    durable.
    """
    cid = f"{msg_type}:{text}"
    send(ws, type="message", msg_type=msg_type, payload={"text": text, **payload}, client_msg_id=cid)
    return messages_until(ws, lambda m: m["type"] == "sent" and m["client_msg_id"] == cid)[-1]


def bot(port, method, path, body=None):
    """
    Call the bot API; return C{(status, JSON body)}.
    """
    url = f"http://127.0.0.1:{port}/api/telegram/{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"X-Api-Secret": SECRET, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.load(e)


class SteppedClock:
    """
    The reactor's clock, moved forward by C{offset} seconds on demand: a
    relay on a real reactor whose messages can be made old at once.
    """

    def __init__(self, reactor):
        self.reactor = reactor
        self.offset = 0.0

    def seconds(self):
        return self.reactor.seconds() + self.offset

    def callLater(self, *args, **kwargs):
        return self.reactor.callLater(*args, **kwargs)


class InProcessRelay(TestCase):
    """
    The relay's service tree on 127.0.0.1 with C{args} (memory store) and
    the bot API enabled; its relay's clock is a L{SteppedClock}.
    """

    timeout = 60
    args: tuple = ()

    @defer.inlineCallbacks
    def setUp(self):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        options = Options(environ={"TELEGRAM_API_SECRET": SECRET})
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--store", "memory",
                              "--data-dir", self.mktemp(), *NO_GRACE, *self.args])
        self.clock = SteppedClock(reactor)
        self.service = build_service(options.config, reactor, clock=self.clock)
        self.relay = self.service.relay
        self.service.startService()
        self.addCleanup(self.service.stopService)
        port = yield listening_port(self.service)
        self.port = port.getHost().port


class CrewCodeTests(InProcessRelay):
    @defer.inlineCallbacks
    def test_codes_the_original_accepted(self):
        """
        Codes with spaces, dots and non-ASCII letters work as the original
        relay read them (stripped, str.upper()): on create_crew, join_crew
        and the bot API, all meeting in one crew.
        """

        def script(opener):
            with opener() as a, opener() as b:
                send(a, type="create_crew", device_id=ANN, display_name="Ann", crew_code="  café.b827 eb ")
                created = recv(a)
                send(b, type="join_crew", device_id=BOB, display_name="Bob", crew_code="Café.B827 EB")
                joined = recv(b)
                joined_by_bot = bot(self.port, "POST", "crew/join",
                                    {"telegram_user_id": 7, "crew_code": "café.b827 eb", "display_name": "Tina"})
                status = bot(self.port, "GET", "crew/status?crew_code=caf%C3%A9.b827%20eb")
                return created, joined, joined_by_bot, status

        created, joined, joined_by_bot, status = yield ws_session(self.port, script)
        self.assertEqual((created["type"], created["crew_code"]), ("crew_created", "CAFÉ.B827 EB"))
        self.assertEqual((joined["type"], joined["crew_code"], joined["member_names"]),
                         ("crew_joined", "CAFÉ.B827 EB", ["Ann"]))
        self.assertEqual(joined_by_bot, (200, {"success": True, "crew_code": "CAFÉ.B827 EB", "devices_online": 2}))
        self.assertEqual(status[1]["device_names"], ["Ann", "Bob"])

    @defer.inlineCallbacks
    def test_codes_refused(self):
        """
        A code over 64 code points, with a control character, or of
        whitespace only is refused with invalid_crew_code naming the rule,
        on join_crew, create_crew and the bot API (400), and the connection
        goes on working.
        """
        refused = [("X" * 65, "64"), ("a\u0007b", "control"), ("   ", "whitespace")]

        def script(opener):
            answers = []
            with opener() as a:
                for code, _ in refused:
                    for kind in ("join_crew", "create_crew"):
                        send(a, type=kind, device_id=ANN, crew_code=code)
                        answers.append((kind, recv(a)))
                    answers.append(("bot", bot(self.port, "POST", "crew/join",
                                               {"telegram_user_id": 7, "crew_code": code, "display_name": "T"})[1]))
                send(a, type="ping")
                return answers, recv(a)

        answers, pong = yield ws_session(self.port, script)
        for (kind, answer), (code, rule) in zip(answers, [r for r in refused for _ in range(3)]):
            self.assertEqual(answer["error"], "invalid_crew_code", (kind, code))
            self.assertIn(rule, answer["message"], (kind, code))
        self.assertEqual(pong, {"type": "pong"})
        self.assertEqual(self.relay.crews, {})


class LegacyReplayTests(InProcessRelay):
    args = ("--legacy-replay-age", "3600", "--ephemeral-age", "60", "--replay-limit", "4")

    @defer.inlineCallbacks
    def test_no_stale_storm(self):
        """
        A deployed device coming back is replayed only messages younger
        than --legacy-replay-age, nudges and reactions only younger than
        --ephemeral-age, then at most --replay-limit; each replayed frame
        says "replayed": true and keeps its original timestamp.  A client
        that resumes with last_seq gets everything within retention and the
        limit.
        """
        sent_at = {}

        def message(a, text, msg_type="text"):
            sent_at[text] = int(self.clock.seconds() * 1000)
            say(a, text, msg_type)

        def script(opener):
            with opener() as a:
                send(a, type="create_crew", device_id=ANN, crew_code="home")
                recv(a)
                for device_id, extra in ((BOB, {}), ("resumer", {"last_seq": 0})):
                    with opener() as b:
                        send(b, type="register", device_id=device_id, crew_code="home", **extra)
                        recv(b)
                    messages_until(a, lambda m: m["type"] == "member_offline")
                message(a, "two hours old")
                self.clock.offset += 3600
                message(a, "59 minutes old")
                message(a, "old nudge", "nudge")
                message(a, "old reaction", "reaction")
                send(a, type="reaction", reaction_type="fire", client_msg_id="r1")
                messages_until(a, lambda m: m["type"] == "sent")
                self.clock.offset += 3500
                message(a, "fresh nudge", "nudge")
                message(a, "fresh", "text")
                self.clock.offset += 40
                with opener() as b:
                    send(b, type="register", device_id=BOB, crew_code="home")
                    recv(b)
                    send(a, type="message", payload={"text": "live"})
                    legacy = messages_until(b, lambda m: m.get("payload", {}).get("text") == "live")
                with opener() as c:
                    send(c, type="register", device_id="resumer", crew_code="home", last_seq=0)
                    recv(c)
                    send(a, type="message", payload={"text": "live 2"})
                    resumed = messages_until(c, lambda m: m.get("payload", {}).get("text") == "live 2")
                return legacy, resumed

        legacy, resumed = yield ws_session(self.port, script)
        replayed = [m for m in legacy if m.get("replayed")]
        self.assertEqual([(m["msg_type"], m["payload"]["text"]) for m in replayed],
                         [("text", "59 minutes old"), ("nudge", "fresh nudge"), ("text", "fresh")])
        for m in replayed:
            self.assertIs(m["replayed"], True)
            # stamped when the relay took it, not when it replayed it
            self.assertTrue(0 <= m["timestamp"] - sent_at[m["payload"]["text"]] < 2000, m)
        self.assertNotIn("replayed", legacy[-1])
        self.assertNotIn("replay_truncated", [m["type"] for m in legacy])
        # the resumer: the newest four within retention, whatever their age
        self.assertEqual([m.get("payload", {}).get("text", m["type"]) for m in resumed if m.get("replayed")],
                         ["reaction", "fresh nudge", "fresh", "live"])
        self.assertEqual(resumed[0]["type"], "replay_truncated")


class BindTimeoutTests(InProcessRelay):
    args = ("--bind-timeout", "0.3",)

    @defer.inlineCallbacks
    def test_unbound_closed(self):
        """
        A connection that binds no device (here: its join_crew is refused,
        as when a deployed brain's join and create both fail) is closed with
        4008 after --bind-timeout; one that registered, opened before it,
        stays open.
        """

        def script(opener):
            with opener() as bound, opener() as unbound:
                send(bound, type="register", device_id=ANN)
                recv(bound)
                send(unbound, type="join_crew", crew_code="nowhere", device_id=BOB)
                refused = recv(unbound)
                try:
                    unbound.recv(timeout=TIMEOUT)
                except ConnectionClosed:
                    pass
                send(bound, type="ping")
                return refused, unbound.close_code, recv(bound)

        refused, code, pong = yield ws_session(self.port, script)
        self.assertEqual(refused["error"], "invalid_crew_code")
        self.assertEqual(code, 4008)
        self.assertEqual(pong, {"type": "pong"})


class TwistdTests(TestCase):
    """
    ``twistd leeloo`` on one data directory, restarted or killed between
    the steps.
    """

    timeout = 120

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "TELEGRAM_API_SECRET": SECRET})

    @defer.inlineCallbacks
    def start(self, *args):
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.data_dir,
                             *FAST_KEEPALIVE, *NO_GRACE, *args)
        port = yield relay.proto.port
        return relay, port


class DeviceScenario(TwistdTests):
    """
    Ann on a websockets client, Bob on deployed device processes.
    """

    def join(self, port, a):
        """
        Ann (the websockets client C{a}) in crew HOME, and Bob (a deployed
        device process) joined to it and receiving live.
        """
        send(a, type="create_crew", device_id=ANN, display_name="Ann", crew_code="home")
        recv(a)
        b = DeviceProcess(self, port, BOB, "home", "Bob")
        b.until(lambda m: m["type"] == "crew_joined")
        messages_until(a, lambda m: m["type"] == "member_joined")
        say(a, "before")
        b.until(lambda m: m.get("payload", {}).get("text") == "before")
        return b

    def back(self, port, a):
        """
        Bob's device comes back with the same id; Ann sends a live message;
        return everything Bob's new process received up to it.
        """
        b = DeviceProcess(self, port, BOB, "home", "Bob")
        b.until(lambda m: m["type"] == "crew_joined")
        send(a, type="message", payload={"text": "after"})
        return b.until(lambda m: m.get("payload", {}).get("text") == "after")

    def ann_back(self, port, opener):
        with opener() as a:
            send(a, type="register", device_id=ANN, crew_code="home", device_name="Ann")
            recv(a)
            return self.back(port, a)

    def assertEverything(self, received, missed):
        got = texts(received)
        for text in missed:
            self.assertIn(text, got)
        self.assertTrue(all(m["replayed"] for m in received
                            if m.get("type") == "message" and m["payload"]["text"] in missed))
        self.assertEqual(got[-1], "after")
        # at most one ping interval's worth twice: here, at most "before"
        self.assertLessEqual(len(got), len(missed) + 2)


class FrozenDeviceTests(DeviceScenario):
    @defer.inlineCallbacks
    def test_frozen_then_dropped(self):
        """
        A device frozen (SIGSTOP) while its crew sends is dropped by the
        keepalive; killed and started again with the same id, it receives
        every message sent while it was frozen.
        """
        relay, port = yield self.start()
        missed = ["frozen 1", "frozen 2", "frozen 3"]

        def script(opener):
            with opener() as a:
                b = self.join(port, a)
                b.freeze()
                for text in missed:
                    say(a, text)
                messages_until(a, lambda m: m["type"] == "member_offline")
                b.kill()
                return self.back(port, a)

        received = yield ws_session(port, script)
        self.assertEverything(received, missed)

    @defer.inlineCallbacks
    def test_frozen_dropped_then_relay_killed(self):
        """
        The same with a kill -9 of the relay between the device being
        dropped and coming back: only the proven position was stored.
        """
        relay, port = yield self.start()
        missed = ["frozen 1", "frozen 2", "offline"]

        def before(opener):
            with opener() as a:
                b = self.join(port, a)
                b.freeze()
                for text in missed[:2]:
                    say(a, text)
                messages_until(a, lambda m: m["type"] == "member_offline")
                # durable after Bob's member record was written
                say(a, missed[2])
                b.kill()

        yield ws_session(port, before)
        yield relay.stop("KILL")
        relay, port = yield self.start()
        received = yield ws_session(port, lambda opener: self.ann_back(port, opener))
        self.assertEverything(received, missed)

    @defer.inlineCallbacks
    def test_relay_killed_while_frozen(self):
        """
        A kill -9 of the relay while the frozen device is still counted
        online: at restore it is not credited with what was only written
        to it.
        """
        relay, port = yield self.start("--ping-timeout", "30")
        missed = ["frozen 1", "frozen 2"]
        frozen = []

        def before(opener):
            with opener() as a:
                b = self.join(port, a)
                frozen.append(b)
                b.freeze()
                for text in missed:
                    say(a, text)

        yield ws_session(port, before)
        yield relay.stop("KILL")
        frozen[0].kill()
        relay, port = yield self.start()
        received = yield ws_session(port, lambda opener: self.ann_back(port, opener))
        self.assertEverything(received, missed)


class CleanRestartTests(DeviceScenario):
    @defer.inlineCallbacks
    def test_close_answer_proves(self):
        """
        A deployed device that answers the relay's close at a clean stop
        has proved what it received: back after the restart, it is not
        sent it again (no ping proved it: the interval is a minute).
        """
        relay, port = yield self.start("--ping-interval", "60")
        devices = []

        def before(opener):
            with opener() as a:
                devices.append(self.join(port, a))
                say(a, "seen")
                devices[0].until(lambda m: m.get("payload", {}).get("text") == "seen")

        yield ws_session(port, before)
        yield relay.stop("TERM")
        closed = yield ws_session(port, lambda opener: devices[0].until(lambda m: m["type"] == "_closed"))
        relay, port = yield self.start()
        received = yield ws_session(port, lambda opener: self.ann_back(port, opener))
        self.assertEqual(closed[-1], {"type": "_closed", "code": 1001})
        self.assertEqual(texts(received), ["after"])


class BotStateTests(TwistdTests):
    @defer.inlineCallbacks
    def test_user_crews_survive_restart(self):
        """
        GET /api/telegram/user/crews lists the crews a bot user is in, with
        its name there and the devices online, before and after a restart;
        an unknown user has none.
        """
        relay, port = yield self.start()

        def before(opener):
            with opener() as a:
                send(a, type="create_crew", device_id=ANN, display_name="Ann", crew_code="home")
                recv(a)
                bot(port, "POST", "crew/join", {"telegram_user_id": 77, "crew_code": "home", "display_name": "Tina"})
                _, created = bot(port, "POST", "crew/create", {"telegram_user_id": "77", "display_name": "T."})
                return (created["crew_code"], bot(port, "GET", "user/crews?telegram_user_id=77"),
                        bot(port, "GET", "user/crews?telegram_user_id=78"))

        code, listed, unknown = yield ws_session(port, before)
        yield relay.stop("TERM")
        relay, port = yield self.start()
        after = yield ws_session(port, lambda opener: bot(port, "GET", "user/crews?telegram_user_id=77"))
        self.assertEqual(listed, (200, {"telegram_user_id": "77", "crews": [
            {"crew_code": "HOME", "display_name": "Tina", "devices_online": 1},
            {"crew_code": code, "display_name": "T.", "devices_online": 0},
        ]}))
        self.assertEqual(unknown, (200, {"telegram_user_id": "78", "crews": []}))
        self.assertEqual(after, (200, {"telegram_user_id": "77", "crews": [
            {"crew_code": "HOME", "display_name": "Tina", "devices_online": 0},
            {"crew_code": code, "display_name": "T.", "devices_online": 0},
        ]}))
