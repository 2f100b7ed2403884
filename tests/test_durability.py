"""
Nothing lost, for real: ``twistd leeloo`` processes on one data directory,
stopped with SIGTERM or killed with SIGKILL between the steps, and devices
speaking through the ``websockets`` package.
"""

import json
import os
import stat
import urllib.request

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from .support import TIMEOUT, RelayProcess, recv, ws_session

SECRET = "test-secret"


def send(ws, **fields):
    ws.send(json.dumps(fields))


def messages_until(ws, predicate):
    """
    Receive until C{predicate(message)}; return everything received.
    """
    received = []
    while True:
        message = recv(ws)
        received.append(message)
        if predicate(message):
            return received


def bot(port, path, body=None):
    url = f"http://127.0.0.1:{port}/api/telegram/{path}"
    headers = {"X-Api-Secret": SECRET, "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    return json.load(urllib.request.urlopen(request, timeout=TIMEOUT))


class DurabilityTests(TestCase):
    timeout = 90

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "TELEGRAM_API_SECRET": SECRET})

    @defer.inlineCallbacks
    def start(self):
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.data_dir)
        port = yield relay.proto.port
        return relay, port

    @defer.inlineCallbacks
    def test_crews_survive_restart_and_kill(self):
        """
        Crews, memberships and bot users survive a clean restart and a
        kill -9: join_crew with an old code works and the bot API's status
        answers as before.
        """
        relay, port = yield self.start()

        def before(opener):
            with opener() as a:
                send(a, type="create_crew", device_id="leeloo_aaaaaaaaaaaa", display_name="Ann")
                code = recv(a)["crew_code"]
                bot(port, "crew/join", {"telegram_user_id": 99, "crew_code": code, "display_name": "Tina"})
                # a durable message acknowledges everything before it
                send(a, type="message", payload={"text": "x"}, client_msg_id="m1")
                recv(a)
                return code, bot(port, f"crew/status?crew_code={code}")

        code, status_before = yield ws_session(port, before)
        yield relay.stop("KILL")
        relay, port = yield self.start()

        def after(opener):
            with opener() as b:
                send(b, type="join_crew", crew_code=code, device_id="leeloo_bbbbbbbbbbbb", display_name="Bob")
                return recv(b), bot(port, f"crew/status?crew_code={code}")

        joined, status_killed = yield ws_session(port, after)
        yield relay.stop("TERM")
        relay, port = yield self.start()
        status_restarted = yield ws_session(port, lambda opener: bot(port, f"crew/status?crew_code={code}"))

        self.assertEqual((joined["type"], joined["crew_code"]), ("crew_joined", code))
        self.assertEqual(status_before["telegram_user_names"], ["Tina"])
        self.assertEqual(status_killed["telegram_user_names"], ["Tina"])
        self.assertTrue(status_restarted["exists"])
        self.assertEqual(status_restarted["telegram_user_names"], ["Tina"])

    @defer.inlineCallbacks
    def test_offline_device_gets_song_after_restart(self):
        """
        A deployed device that was unplugged while its friend pushed a song
        gets it when it comes back, even though the relay restarted between.
        """
        relay, port = yield self.start()

        def push(opener):
            with opener() as a, opener() as b:
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="home", device_name="Ann")
                send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="home", device_name="Bob")
                recv(a), recv(b)
                b.close()
                send(a, type="message", msg_type="song_push",
                     payload={"track": "Teardrop", "artist": "Massive Attack"}, client_msg_id="s1")
                return messages_until(a, lambda m: m["type"] == "sent")

        yield ws_session(port, push)
        yield relay.stop("TERM")
        relay, port = yield self.start()

        def back(opener):
            with opener() as b:
                send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="home", device_name="Bob")
                return recv(b), recv(b)

        registered, song = yield ws_session(port, back)
        self.assertEqual(registered["type"], "registered")
        self.assertEqual((song["msg_type"], song["payload"]["track"]), ("song_push", "Teardrop"))

    @defer.inlineCallbacks
    def test_exactly_once_across_kill(self):
        """
        A device that acknowledges and resumes gets each message exactly
        once when the relay is killed between a message being stored and
        delivered, and a sender's resend with the same client_msg_id after
        the restart is not delivered again.
        """
        relay, port = yield self.start()

        def first(opener):
            with opener() as a, opener() as b:
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="duo")
                send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="duo", last_seq=0)
                recv(a), recv(b)
                send(a, type="message", payload={"text": "one"}, client_msg_id="c1")
                messages_until(a, lambda m: m["type"] == "sent")
                got = [recv(b)]
                send(b, type="ack", seq=got[0]["seq"])
                b.close()
                # stored, but b is away: killed before it can be delivered
                send(a, type="message", payload={"text": "two"}, client_msg_id="c2")
                messages_until(a, lambda m: m["type"] == "sent")
                return got

        received = yield ws_session(port, first)
        yield relay.stop("KILL")
        relay, port = yield self.start()

        def resume(opener):
            with opener() as a, opener() as b:
                send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="duo",
                     last_seq=received[-1]["seq"])
                recv(b)
                got = [recv(b)]
                send(b, type="ack", seq=got[-1]["seq"])
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="duo")
                recv(a)
                # a never saw its "sent" for c2 (say): it resends
                send(a, type="message", payload={"text": "two"}, client_msg_id="c2")
                resent = messages_until(a, lambda m: m["type"] == "sent")[-1]
                send(a, type="message", payload={"text": "three"}, client_msg_id="c3")
                got.append(recv(b))
                return got, resent

        more, resent = yield ws_session(port, resume)
        received.extend(more)
        texts = [m["payload"]["text"] for m in received]
        self.assertEqual(texts, ["one", "two", "three"])
        self.assertEqual([m["seq"] for m in received], [1, 2, 3])
        self.assertEqual(resent["seq"], 2)

    @defer.inlineCallbacks
    def test_multi_crew_device_after_restart(self):
        """
        After a relay restart a device in three crews (issue 16) re-enters
        all three when it registers, and gets what it missed in each,
        tagged with its crew; its primary is kept.
        """
        relay, port = yield self.start()
        friends = {"ALPHA": "leeloo_a00000000000", "BRAVO": "leeloo_b00000000000", "CHARLIE": "leeloo_c00000000000"}

        def before(opener):
            with opener() as a, opener() as b, opener() as c, opener() as m:
                for ws, (code, device_id) in zip((a, b, c), friends.items()):
                    send(ws, type="register", device_id=device_id, crew_code=code)
                    recv(ws)
                send(m, type="register", device_id="leeloo_m00000000000", crew_code="ALPHA")
                answers = [recv(m)]
                for code in ("BRAVO", "CHARLIE"):
                    send(m, type="crew_add", crew_code=code)
                    answers.append(recv(m))
                send(m, type="crew_primary", crew_code="BRAVO")
                answers.append(recv(m))
                return answers

        answers = yield ws_session(port, before)
        yield relay.stop("TERM")
        relay, port = yield self.start()

        def after(opener):
            with opener() as a, opener() as b, opener() as c:
                for ws, (code, device_id) in zip((a, b, c), friends.items()):
                    send(ws, type="register", device_id=device_id, crew_code=code)
                    recv(ws)
                    send(ws, type="message", payload={"text": f"to {code}"}, client_msg_id="1")
                    messages_until(ws, lambda m: m["type"] == "sent")
                with opener() as m:
                    send(m, type="register", device_id="leeloo_m00000000000")
                    got = [recv(m) for _ in range(4)]
                    send(m, type="crews")
                    listed = messages_until(m, lambda f: f["type"] == "crews")[-1]
                return got, listed

        got, listed = yield ws_session(port, after)
        yield relay.stop("TERM")
        self.assertEqual([f["type"] for f in answers], ["registered", "crew_joined", "crew_joined", "crew_primary"])
        self.assertEqual(got[0]["type"], "registered")
        self.assertEqual(sorted((f["crew_code"], f["payload"]["text"]) for f in got[1:]),
                         [("ALPHA", "to ALPHA"), ("BRAVO", "to BRAVO"), ("CHARLIE", "to CHARLIE")])
        self.assertEqual((listed["primary"], [c["crew_code"] for c in listed["crews"]]),
                         ("BRAVO", ["ALPHA", "BRAVO", "CHARLIE"]))

    @defer.inlineCallbacks
    def test_files_private(self):
        """
        The data directory is 0700 and the database files 0600.
        """
        relay, port = yield self.start()
        yield relay.stop("TERM")
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)
        names = sorted(os.listdir(self.data_dir))
        self.assertIn("leeloo.sqlite3", names)
        for name in names:
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.data_dir, name)).st_mode), 0o600, name)
