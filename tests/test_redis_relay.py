"""
The relay on the Redis store, for real: a C{redis-server} with AOF on, the
relay's service tree in this process or as C{twistd leeloo} processes, and
devices speaking through the C{websockets} package.  Nothing answered
C{sent} is lost across a relay C{kill -9} (and a restart with a new data
directory), nor across a Redis restart under traffic, during which the
relay answers C{store_unavailable} and keeps its connections.
"""

import json
import os
import signal

import txaio
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from leeloo.tap import Options, build_service

from .redis_support import SKIP, RedisServer
from .support import RelayProcess, listening_port, recv, ws_session
from .test_redisstore import next_event

PASSWORD = "redis-test-password"


def send(ws, **fields):
    ws.send(json.dumps(fields))


def until(ws, kind):
    """
    Receive until a message of type C{kind}; return everything received.
    """
    received = []
    while True:
        message = recv(ws)
        received.append(message)
        if message["type"] == kind:
            return received


class RedisRestartTests(TestCase):
    """
    The whole service tree on the real reactor, on a Redis that is stopped
    and started again under traffic.
    """

    skip = SKIP
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.redis = RedisServer(self, appendfsync="everysec")
        yield self.redis.start()
        options = Options(environ={})
        options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", self.mktemp(),
                              "--redis", self.redis.url, "--redis-max-retry-delay", "0.2",
                              "--presence-grace", "0"])
        self.service = build_service(options.config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        port = yield listening_port(self.service)
        self.port = port.getHost().port

    @defer.inlineCallbacks
    def test_redis_restart_under_traffic(self):
        """
        While Redis is down a crew message is answered store_unavailable and
        not delivered, the connections stay open (ping is answered); once
        Redis is back the relay resumes by itself: the resend is stored and
        delivered, and a device joining later is replayed everything that
        was answered sent, once, in order.
        """
        devices = {}

        def before(opener):
            a, b = devices["a"], devices["b"] = opener(), opener()  # closed in after()
            send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="band", device_name="Ann")
            send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="band", device_name="Bob")
            recv(a), recv(b)
            sent = []
            for i in range(5):
                send(a, type="message", payload={"text": f"before {i}"}, client_msg_id=f"b{i}")
                sent.append(until(a, "sent")[-1])
            got = [recv(b) for _ in range(5)]
            return sent, got

        sent_before, got_before = yield ws_session(self.port, before)
        lost = next_event("lost the connection to Redis")
        yield self.redis.stop()
        yield lost

        def during(opener):
            a = devices["a"]
            send(a, type="message", payload={"text": "during"}, client_msg_id="d0")
            refused = until(a, "error")[-1]
            send(a, type="ping")
            return refused, recv(a)

        refused, pong = yield ws_session(self.port, during)
        back = next_event("connected to Redis at {where} again")
        yield self.redis.start()
        yield back

        def after(opener):
            a, b = devices["a"], devices["b"]
            send(a, type="message", payload={"text": "during"}, client_msg_id="d0")
            sent = [until(a, "sent")[-1]]
            for i in range(3):
                send(a, type="message", payload={"text": f"after {i}"}, client_msg_id=f"a{i}")
                sent.append(until(a, "sent")[-1])
            got = [recv(b) for _ in range(4)]
            with opener() as c:
                send(c, type="register", device_id="leeloo_cccccccccccc", crew_code="band", last_seq=0)
                replayed = [recv(c) for _ in range(10)]
            a.close()
            b.close()
            return sent, got, replayed

        sent_after, got_after, replayed = yield ws_session(self.port, after)
        self.assertEqual((refused["error"], refused.get("client_msg_id")), ("store_unavailable", "d0"))
        self.assertEqual(pong, {"type": "pong"})
        texts = [f"before {i}" for i in range(5)] + ["during"] + [f"after {i}" for i in range(3)]
        seqs = [s["seq"] for s in sent_before + sent_after]
        self.assertEqual(seqs, list(range(1, 10)))
        self.assertEqual([m["payload"]["text"] for m in got_before + got_after], texts)
        self.assertEqual(replayed[0]["type"], "registered")
        self.assertEqual([(m["seq"], m["payload"]["text"]) for m in replayed[1:]], list(zip(range(1, 10), texts)))


class RelayKillTests(TestCase):
    """
    C{twistd leeloo --redis} processes sharing one Redis (with a password),
    the first killed with SIGKILL.
    """

    skip = SKIP
    timeout = 90

    @defer.inlineCallbacks
    def start(self, data_dir):
        # The secrets key outside the data directories, shared by both relays
        # (README.rst, "The Redis store").
        relay = RelayProcess(self, "--listen", "tcp:0:interface=127.0.0.1", "--data-dir", data_dir,
                             "--redis", self.redis.url, "--secrets-key-file", self.key_file,
                             environ={"LEELOO_REDIS_PASSWORD": PASSWORD})
        port = yield relay.proto.port
        return relay, port

    @defer.inlineCallbacks
    def test_kill_and_new_data_dir(self):
        """
        Everything answered sent before a relay's kill -9 is replayed by a
        relay started with a new, empty data directory on the same Redis;
        a device's key still binds its id there, a resend of a
        client_msg_id is answered with its first sequence and not delivered
        again, and numbering goes on after the last.  The password never
        shows in config.json or the relay's output.
        """
        self.redis = RedisServer(self, password=PASSWORD)
        yield self.redis.start()
        self.key_file = os.path.join(os.path.abspath(self.mktemp()) + "-secrets.key")
        first_dir = os.path.abspath(self.mktemp())
        relay, port = yield self.start(first_dir)

        def before(opener):
            with opener() as a, opener() as b:
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="duo", device_name="Ann")
                send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="duo", device_name="Bob")
                key_a, key_b = recv(a)["device_key"], recv(b)["device_key"]
                b.close()
                sent = []
                for i in range(20):
                    send(a, type="message", payload={"text": f"m{i}"}, client_msg_id=f"c{i}")
                    sent.append(until(a, "sent")[-1])
                return key_a, key_b, sent

        key_a, key_b, sent = yield ws_session(port, before)
        config = open(os.path.join(first_dir, "config.json")).read()
        yield relay.stop("KILL")
        second_dir = os.path.abspath(self.mktemp())
        relay, port = yield self.start(second_dir)

        def after(opener):
            with opener() as a, opener() as b:
                send(b, type="register", device_id="leeloo_bbbbbbbbbbbb", crew_code="duo", device_key=key_b,
                     last_seq=0)
                registered = recv(b)
                replayed = [recv(b) for _ in range(20)]
                send(a, type="register", device_id="leeloo_aaaaaaaaaaaa", crew_code="duo", device_key=key_a)
                recv(a)
                send(a, type="message", payload={"text": "m5"}, client_msg_id="c5")
                resent = until(a, "sent")[-1]
                send(a, type="message", payload={"text": "new"}, client_msg_id="c-new")
                new = until(a, "sent")[-1]
                fresh = recv(b)
                send(a, type="register", device_id="leeloo_bbbbbbbbbbbb", device_key="not-the-key")
                refused = recv(a)
                return registered, replayed, resent, new, fresh, refused

        registered, replayed, resent, new, fresh, refused = yield ws_session(port, after)
        ended = yield relay.stop("TERM")
        # twistd exits 0, or with the SIGTERM it got (as test_endtoend allows).
        self.assertIn((ended.exitCode, ended.signal), [(0, None), (None, signal.SIGTERM)])
        self.assertIn(b"Server Shut Down", relay.proto.output)
        self.assertNotIn(b"Traceback", relay.proto.output)
        self.assertEqual(registered["type"], "registered")
        self.assertEqual([(m["seq"], m["id"]) for m in replayed], [(s["seq"], s["id"]) for s in sent])
        self.assertEqual([m["payload"]["text"] for m in replayed], [f"m{i}" for i in range(20)])
        self.assertEqual((resent["seq"], resent["id"]), (sent[5]["seq"], sent[5]["id"]))
        self.assertEqual((new["seq"], fresh["seq"], fresh["payload"]), (21, 21, {"text": "new"}))
        self.assertEqual(refused["error"], "device_auth_failed")
        self.assertIn('"redis"', config)
        self.assertNotIn(PASSWORD, config)
        self.assertNotIn(PASSWORD.encode(), relay.proto.output)
        # One secrets key for both: neither made its own in its data directory.
        self.assertTrue(os.path.exists(self.key_file))
        self.assertEqual([os.path.exists(os.path.join(d, "secrets.key")) for d in (first_dir, second_dir)],
                         [False, False])
