"""
End to end over loopback: the whole service tree on a real reactor with the
``websockets`` package (what the devices use) as an independent client, and
``twistd leeloo`` as a real process.
"""

import json
import signal
from collections import Counter
import urllib.request

import txaio
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from leeloo.tap import Options, build_service

from .support import TIMEOUT, RelayProcess, closing_clients, listening_port, recv, ws_session

class ServiceTests(TestCase):
    """
    The service tree built by the plugin, on the real reactor.
    """

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        options = Options(environ={"TELEGRAM_API_SECRET": "test-secret"})
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.mktemp(),
                              "--presence-grace", "0.1"])
        self.service = build_service(options.config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        port = yield listening_port(self.service)
        self.port = port.getHost().port

    @defer.inlineCallbacks
    def test_crew_over_websockets(self):
        """
        Two devices using the websockets package create and join a crew,
        share a song and a message, and see each other go offline.
        """

        def script(opener):
            with opener() as a, opener() as b:
                a.send(json.dumps({"type": "create_crew", "device_id": "leeloo_aaaaaaaaaaaa", "display_name": "Ann"}))
                created = recv(a)
                b.send(json.dumps({"type": "join_crew", "crew_code": created["crew_code"].lower(),
                                   "display_name": "Bob"}))
                joined = recv(b)
                member_joined = recv(a)
                b.send(json.dumps({"type": "share_music", "spotify_uri": "spotify:track:1",
                                   "artist": "A", "track": "T", "album": "B"}))
                shared = recv(a)
                a.send(json.dumps({"type": "message", "msg_type": "text", "payload": {"text": "hi"}}))
                message = recv(b)
                b.send("not json")
                error = recv(b)
                b.close()
                offline = recv(a)
                return created, joined, member_joined, shared, message, error, offline

        created, joined, member_joined, shared, message, error, offline = yield ws_session(self.port, script)
        code = created["crew_code"]
        self.assertRegex(code, r"^LEELOO-[A-HJ-NP-Z2-9]{4}$")
        self.assertEqual((joined["type"], joined["crew_members"], joined["member_names"]), ("crew_joined", 2, ["Ann"]))
        self.assertEqual(member_joined["type"], "member_joined")
        self.assertEqual((shared["type"], shared["pushed_by"], shared["track"]), ("music_shared", "Bob", "T"))
        self.assertEqual((message["from_device"], message["payload"]), ("leeloo_aaaaaaaaaaaa", {"text": "hi"}))
        self.assertEqual(error["error"], "invalid_json")
        self.assertEqual(offline["type"], "member_offline")

    @defer.inlineCallbacks
    def test_health_and_bot_over_http(self):
        """
        /health and the bot API answer over real HTTP on the same port as
        the WebSocket.
        """
        base = f"http://127.0.0.1:{self.port}"

        def script(opener):
            with opener() as ws:
                ws.send(json.dumps({"type": "register", "device_id": "dev1", "crew_code": "home"}))
                recv(ws)
                health = json.load(urllib.request.urlopen(base + "/health", timeout=TIMEOUT))
                request = urllib.request.Request(
                    base + "/api/telegram/crew/join",
                    data=json.dumps({"telegram_user_id": 5, "crew_code": "home", "display_name": "T"}).encode(),
                    headers={"Content-Type": "application/json", "X-Api-Secret": "test-secret"},
                )
                joined = json.load(urllib.request.urlopen(request, timeout=TIMEOUT))
                request = urllib.request.Request(
                    base + "/api/telegram/message",
                    data=json.dumps({"telegram_user_id": 5, "crew_code": "HOME", "sender_name": "T",
                                     "msg_type": "text", "payload": {"text": "from the bot"}}).encode(),
                    headers={"Content-Type": "application/json", "X-Api-Secret": "test-secret"},
                )
                sent = json.load(urllib.request.urlopen(request, timeout=TIMEOUT))
                return health, joined, sent, recv(ws)

        health, joined, sent, received = yield ws_session(self.port, script)
        self.assertEqual((health["status"], health["devices"], health["crews"]), ("ok", 1, 1))
        self.assertEqual(joined, {"success": True, "crew_code": "HOME", "devices_online": 1})
        self.assertEqual(sent, {"success": True, "devices_reached": 1})
        self.assertEqual((received["from_device"], received["payload"]), ("telegram", {"text": "from the bot"}))


class TwistdTests(TestCase):
    """
    ``twistd leeloo`` as a real process.
    """

    timeout = 60

    def twistd(self, *args):
        relay = RelayProcess(self, *args)
        return relay.proto, relay.transport

    @defer.inlineCallbacks
    def test_runs_and_stops_cleanly(self):
        """
        twistd leeloo serves devices on its listen endpoint; on SIGTERM it
        closes their WebSockets with 1001 (going away) and exits.
        """
        proto, transport = self.twistd("--listen", "tcp:0:interface=127.0.0.1")
        port = yield proto.port
        ready = defer.Deferred()

        def script(opener):
            from websockets.exceptions import ConnectionClosed

            with opener() as ws:
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_bbbbbbbbbbbb", "crew_code": "x"}))
                registered = recv(ws)
                reactor.callFromThread(ready.callback, None)
                try:
                    ws.recv(timeout=TIMEOUT)
                except ConnectionClosed as e:
                    return registered, e.rcvd.code if e.rcvd else None

        session = ws_session(port, script)
        yield ready
        transport.signalProcess("TERM")
        registered, close_code = yield session
        ended = yield proto.ended
        self.assertEqual((registered["type"], registered["device_id"]), ("registered", "leeloo_bbbbbbbbbbbb"))
        self.assertEqual(close_code, 1001)
        # twistd stops cleanly, then exits by the signal it was sent.
        self.assertIn((ended.exitCode, ended.signal), [(0, None), (None, signal.SIGTERM)])
        self.assertIn(b"Server Shut Down", proto.output)
        self.assertIn(b"LEELOO relay starting", proto.output)
        self.assertIn(b"WebSocket limits", proto.output)

    def test_sigterm_closes_every_websocket_with_1001(self):
        """
        On SIGTERM every one of 200 registered WebSocket devices receives
        its 1001 close frame before the relay exits cleanly.
        """
        return self.sigterm_closes_every_websocket()

    def test_sigterm_closes_every_websocket_with_1001_memory_store(self):
        """
        So does a relay whose store has nothing to flush (its shutdown does
        not wait on a database writer).
        """
        return self.sigterm_closes_every_websocket("--store", "memory")

    @defer.inlineCallbacks
    def sigterm_closes_every_websocket(self, *store):
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--join-attempts", "1000",
                             "--connect-rate", "1000", *store)
        port = yield relay.proto.port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        clients = yield closing_clients(200, endpoint.connect, f"ws://127.0.0.1:{port}/ws")
        ended = yield relay.stop()
        codes = yield defer.gatherResults([c.closed for c in clients])
        self.assertEqual(Counter(codes), {1001: 200})
        self.assertIn((ended.exitCode, ended.signal), [(0, None), (None, signal.SIGTERM)])

    @defer.inlineCallbacks
    def test_each_bad_option_is_one_line(self):
        """
        twistd leeloo with a bad option value exits 1 printing one line that
        names the option, the value and what is allowed: not twistd's usage
        text.
        """
        import os
        import sys

        from twisted.internet.utils import getProcessOutputAndValue

        from .support import CHECKOUT

        env_file = os.path.abspath(self.mktemp())
        with open(env_file, "w") as f:
            f.write("TELEGRAM_API_SECRET=choose-a-long-random-string\n")
        os.chmod(env_file, 0o600)
        cases = [
            (["--max-message-size", "-5"], "leeloo: --max-message-size -5: must be a whole number, 1 or more"),
            (["--store", "postgres"], "leeloo: --store postgres: must be sqlite or memory"),
            (["--listen", "tcp:notaport"], "leeloo: --listen tcp:notaport is not a usable endpoint"),
            (["--no-such-option"], "leeloo: option --no-such-option not recognized"),
            (["--env-file", env_file], "leeloo: TELEGRAM_API_SECRET in --env-file"),
        ]
        cwd = self.mktemp()
        os.makedirs(cwd)
        runs = [getProcessOutputAndValue(
            sys.executable, ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                             "leeloo", *argv],
            env={**os.environ, "PYTHONPATH": CHECKOUT}, path=cwd) for argv, _ in cases]
        results = yield defer.gatherResults(runs)
        for (argv, expected), (out, err, code) in zip(cases, results):
            self.assertEqual(code, 1, argv)
            self.assertEqual(out, b"", argv)
            [line] = err.decode().splitlines()
            self.assertTrue(line.startswith(expected), line)

    @defer.inlineCallbacks
    def test_bad_configuration_is_one_message(self):
        """
        Bad configuration stops twistd leeloo with a message naming the
        problem, and no traceback.
        """
        proto, _ = self.twistd("--listen", "tcp:notaport")
        ended = yield proto.ended
        self.assertNotIn(ended.exitCode, (0, None))
        self.assertIn(b"tcp:notaport", proto.output)
        self.assertNotIn(b"Traceback", proto.output)
        proto.port.addErrback(lambda f: None)
