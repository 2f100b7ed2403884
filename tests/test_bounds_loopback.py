"""
Bounded under attack, for real: the relay on loopback (in this process, or
``twistd leeloo`` as a child whose memory is read from /proc and whose data
directory is measured), flooded and abused by raw sockets and real clients.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import urllib.error
import urllib.request

from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from leeloo.store import StoreError

from .support import TIMEOUT, RelayProcess, recv, ws_session
from .test_limits_loopback import RelayOnLoopback, raw_websocket, read_frame

SECRET = "test-secret"
KiB = 1024
MiB = 1024 * KiB


def frame(payload: bytes) -> bytes:
    """
    A client text frame with a zero mask (legal, and free to apply).
    """
    length = len(payload)
    if length < 126:
        head = bytes([0x81, 0x80 | length])
    elif length < 65536:
        head = bytes([0x81, 0x80 | 126]) + struct.pack("!H", length)
    else:
        head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", length)
    return head + b"\0\0\0\0" + payload


def send(sock: socket.socket, **fields) -> None:
    sock.sendall(frame(json.dumps(fields).encode()))


def receive(sock: socket.socket) -> dict:
    return json.loads(read_frame(sock))


def memory(pid: int) -> dict[str, int]:
    """
    The process's VmRSS and VmHWM (its peak), in bytes.
    """
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(value.split()[0]) * KiB
    return values


def disk(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))


def http_json(port: int, path: str, body: dict | None = None) -> tuple[int, dict]:
    headers = {"X-Api-Secret": SECRET, "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def in_parallel(*calls) -> list:
    """
    Run each callable in a thread of its own; return their results, or
    raise the first failure.
    """
    results: list = [None] * len(calls)
    errors: list = []

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as e:  # reported below
            errors.append(e)

    workers = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return results


class ChildRelay(TestCase):
    """
    ``twistd leeloo`` on a data directory of its own, with C{args}.
    """

    timeout = 120
    args: tuple[str, ...] = ()

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.patch(os, "environ", {**os.environ, "TELEGRAM_API_SECRET": SECRET})

    @defer.inlineCallbacks
    def start(self, *args):
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.data_dir,
                             *self.args, *args)
        port = yield relay.proto.port
        return relay, port


def flood_crew(port: int, device_id: str, crew_code: str, count: int, body: str) -> int:
    """
    Register C{device_id} in C{crew_code}, send C{count} messages of
    C{body} as fast as the relay reads them, then wait until every one is
    answered C{sent}; return how many were.
    """
    sock = raw_websocket(port)
    try:
        send(sock, type="register", device_id=device_id, crew_code=crew_code)
        assert receive(sock)["type"] == "registered"
        for n in range(count):
            send(sock, type="message", payload={"text": body}, client_msg_id=f"c{n}")
        sent = 0
        while sent < count:
            reply = receive(sock)
            assert reply["type"] == "sent", reply
            sent += 1
        return sent
    finally:
        sock.close()


class FloodTests(ChildRelay):
    args = ("--messages-per-second", "100000", "--message-burst", "100000", "--join-attempts", "1000",
            "--connect-rate", "100000")

    @defer.inlineCallbacks
    def test_memory_bounded_under_flood(self):
        """
        Twenty connections sending 60 KiB messages as fast as they can (about
        120 MiB) grow the relay by far less than they send, because it stops
        reading from them while the store is behind (the default
        --store-queue-bytes); once the flood is answered, its memory is back
        near where it started.
        """
        relay, port = yield self.start()
        body = "x" * (60 * KiB)
        yield threads.deferToThread(flood_crew, port, "leeloo_0000000000ff", "WARMUP", 20, body)
        before = memory(relay.transport.pid)
        senders = [(lambda i=i: flood_crew(port, f"leeloo_{i:012x}", f"FLOOD{i}", 100, body)) for i in range(20)]
        answered = yield threads.deferToThread(in_parallel, *senders)
        after = memory(relay.transport.pid)
        self.assertEqual(answered, [100] * 20)
        grown, peak = after["VmRSS"] - before["VmRSS"], after["VmHWM"] - before["VmRSS"]
        self.assertLess(peak, 56 * MiB, (before, after))
        self.assertLess(grown, 20 * MiB, (before, after))

    @defer.inlineCallbacks
    def test_disk_bounded_under_flood(self):
        """
        A crew flooded with 24 MiB of messages keeps at most --crew-log-bytes
        of them, and the data directory (database and WAL) stays near that
        size; the WAL is given back once the flood is over.
        """
        relay, port = yield self.start("--crew-log-bytes", str(2 * MiB), "--replay-limit", "5")
        body = "x" * (60 * KiB)
        yield threads.deferToThread(flood_crew, port, "leeloo_000000000001", "DISKFLOOD", 400, body)
        wal = os.path.join(self.data_dir, "leeloo.sqlite3-wal")
        # The relay truncates the WAL within two checkpoint intervals (a
        # second each) of going idle: look for that on the reactor, for
        # at most five seconds.
        for _ in range(50):
            if not os.path.getsize(wal):
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(os.path.getsize(wal), 0)
        self.assertLess(disk(self.data_dir), 8 * MiB)
        yield relay.stop("TERM")


class DurableCrewTests(ChildRelay):
    # The check after the restart opens a connection per crew it looks up.
    args = ("--join-attempts", "100000", "--messages-per-second", "100000", "--message-burst", "100000",
            "--connect-rate", "100000")

    @defer.inlineCallbacks
    def test_answered_crews_survive_kill(self):
        """
        Every crew answered crew_created is there after a kill -9 right
        after the answers of a burst of creations.
        """
        relay, port = yield self.start()

        def burst(count: int) -> list[str]:
            sock = raw_websocket(port)
            try:
                for _ in range(count):
                    send(sock, type="create_crew")
                codes = []
                while len(codes) < count:
                    reply = receive(sock)
                    assert reply["type"] == "crew_created", reply
                    codes.append(reply["crew_code"])
                return codes
            finally:
                sock.close()

        batches = yield threads.deferToThread(in_parallel, *[(lambda: burst(400))] * 5)
        yield relay.stop("KILL")
        codes = {code for batch in batches for code in batch}
        relay, port = yield self.start()
        status, health = yield threads.deferToThread(http_json, port, "/health")
        self.assertEqual(len(codes), 2000)
        self.assertEqual(health["crews"], len(codes))
        for code in sorted(codes)[:: 100]:
            status, crew = yield threads.deferToThread(http_json, port, f"/api/telegram/crew/status?crew_code={code}")
            self.assertTrue(crew["exists"], code)


class LoopbackTestCase(RelayOnLoopback):
    environ = {"TELEGRAM_API_SECRET": SECRET}

    def relay(self):
        return self.service.relay


class CrewCodeLoopbackTests(LoopbackTestCase):
    @defer.inlineCallbacks
    def test_codes_run_out(self):
        """
        When every code is taken (here: a relay whose random codes are all
        one), create_crew is answered crew_limit, the bot API's creation
        503 crew_limit, and /health still answers.
        """
        self.relay().crews_part._new_crew_code = lambda length: "LEELOO-FULL"

        def script(opener):
            with opener() as a:
                a.send(json.dumps({"type": "create_crew"}))
                first = recv(a)
                a.send(json.dumps({"type": "create_crew"}))
                second = recv(a)
            return first, second, http_json(self.port, "/api/telegram/crew/create",
                                            {"telegram_user_id": 7, "display_name": "Tina"}), \
                http_json(self.port, "/health")

        first, second, (bot_status, bot), (health_status, health) = yield ws_session(self.port, script)
        self.assertEqual(first["crew_code"], "LEELOO-FULL")
        self.assertEqual(second["error"], "crew_limit")
        self.assertEqual((bot_status, bot["error"]), (503, "crew_limit"))
        self.assertEqual((health_status, health["crews"]), (200, 1))


class EntryLoopbackTests(LoopbackTestCase):
    args = ("--join-attempts", "5")

    @defer.inlineCallbacks
    def test_creates_limited(self):
        """
        One address creating crews without codes is refused rate_limited
        past --join-attempts, however many connections it uses.
        """

        def script(opener):
            answers = []
            for _ in range(7):
                with opener() as ws:
                    ws.send(json.dumps({"type": "create_crew"}))
                    answers.append(recv(ws))
            return answers

        answers = yield ws_session(self.port, script)
        self.assertEqual([a["type"] for a in answers[:5]], ["crew_created"] * 5)
        self.assertEqual([a["error"] for a in answers[5:]], ["rate_limited"] * 2)
        self.assertEqual(self.relay().stats().crews, 5)

    @defer.inlineCallbacks
    def test_new_device_ids_limited(self):
        """
        One address registering device ids the relay has never seen is
        refused past --join-attempts; a known id still registers.
        """

        def script(opener):
            with opener() as ws:
                answers = []
                for i in range(7):
                    ws.send(json.dumps({"type": "register", "device_id": f"leeloo_{i:012x}"}))
                    answers.append(recv(ws))
                ws.send(json.dumps({"type": "register", "device_id": "leeloo_000000000000"}))
                answers.append(recv(ws))
                return answers

        answers = yield ws_session(self.port, script)
        self.assertEqual([a.get("error", a["type"]) for a in answers],
                         ["registered"] * 5 + ["rate_limited"] * 2 + ["registered"])
        self.assertEqual(len(self.relay().device_keys), 5)


class PresenceLoopbackTests(LoopbackTestCase):
    args = ("--messages-per-second", "1000", "--message-burst", "1000", "--join-attempts", "100")

    @defer.inlineCallbacks
    def test_crew_hopping_quiet(self):
        """
        Five devices hopping between two crews twenty times, and one
        reconnecting, send a member of the first crew no presence frames.
        """

        def script(opener):
            with contextlib.ExitStack() as stack, opener() as victim, opener() as elsewhere:
                victim.send(json.dumps({"type": "register", "device_id": "leeloo_71c71c71c71c", "crew_code": "HOME"}))
                elsewhere.send(json.dumps({"type": "register", "device_id": "leeloo_e15e15e15e15",
                                           "crew_code": "AWAY"}))
                recv(victim), recv(elsewhere)
                hoppers = []
                for i in range(5):
                    h = stack.enter_context(opener())
                    hoppers.append(h)
                    h.send(json.dumps({"type": "register", "device_id": f"leeloo_{i:012x}", "crew_code": "HOME"}))
                    recv(h)
                for _ in range(20):
                    for code in ("AWAY", "HOME"):
                        for h in hoppers:
                            h.send(json.dumps({"type": "join_crew", "crew_code": code}))
                            # (hoppers hear each other arrive)
                            while recv(h)["type"] != "crew_joined":
                                pass
                hoppers[0].close()
                with opener() as back:
                    back.send(json.dumps({"type": "register", "device_id": f"leeloo_{0:012x}", "crew_code": "HOME"}))
                    recv(back)
                    victim.send(json.dumps({"type": "ping"}))
                    heard = []
                    while not heard or heard[-1]["type"] != "pong":
                        heard.append(recv(victim))
                return heard

        heard = yield ws_session(self.port, script)
        self.assertEqual(heard, [{"type": "pong"}])


class ResendLoopbackTests(LoopbackTestCase):
    @defer.inlineCallbacks
    def test_resend_under_another_name(self):
        """
        A message resent with its client_msg_id after reconnecting under
        another display name is answered with its first "sent", and the crew
        gets it once.
        """

        def script(opener):
            with opener() as reader:
                reader.send(json.dumps({"type": "register", "device_id": "leeloo_4ead4ead4ead", "crew_code": "DUO"}))
                recv(reader)
                with opener() as a:
                    a.send(json.dumps({"type": "join_crew", "crew_code": "DUO", "device_id": "leeloo_a00000000000",
                                       "display_name": "Ann"}))
                    recv(a)
                    a.send(json.dumps({"type": "message", "payload": {"text": "hi"}, "client_msg_id": "c1"}))
                    first = recv(a)
                with opener() as a:
                    a.send(json.dumps({"type": "join_crew", "crew_code": "DUO", "device_id": "leeloo_a00000000000",
                                       "display_name": "Annie"}))
                    recv(a)
                    a.send(json.dumps({"type": "message", "payload": {"text": "hi"}, "client_msg_id": "c1"}))
                    again = recv(a)
                    a.send(json.dumps({"type": "message", "payload": {"text": "next"}, "client_msg_id": "c2"}))
                    recv(a)
                texts = []
                while not texts or texts[-1] != "next":
                    m = recv(reader)
                    if m["type"] == "message":
                        texts.append(m["payload"]["text"])
                return first, again, texts

        first, again, texts = yield ws_session(self.port, script)
        self.assertEqual(first["type"], "sent")
        self.assertEqual(again, first)
        self.assertEqual(texts, ["hi", "next"])


class StoreRefusalLoopbackTests(LoopbackTestCase):
    @defer.inlineCallbacks
    def test_refused_write(self):
        """
        A message the store refuses is answered store_unavailable with its
        client_msg_id, and the next stored message takes the sequence it
        would have had.
        """
        store = self.relay().store

        def script(opener):
            with opener() as a, opener() as b:
                a.send(json.dumps({"type": "register", "device_id": "leeloo_a00000000000", "crew_code": "DUO"}))
                b.send(json.dumps({"type": "register", "device_id": "leeloo_b00000000000", "crew_code": "DUO",
                                   "last_seq": 0}))
                recv(a), recv(b)
                # The store refuses writes (as a full disk makes it).
                store.write = lambda ops: defer.fail(StoreError("disk full"))
                a.send(json.dumps({"type": "message", "payload": {"text": "lost"}, "client_msg_id": "c1"}))
                refused = recv(a)
                del store.write
                a.send(json.dumps({"type": "message", "payload": {"text": "kept"}, "client_msg_id": "c2"}))
                return refused, recv(a), recv(b)

        refused, sent, delivered = yield ws_session(self.port, script)
        self.assertEqual((refused["error"], refused["client_msg_id"]), ("store_unavailable", "c1"))
        self.assertEqual((sent["client_msg_id"], sent["seq"]), ("c2", 1))
        self.assertEqual((delivered["payload"]["text"], delivered["seq"]), ("kept", 1))


class BackPressureLoopbackTests(LoopbackTestCase):
    args = ("--messages-per-second", "100000", "--message-burst", "100000",
            "--store-queue-bytes", str(1 * MiB))

    def stall_store(self):
        """
        Hold every store write until L{release} (a disk gone slow).
        """
        store = self.relay().store
        self.held = []
        real = store.write

        def held(ops):
            d = defer.Deferred()
            self.held.append((d, ops))
            return d

        def release():
            store.write = real
            while self.held:
                d, ops = self.held.pop(0)
                real(ops).chainDeferred(d)

        store.write = held
        self.release = release

    @defer.inlineCallbacks
    def test_sender_paused_while_store_behind(self):
        """
        While the store is stalled, a sender of 60 KiB messages is read
        only until about --store-queue-bytes wait for the store: then the
        relay stops reading from it (its sends block) instead of holding
        what it sends.  Once the store catches up every message is stored
        and answered.
        """
        body = "x" * (60 * KiB)
        sock = yield threads.deferToThread(raw_websocket, self.port)
        self.addCleanup(sock.close)
        yield threads.deferToThread(send, sock, type="register", device_id="leeloo_f100df100df1",
                                    crew_code="FLOOD")
        yield threads.deferToThread(receive, sock)
        self.stall_store()
        frames = [frame(json.dumps({"type": "message", "payload": {"text": body},
                                    "client_msg_id": f"c{n}"}).encode()) for n in range(600)]

        def push(start: int, offset: int) -> tuple[int, int]:
            """
            Send frames from C{frames[start][offset:]} on; return where the
            sending blocked for a second (or the end).
            """
            sock.settimeout(1)
            try:
                for n in range(start, len(frames)):
                    data = frames[n]
                    while offset < len(data):
                        offset += sock.send(data[offset:])
                    offset = 0
                return len(frames), 0
            except TimeoutError:
                return n, offset
            finally:
                sock.settimeout(TIMEOUT)

        stopped_at, offset = yield threads.deferToThread(push, 0, 0)
        relay = self.relay()
        self.assertLess(stopped_at, len(frames), "the relay read everything the sender sent")
        self.assertEqual(len(relay.paused), 1)
        self.assertLess(relay.journal.backlog, 1 * MiB + 2 * 64 * KiB)
        self.release()
        rest = yield threads.deferToThread(push, stopped_at, offset)
        self.assertEqual(rest, (len(frames), 0))

        def answers() -> int:
            count = 0
            while count < len(frames):
                reply = receive(sock)
                assert reply["type"] == "sent", reply
                count += 1
            # A close handshake, so the relay is done with the connection.
            sock.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + struct.pack("!H", 1000))
            while sock.recv(4096):
                pass
            return count

        answered = yield threads.deferToThread(answers)
        self.assertEqual(answered, len(frames))
        self.assertEqual(relay.paused, set())
        self.assertEqual(relay.crews["FLOOD"].fanned_seq, len(frames))
