"""
The C{leeloo-device} command: as a process (C{python -m leeloo.device},
what the console script runs) for exit statuses and output, and in process
for the long-running commands; its packaging.
"""

import configparser
import io
import json
import os
import sys
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer, protocol, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.device import cli

from ..support import CHECKOUT
from .loopback import LoopbackRelay, start_device


def leeloo_device(*args):
    """
    Run C{python -m leeloo.device ARGS} from the checkout under test; fire
    with C{(stdout, stderr, status)}.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)
    env["PYTHONIOENCODING"] = "utf-8"
    d = getProcessOutputAndValue(sys.executable, ["-m", "leeloo.device", *args], env=env, path=CHECKOUT)
    return d.addCallback(lambda r: (r[0].decode("utf-8"), r[1].decode("utf-8"), r[2]))


class ProcessTests(TestCase):

    timeout = 60

    @defer.inlineCallbacks
    def test_check_passes_with_status_0(self):
        """
        leeloo-device check against a running relay prints a tick per step
        and exits 0.
        """
        relay = yield LoopbackRelay(self, store="memory").start()
        out, err, status = yield leeloo_device("check", relay.url(), "--timeout", "10")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 7)
        self.assertTrue(all(line.startswith("\N{CHECK MARK}") for line in out.splitlines()))

    @defer.inlineCallbacks
    def test_check_fails_with_one_line_and_status_1(self):
        """
        Against a closed port, check prints one line (no traceback) saying
        the connection was refused, and exits 1.
        """
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        out, err, status = yield leeloo_device("check", f"ws://127.0.0.1:{number}/ws")
        self.assertEqual((status, err), (1, ""))
        [line] = out.splitlines()
        self.assertIn("refused", line)

    @defer.inlineCallbacks
    def test_check_over_tls_with_and_without_the_ca(self):
        """
        Against a relay with a certificate from a private CA, check fails
        with one line about the certificate, and passes with --ca.
        """
        from .test_check import tls_listen

        listen, ca = tls_listen(self)
        relay = yield LoopbackRelay(self, listen=listen, store="memory").start()
        ca_file = os.path.abspath(self.mktemp())
        with open(ca_file, "wb") as f:
            f.write(ca.root_pem)
        url = relay.url("wss", "localhost")
        out, err, status = yield leeloo_device("check", url)
        self.assertEqual((status, err), (1, ""))
        [line] = out.splitlines()
        self.assertIn("certificate", line)
        out, err, status = yield leeloo_device("check", url, "--ca", ca_file)
        self.assertEqual((status, err), (0, ""), out)

    @defer.inlineCallbacks
    def test_bad_usage_exits_2(self):
        """
        The command without arguments prints its usage and exits 2.
        """
        out, err, status = yield leeloo_device()
        self.assertEqual(status, 2)
        self.assertIn("usage: leeloo-device", err)
        self.assertNotIn("Traceback", err)

    @defer.inlineCallbacks
    def test_send_reaches_the_crew(self):
        """
        leeloo-device send joins the crew it is given, sends the text, and
        exits 0 once the relay confirmed it; a device in that crew gets it.
        """
        relay = yield LoopbackRelay(self, store="memory").start()
        device, events = start_device(self, relay.url(), "Ann")
        joined = yield events.wait("connected", after=0)
        arrived = events.wait("message")
        state = os.path.abspath(self.mktemp())
        out, err, status = yield leeloo_device("send", relay.url(), "--state", state, "--crew",
                                               joined["crew_code"], "--name", "Cli", "hello from the shell")
        self.assertEqual((status, err), (0, ""), out)
        self.assertIn(f"sent to crew {joined['crew_code']}", out)
        message = yield arrived
        self.assertEqual((message["from_name"], message["payload"]), ("Cli", {"text": "hello from the shell"}))
        with open(os.path.join(state, "crew_config.json")) as f:
            self.assertEqual(json.load(f)["crew_code"], joined["crew_code"])

    @defer.inlineCallbacks
    def test_send_to_a_relay_that_is_down_times_out_and_keeps_it(self):
        """
        send against a relay that is down exits 1 after its timeout with one
        line, and keeps the message in the outbox for the next run.
        """
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        state = os.path.abspath(self.mktemp())
        out, err, status = yield leeloo_device("send", f"ws://127.0.0.1:{number}/ws", "--state", state,
                                               "--timeout", "0.5", "later")
        self.assertEqual((status, err), (1, ""))
        [line] = out.splitlines()
        self.assertIn("timed out", line)
        self.assertIn("outbox", line)
        with open(os.path.join(state, "outbox.json")) as f:
            self.assertEqual(json.load(f)["messages"][0]["message"]["payload"], {"text": "later"})


class UsageTests(SynchronousTestCase):

    def test_bad_usage_exits_2(self):
        """
        An unknown command, a URL that is not ws:// or wss://, a missing
        --state, an unreadable --ca file or a timeout of zero: a usage
        message (no traceback) and status 2.
        """
        for args in (["frobnicate"], ["check", "http://relay.example/ws"], ["listen", "ws://h/ws"],
                     ["check", "ws://h/ws", "--ca", "/nonexistent/ca.pem"], ["check", "ws://h/ws", "--timeout", "0"],
                     ["pair-spotify", "ws://h/ws", "--state", "d", "--client-id", "c"],
                     ["pair-spotify", "ws://h/ws", "--state", "d", "--legacy"]):
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            e = self.assertRaises(SystemExit, cli.parse, args)
            self.assertEqual(e.code, 2, args)
            self.assertIn("usage: leeloo-device", err.getvalue())


class InProcessTests(TestCase):

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.relay = yield LoopbackRelay(self, store="memory").start()

    def run_command(self, *argv):
        out = io.StringIO()
        return cli.run(reactor, cli.parse(list(argv)), out), out

    @defer.inlineCallbacks
    def test_listen_prints_every_event_as_a_json_line(self):
        """
        leeloo-device listen prints each event as one JSON object per line,
        with its event name: its own connection, then a crew message.
        """
        ann, events = start_device(self, self.relay.url(), "Ann")
        joined = yield events.wait("connected", after=0)
        member = events.wait("member_joined")
        d, out = self.run_command("listen", self.relay.url(), "--state", self.mktemp(), "--crew",
                                  joined["crew_code"], "--name", "Lis")
        got = defer.Deferred()

        def written(text, write=out.write):
            write(text)
            if "to the listener" in text:
                got.callback(None)

        out.write = written
        yield member
        yield ann.send_text("to the listener")
        yield got
        d.cancel()
        self.assertEqual((yield d), 0)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(lines[0]["event"], "connected")
        self.assertEqual(lines[0]["crew_code"], joined["crew_code"])
        [message] = [line for line in lines if line["event"] == "message"]
        self.assertEqual((message["from_name"], message["payload"]), ("Ann", {"text": "to the listener"}))

    @defer.inlineCallbacks
    def test_unusable_state_directory_is_one_line(self):
        """
        A state directory that cannot be created, or holds a broken
        crew_config.json, fails the command with one line naming it.
        """
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        d, out = self.run_command("listen", self.relay.url(), "--state", os.path.join(blocker, "state"))
        self.assertEqual((yield d), 1)
        [line] = out.getvalue().splitlines()
        self.assertIn("cannot use the state directory", line)
        broken = self.mktemp()
        os.makedirs(broken)
        with open(os.path.join(broken, "crew_config.json"), "w") as f:
            f.write("{")
        d, out = self.run_command("send", self.relay.url(), "--state", broken, "hi")
        self.assertEqual((yield d), 1)
        [line] = out.getvalue().splitlines()
        self.assertIn("crew_config.json is not valid JSON", line)

    @defer.inlineCallbacks
    def test_pair_spotify_legacy_shows_the_url_and_waits_for_the_tokens(self):
        """
        pair-spotify --legacy prints Spotify's authorize URL with the device
        id as its state, and its QR code, then saves the tokens the relay
        sends to spotify_tokens.json and exits 0.
        """
        state = os.path.abspath(self.mktemp())
        os.makedirs(state)
        with open(os.path.join(state, "crew_config.json"), "w") as f:
            json.dump({"device_id": "leeloo_cccccccccccc", "crew_code": "PAIR"}, f)
        tokens = {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}
        # The phone finishes first: the relay keeps the tokens for the id.
        self.assertFalse(self.relay.relay.deliver_tokens("leeloo_cccccccccccc", tokens))
        d, out = self.run_command("pair-spotify", self.relay.url(), "--state", state, "--client-id", "cid",
                                  "--redirect-uri", "https://relay.example/spotify/callback", "--legacy")
        self.assertEqual((yield d), 0)
        text = out.getvalue()
        [url] = [line for line in text.splitlines() if line.startswith("https://accounts.spotify.com/")]
        query = parse_qs(urlsplit(url).query)
        self.assertEqual(query["state"], ["leeloo_cccccccccccc"])
        self.assertEqual(query["client_id"], ["cid"])
        self.assertEqual(query["redirect_uri"], ["https://relay.example/spotify/callback"])
        self.assertEqual(query["response_type"], ["code"])
        self.assertIn("\N{FULL BLOCK}", text)
        with open(os.path.join(state, "spotify_tokens.json")) as f:
            self.assertEqual(json.load(f), tokens)


class PackagingTests(SynchronousTestCase):

    def test_console_script_is_declared(self):
        """
        setup.cfg declares the leeloo-device console script on cli.main,
        and a device extra with qrcode.
        """
        config = configparser.ConfigParser()
        config.read(os.path.join(CHECKOUT, "setup.cfg"))
        scripts = dict(
            (name.strip(), target.strip())
            for name, target in (line.split("=") for line in
                                 config["options.entry_points"]["console_scripts"].strip().splitlines()))
        module, function = scripts["leeloo-device"].split(":")
        imported = __import__(module, fromlist=[function])
        self.assertIs(getattr(imported, function), cli.main)
        self.assertIn("qrcode", config["options.extras_require"]["device"])

    def test_relay_does_not_import_the_device(self):
        """
        Importing every relay module (and the twistd plugin) imports
        nothing from leeloo.device.
        """
        import subprocess

        script = (
            "import pkgutil, sys, leeloo\n"
            "names = [m.name for m in pkgutil.iter_modules(leeloo.__path__, 'leeloo.')"
            " if m.name != 'leeloo.device']\n"
            "for name in names: __import__(name)\n"
            "import twisted.plugins.leeloo_plugin\n"
            "print(len(names), sorted(m for m in sys.modules if m.startswith('leeloo.device')))\n"
        )
        env = dict(os.environ, PYTHONPATH=CHECKOUT)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                                cwd=CHECKOUT, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        count, imported = result.stdout.split(" ", 1)
        self.assertGreater(int(count), 10)
        self.assertEqual(imported.strip(), "[]")
