"""
C{leeloo-admin} for real: every command run as its own process against
the data directory of a running ``twistd leeloo``, with devices connected
through the ``websockets`` package (and deployed devices as processes of
their own).
"""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import CHECKOUT, TIMEOUT, DeviceProcess, RelayProcess, recv, ws_session

SECRET = "bot-s3cret-value"
FAST = ("--presence-grace", "0", "--messages-per-second", "2000", "--message-burst", "2000")


def admin(data_dir, *args):
    """
    Run C{leeloo-admin --data-dir DATA_DIR ARGS} (as C{python -m
    leeloo.admin}); its exit status, standard output and standard error.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-m", "leeloo.admin", "--data-dir", data_dir, *args],
                          capture_output=True, text=True, env=env, timeout=60)
    return done.returncode, done.stdout, done.stderr


def send(ws, **fields):
    ws.send(json.dumps(fields))


def until(ws, predicate):
    frames = []
    while True:
        frames.append(recv(ws))
        if predicate(frames[-1]):
            return frames


def of_type(kind):
    return lambda frame: frame.get("type") == kind


class CLITestCase(TestCase):
    timeout = 120

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "TELEGRAM_API_SECRET": SECRET})

    @defer.inlineCallbacks
    def start(self, data_dir=None, admin_listen=True, *extra):
        args = ["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", data_dir or self.data_dir, *FAST, *extra]
        if admin_listen:
            args += ["--admin-listen", "tcp:0:interface=127.0.0.1"]
        relay = RelayProcess(self, *args)
        ports = yield relay.proto.ready()
        return relay, ports

    def admin(self, *args, data_dir=None):
        return deferToThread(admin, data_dir or self.data_dir, *args)


class ReadingTests(CLITestCase):
    @defer.inlineCallbacks
    def test_reading_commands_while_running(self):
        """
        crews, crew, devices, export and config read the data directory of
        the running relay: its crews, members, devices (key hashes, never
        keys) and effective configuration (secrets masked).
        """
        relay, (port, _) = yield self.start()
        data_dir = self.data_dir

        def script(opener):
            with opener() as a, opener() as b:
                send(a, type="create_crew", crew_code="LEELOO-ALFA", device_id="leeloo_aaaaaaaaaaaa",
                     display_name="Ann", device_key="ann-secret-key-0123456789")
                recv(a)
                send(b, type="join_crew", crew_code="leeloo-alfa", device_id="leeloo_bbbbbbbbbbbb",
                     display_name="Bob")
                key = recv(b)["device_key"]
                send(a, type="message", payload={"text": "hello"}, client_msg_id="c1")
                until(a, of_type("sent"))
                return key, {name: admin(data_dir, *name.split())
                             for name in ("crews", "crew LEELOO-ALFA", "devices", "export", "config",
                                          "crew LEELOO-NONE", "crew", "crew \x01")}

        key, runs = yield ws_session(port, script)
        status, out, _ = runs["crews"]
        self.assertEqual(status, 0)
        self.assertEqual(out.splitlines(), ["LEELOO-ALFA  2 members, 2 online, 1 messages: Ann, Bob", "1 crews"])
        status, out, _ = runs["crew LEELOO-ALFA"]
        self.assertEqual(status, 0)
        self.assertIn("leeloo_bbbbbbbbbbbb  'Bob'  online", out)
        status, out, _ = runs["devices"]
        self.assertEqual((status, out.splitlines()[-1]), (0, "2 devices"))
        self.assertIn("leeloo_aaaaaaaaaaaa  key bound", out)
        status, out, _ = runs["export"]
        self.assertEqual(status, 0)
        document = json.loads(out)
        [crew] = document["crews"]
        self.assertEqual([json.loads(e["payload"])["payload"] for e in crew["log"]], [{"text": "hello"}])
        self.assertEqual(len(document["devices"]), 2)
        self.assertNotIn("ann-secret-key", out)
        self.assertNotIn(key, out)
        status, out, _ = runs["config"]
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)["config"]["telegram_api_secret"], "********")
        self.assertNotIn(SECRET, out)
        status, _, err = runs["crew LEELOO-NONE"]
        self.assertEqual((status, err), (1, "leeloo-admin: no crew LEELOO-NONE\n"))
        for bad in ("crew", "crew \x01"):
            status, _, err = runs[bad]
            self.assertEqual((status, len(err.splitlines())), (2, 1), err)
        yield relay.stop()
        logged = relay.proto.output.decode()
        self.assertNotIn("ann-secret-key", logged)
        self.assertNotIn(SECRET, logged)

    @defer.inlineCallbacks
    def test_no_database(self):
        """
        A data directory without a relay's database is refused, in one line.
        """
        os.makedirs(self.data_dir)
        status, out, err = yield self.admin("crews")
        self.assertEqual((status, out, len(err.splitlines())), (1, "", 1))
        self.assertIn("no database", err)


class BackupTests(CLITestCase):
    @defer.inlineCallbacks
    def test_backup_under_load(self):
        """
        A backup taken while devices keep sending opens, checks out, and
        holds every message answered sent before it began.
        """
        relay, [port] = yield self.start(None, False)
        data_dir = self.data_dir
        target = os.path.join(os.path.abspath(self.mktemp()) + ".sqlite3")

        def script(opener):
            stop = threading.Event()
            acked = {}
            lock = threading.Lock()
            errors = []

            def sender(n):
                try:
                    with opener() as ws:
                        send(ws, type="register", device_id=f"leeloo_{n:012x}", crew_code=f"LEELOO-LD{n}",
                             device_name=f"Load {n}")
                        recv(ws)
                        i = 0
                        while not stop.is_set():
                            for _ in range(20):
                                i += 1
                                send(ws, type="message", payload={"text": "x" * 200}, client_msg_id=f"{n}-{i}")
                            for frame in until(ws, lambda f: f.get("client_msg_id") == f"{n}-{i}"):
                                if frame.get("type") == "sent":
                                    with lock:
                                        acked[frame["client_msg_id"]] = frame["seq"]
                except Exception as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=sender, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            try:
                while True:
                    with lock:
                        if len(acked) >= 300 or errors:
                            before = dict(acked)
                            break
                    stop.wait(0.01)
                result = admin(data_dir, "backup", target)
                with lock:
                    during = len(acked) - len(before)
            finally:
                stop.set()
                for t in threads:
                    t.join(TIMEOUT)
            if errors:
                raise errors[0]
            return before, during, result

        before, during, (status, out, err) = yield ws_session(port, script)
        self.assertEqual(status, 0, err)
        self.assertIn(f"to {target}", out)
        # The load went on while the backup ran.
        self.assertGreater(during, 0)
        db = sqlite3.connect(target)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        stored = dict(db.execute("SELECT client_msg_id, seq FROM messages"))
        self.assertEqual({k: stored.get(k) for k in before}, before)
        self.assertEqual(os.stat(target).st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_backup_to_existing_file(self):
        """
        A backup never overwrites a file.
        """
        relay, _ = yield self.start(None, False)
        target = os.path.abspath(self.mktemp())
        with open(target, "w") as f:
            f.write("keep me")
        status, _, err = yield self.admin("backup", target)
        self.assertEqual(status, 1)
        self.assertIn("exists", err)
        with open(target) as f:
            self.assertEqual(f.read(), "keep me")


class ChangingTests(CLITestCase):
    @defer.inlineCallbacks
    def test_remove_and_rename(self):
        """
        remove takes a member's connection out of the crew; rename-crew
        moves the crew and its members online, and a deployed member that
        still has the old code is taken to it and told the new one.
        """
        relay, (port, _) = yield self.start()
        data_dir = self.data_dir

        def first(opener):
            with opener() as a, opener() as b:
                send(a, type="create_crew", crew_code="LEELOO-ALFA", device_id="leeloo_aaaaaaaaaaaa",
                     display_name="Ann")
                recv(a)
                send(b, type="join_crew", crew_code="LEELOO-ALFA", device_id="leeloo_bbbbbbbbbbbb",
                     display_name="Bob")
                recv(b)
                until(a, of_type("member_joined"))
                removed = admin(data_dir, "remove", "leeloo_bbbbbbbbbbbb", "leeloo-alfa")
                left = recv(b)
                offline = until(a, of_type("member_offline"))[-1]
                send(b, type="message", payload={"text": "still here?"})
                refused = recv(b)
                again = admin(data_dir, "remove", "leeloo_bbbbbbbbbbbb", "LEELOO-ALFA")
                renamed = admin(data_dir, "rename-crew", "LEELOO-ALFA", "LEELOO-BRVO")
                told = recv(a)
                return removed, left, offline, refused, again, renamed, told

        removed, left, offline, refused, again, renamed, told = yield ws_session(port, first)
        self.assertEqual(removed, (0, "removed leeloo_bbbbbbbbbbbb from crew LEELOO-ALFA; it was online, and its "
                                      "connection left the crew\n", ""))
        self.assertEqual(left, {"type": "crew_left", "crew_code": "LEELOO-ALFA"})
        self.assertEqual(offline["device_id"], "leeloo_bbbbbbbbbbbb")
        self.assertEqual(refused["error"], "not_in_crew")
        self.assertEqual(again[0], 1)
        self.assertEqual(again[2], "leeloo-admin: the relay refused: leeloo_bbbbbbbbbbbb is not a member of crew "
                                   "LEELOO-ALFA\n")
        self.assertEqual(renamed[0], 0, renamed[2])
        self.assertTrue(renamed[1].startswith("renamed crew LEELOO-ALFA to LEELOO-BRVO (1 members online told)"))
        self.assertEqual(told, {"type": "crew_renamed", "crew_code": "LEELOO-BRVO", "old_crew_code": "LEELOO-ALFA"})
        status, out, _ = yield self.admin("crews")
        line = out.splitlines()[0]
        self.assertTrue(line.startswith("LEELOO-BRVO  1 members, ") and line.endswith(" 0 messages: Ann"), line)

        # Ann (a deployed device, a member) comes back with her saved code.
        ann = DeviceProcess(self, port, "leeloo_aaaaaaaaaaaa", "LEELOO-ALFA", "Ann")
        joined = yield deferToThread(ann.recv)
        self.assertEqual((joined["type"], joined["crew_code"]), ("crew_joined", "LEELOO-BRVO"))
        # Bob, removed, is no member: the old code finds nothing for him.
        bob = DeviceProcess(self, port, "leeloo_bbbbbbbbbbbb", "LEELOO-ALFA", "Bob")
        answer = yield deferToThread(bob.recv)
        self.assertEqual(answer["error"], "invalid_crew_code")

    @defer.inlineCallbacks
    def test_delete_crew_and_reset_key(self):
        """
        delete-crew tells a deployed member online and closes it with 4004
        (it makes the crew again, empty); reset-key closes the device with
        4004 and lets the next key it presents bind.  Bad input exits 2, a
        refusal 1.
        """
        relay, (port, _) = yield self.start()
        data_dir = self.data_dir
        bob = DeviceProcess(self, port, "leeloo_bbbbbbbbbbbb", "LEELOO-ALFA", "Bob")
        yield deferToThread(bob.until, of_type("crew_created"))

        def script(opener):
            with opener() as a:
                send(a, type="join_crew", crew_code="LEELOO-ALFA", device_id="leeloo_aaaaaaaaaaaa",
                     display_name="Ann", device_key="first-key-0123456789")
                recv(a)
                send(a, type="message", payload={"text": "gone soon"}, client_msg_id="c1")
                until(a, of_type("sent"))
                deleted = admin(data_dir, "delete-crew", "LEELOO-ALFA")
                told = until(a, of_type("crew_deleted"))[-1]
                try:
                    while True:
                        recv(a)
                except Exception:
                    closed = a.close_code
            with opener() as a:
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", device_key="first-key-0123456789")
                recv(a)
                reset = admin(data_dir, "reset-key", "leeloo_aaaaaaaaaaaa")
                try:
                    while True:
                        recv(a)
                except Exception:
                    reset_close = a.close_code
            with opener() as a:
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", device_key="second-key-0123456789")
                rebound = recv(a)
            return deleted, told, closed, reset, reset_close, rebound

        deleted, told, closed, reset, reset_close, rebound = yield ws_session(port, script)
        self.assertEqual(deleted[0], 0, deleted[2])
        self.assertEqual(deleted[1], "deleted crew LEELOO-ALFA with its members, bot users and log "
                                     "(2 members online told, 2 connections closed)\n")
        self.assertEqual((told, closed), ({"type": "crew_deleted", "crew_code": "LEELOO-ALFA"}, 4004))
        frames = yield deferToThread(bob.until, of_type("_closed"))
        self.assertEqual([f["type"] for f in frames][-2:], ["crew_deleted", "_closed"])
        self.assertEqual(frames[-1]["code"], 4004)
        self.assertEqual(reset[0], 0, reset[2])
        self.assertEqual(reset_close, 4004)
        self.assertEqual(rebound["type"], "registered")
        # The deployed device comes back on its own schedule: it finds no
        # crew under its code and makes it again, empty.
        bob = DeviceProcess(self, port, "leeloo_bbbbbbbbbbbb", "LEELOO-ALFA", "Bob")
        frames = yield deferToThread(bob.until, of_type("crew_created"))
        self.assertEqual(frames[0]["error"], "invalid_crew_code")
        status, out, _ = yield self.admin("crew", "LEELOO-ALFA")
        self.assertIn("0 in its log", out)

        for args, expected in ((("rename-crew", "LEELOO-ALFA", " "), 2), (("delete-crew", "LEELOO-NONE"), 1),
                               (("reset-key", "leeloo_nobody"), 1), (("remove", "", "LEELOO-ALFA"), 2),
                               (("rename-crew", "LEELOO-ALFA", "leeloo-alfa"), 2), (("frobnicate",), 2)):
            status, out, err = yield self.admin(*args)
            self.assertEqual((status, out, len(err.splitlines())), (expected, "", 1), (args, err))

    @defer.inlineCallbacks
    def test_relay_without_admin_api(self):
        """
        A changing command against a relay without --admin-listen is
        refused, saying how to give it one.
        """
        relay, _ = yield self.start(None, False)
        status, _, err = yield self.admin("delete-crew", "LEELOO-ALFA")
        self.assertEqual(status, 1)
        self.assertIn("--admin-listen", err)


class TokenTests(CLITestCase):
    @defer.inlineCallbacks
    def test_refused_without_the_token(self):
        """
        The running relay's admin API answers 401 to a missing or wrong
        token, and serves /health and /metrics there as before.
        """
        relay, (_, admin_port) = yield self.start()
        url = f"http://127.0.0.1:{admin_port}"
        with open(os.path.join(self.data_dir, "admin.token")) as f:
            token = f.read().strip()
        self.assertEqual(os.stat(os.path.join(self.data_dir, "admin.token")).st_mode & 0o777, 0o600)

        def status(path, headers, data=b'{"crew_code": "LEELOO-NONE"}'):
            request = urllib.request.Request(url + path, data=data, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        def script():
            return (status("/admin/delete-crew", {}), status("/admin/delete-crew", {"Authorization": "Bearer nope"}),
                    status("/admin/delete-crew", {"Authorization": token}),
                    status("/admin/delete-crew", {"Authorization": f"Bearer {token}"}),
                    status("/health", {}, None), status("/metrics", {}, None))

        answers = yield deferToThread(script)
        # With the token, the call reaches the core (no such crew: 409).
        self.assertEqual(answers, (401, 401, 401, 409, 200, 200))
        # The CLI with a token that is not this relay's is refused.
        with open(os.path.join(self.data_dir, "admin.token"), "w") as f:
            f.write("w" * 43 + "\n")
        status, out, err = yield self.admin("delete-crew", "LEELOO-NONE")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("does not take the token", err)
        yield relay.stop()
        self.assertNotIn(token, relay.proto.output.decode())


class ExportImportTests(CLITestCase):
    @defer.inlineCallbacks
    def test_export_into_an_empty_relay(self):
        """
        An export imported into an empty relay gives the same crews,
        members, bot users, aliases, device keys and logs: its export is
        the same, and a device's key works there.
        """
        relay, (port, _) = yield self.start()
        data_dir = self.data_dir

        def bot(path, body):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/telegram/{path}", data=json.dumps(body).encode(),
                headers={"X-Api-Secret": SECRET, "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return json.load(response)

        def script(opener):
            with opener() as a, opener() as b:
                send(a, type="create_crew", crew_code="LEELOO-ALFA", device_id="leeloo_aaaaaaaaaaaa",
                     display_name="Ann", device_key="ann-key-0123456789")
                recv(a)
                send(b, type="create_crew", crew_code="LEELOO-BRVO", device_id="leeloo_bbbbbbbbbbbb",
                     display_name="Bob")
                recv(b)
                bot("crew/join", {"telegram_user_id": 7, "crew_code": "LEELOO-ALFA", "display_name": "Tina"})
                # Bob is in two crews: a multi-crew device.
                send(b, type="crew_add", crew_code="LEELOO-ALFA")
                until(b, of_type("crew_joined"))
                for i in range(5):
                    send(a, type="message", payload={"text": f"m{i}"}, client_msg_id=f"a{i}")
                    send(b, type="reaction", reaction_type="fire", client_msg_id=f"b{i}")
                until(a, lambda f: f.get("client_msg_id") == "a4")
                until(b, lambda f: f.get("client_msg_id") == "b4")
            return admin(data_dir, "rename-crew", "LEELOO-BRVO", "LEELOO-CHLI")

        renamed = yield ws_session(port, script)
        self.assertEqual(renamed[0], 0, renamed[2])
        status, exported, _ = yield self.admin("export")
        self.assertEqual(status, 0)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(exported)

        other_dir = os.path.abspath(self.mktemp())
        other, (other_port, _) = yield self.start(other_dir)
        status, out, err = yield self.admin("import", path, data_dir=other_dir)
        self.assertEqual(status, 0, err)
        self.assertIn("imported 2 crews, 3 members, 1 bot users, 2 devices, 0 pending tokens and 10 messages", out)
        status, again, _ = yield self.admin("export", data_dir=other_dir)

        def comparable(text):
            document = json.loads(text)
            del document["exported_at"]
            for crew in document["crews"]:
                for member in crew["members"]:
                    del member["online"]
            return document

        self.assertEqual(comparable(again), comparable(exported))
        self.assertEqual([c["aliases"] for c in comparable(again)["crews"]], [[], ["LEELOO-BRVO"]])
        # The rename took Bob's crews along.
        self.assertEqual(comparable(again)["multi_crew"], [
            {"device_id": "leeloo_bbbbbbbbbbbb", "crews": ["LEELOO-CHLI", "LEELOO-ALFA"], "primary": "LEELOO-CHLI"}])
        # Importing twice is refused: the relay is no longer empty.
        status, _, err = yield self.admin("import", path, data_dir=other_dir)
        self.assertEqual((status, "not empty" in err), (1, True))

        def device(opener):
            with opener() as a:
                send(a, type="join_crew", crew_code="LEELOO-ALFA", device_id="leeloo_aaaaaaaaaaaa",
                     display_name="Ann", device_key="wrong-key-0123456789")
                wrong = recv(a)
            with opener() as a:
                send(a, type="join_crew", crew_code="LEELOO-ALFA", device_id="leeloo_aaaaaaaaaaaa",
                     display_name="Ann", device_key="ann-key-0123456789")
                right = recv(a)
                send(a, type="message", payload={"text": "next"}, client_msg_id="a5")
                sent = until(a, of_type("sent"))[-1]
            return wrong, right, sent

        wrong, right, sent = yield ws_session(other_port, device)
        self.assertEqual((wrong["error"], right["type"], sent["seq"]), ("device_auth_failed", "crew_joined", 6))

    @defer.inlineCallbacks
    def test_bad_file(self):
        """
        A file that is not an export exits 2 before the relay is asked.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('{"format": "something else"}')
        os.makedirs(self.data_dir)
        status, out, err = yield self.admin("import", path)
        self.assertEqual((status, out, len(err.splitlines())), (2, "", 1))
        self.assertIn("not a leeloo-admin export", err)
