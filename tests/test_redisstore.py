"""
The Redis store against a real C{redis-server} (AOF on, its own process on
a loopback port): the store and pairings contracts SQLite passes, and what
only Redis has (a password, TLS, the connection going and coming back).
"""

import json
import os
from dataclasses import replace

from twisted.internet import defer, reactor
from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from leeloo.redisstore import BlockingRedis, RedisStore, decode_snapshot
from leeloo.redisurl import RedisURLError, parse_redis_url
from leeloo.store import StoreError

from .redis_support import SKIP, RedisServer
from .test_pairing_store import PairingsContract
from .test_store import ALPHA, StoreContract, appends, contract, entry, with_crew


class RedisTestCase(TestCase):
    """
    A test with its own C{redis-server} (C{self.redis}), started before it.
    """

    skip = SKIP
    timeout = 20
    redis_options: dict = {}

    def setUp(self):
        self.redis = RedisServer(self, **self.redis_options)
        return self.redis.start()

    def open(self, **options):
        store = RedisStore(parse_redis_url(self.redis.url, **options), reactor)
        self.addCleanup(store.close)
        return store


class RedisEngine:
    """
    What a store contract asks of its engine, on a L{RedisTestCase}'s
    Redis (first in the bases, before the contract's own).
    """

    def make_store(self):
        return self.open()

    @inlineCallbacks
    def reopen(self, store):
        yield store.close()
        return self.open()

    def finish(self, d):
        return d


class RedisStoreTests(RedisEngine, StoreContract, RedisTestCase):
    """
    The store contract, on L{RedisStore}.
    """

    @inlineCallbacks
    def setUp(self):
        yield RedisTestCase.setUp(self)
        StoreContract.setUp(self)


    @contract
    def test_find_sent_after_restart(self):
        """
        find_sent asks Redis: an id sent before a restart is found after
        it, by whichever relay asks.
        """
        yield self.store.write(with_crew(*appends(entry(1, client_msg_id="c1", digest=b"\x07"))))
        yield self.restart()
        found = yield self.store.find_sent(ALPHA, "leeloo_a", "c1")
        self.assertEqual((found.seq, found.id, found.digest), (1, "m1", b"\x07"))

    @contract
    def test_sequence_taken_refused_and_counted(self):
        """
        An append of a number another writer took fails (nothing of its
        batch applied), and this store's sequences move past what Redis
        holds.
        """
        yield self.store.write(with_crew(*appends(entry(1))))
        yield self.restart()
        other = self.open()
        yield other.write(appends(entry(2), entry(3)))
        self.assertEqual(self.store.sequences.next(ALPHA), 2)
        error = yield self.failure_of(self.store.write(appends(entry(2, payload=b"mine"))), StoreError)
        self.assertIn("already holds sequence 2", str(error))
        self.store.sequences.failed(ALPHA, 2)
        # The counts come back from Redis after the failure.
        yield self.store.connection.call("PING")
        self.assertEqual(self.store.sequences.next(ALPHA), 4)


class RedisPairingsTests(RedisEngine, PairingsContract, RedisTestCase):
    """
    The pairings contract, on L{RedisStore}'s pairings.
    """

    @inlineCallbacks
    def setUp(self):
        yield RedisTestCase.setUp(self)
        PairingsContract.setUp(self)



class URLTests(SynchronousTestCase):
    """
    What C{--redis} takes.
    """

    def test_parts(self):
        """
        Host, port, database, user and TLS come from the URL; the password
        from the argument alone.
        """
        s = parse_redis_url("rediss://relay@redis.example.org:6380/3", password="pw")
        self.assertEqual((s.host, s.port, s.db, s.username, s.tls, s.password),
                         ("redis.example.org", 6380, 3, "relay", True, "pw"))
        s = parse_redis_url("redis://127.0.0.1")
        self.assertEqual((s.port, s.db, s.username, s.tls, s.password), (6379, 0, None, False, None))

    def test_password_in_url_refused(self):
        """
        A password in the URL is refused, naming LEELOO_REDIS_PASSWORD and
        never repeating the password.
        """
        with self.assertRaises(RedisURLError) as e:
            parse_redis_url("redis://user:hunter2@localhost:6379/0")
        self.assertIn("LEELOO_REDIS_PASSWORD", str(e.exception))
        self.assertNotIn("hunter2", str(e.exception))

    def test_bad_urls(self):
        """
        Another scheme, no host, a database that is not a number, or a
        query are refused.
        """
        for url in ["http://localhost:6379", "redis://:6379/0", "redis://localhost:6379/zero",
                    "redis://localhost:6379/0?x=1", "redis://localhost:notaport/0"]:
            self.assertRaises(RedisURLError, parse_redis_url, url)

    def test_password_not_in_repr(self):
        """
        The settings' repr (and so config.json, which masks repr=False
        fields) never shows the password.
        """
        self.assertNotIn("hunter2", repr(parse_redis_url("redis://localhost/0", password="hunter2")))


class BlockingRedisTests(RedisTestCase):
    """
    The synchronous start-up read drives txredisapi's protocol over a
    blocking socket (its C{callLater} run in the loop): this pins that use.
    """

    def test_large_and_binary_replies(self):
        """
        A bulk reply larger than one read, and one with CR LF and NUL
        bytes inside, come back byte for byte.
        """
        r = BlockingRedis(parse_redis_url(self.redis.url))
        self.addCleanup(r.close)
        big = bytes(range(256)) * 4096 + b"\r\n\x00tail"
        r.command("SET", "k", big)
        self.assertEqual(r.command("GET", "k"), big)
        self.assertEqual(r.command("MGET", "k", "missing"), [big, None])

    def test_unreachable(self):
        """
        Nothing listening is a StoreError naming where.
        """
        settings = parse_redis_url("redis://127.0.0.1:1/0")
        with self.assertRaises(StoreError) as e:
            BlockingRedis(settings)
        self.assertIn("127.0.0.1:1", str(e.exception))

    def test_snapshot_of_unknown_crew(self):
        """
        The SNAPSHOT script for a code Redis does not hold is None.
        """
        r = BlockingRedis(parse_redis_url(self.redis.url))
        self.addCleanup(r.close)
        self.assertIsNone(decode_snapshot(r.script("SNAPSHOT", "LEELOO-NONE")))


class PasswordTests(RedisTestCase):
    """
    A Redis with C{requirepass}.
    """

    redis_options = {"password": "s3cret-pw"}

    @inlineCallbacks
    def test_password_used(self):
        """
        With the password the store opens and writes; without it, opening
        fails with a StoreError that does not contain the password.
        """
        store = self.open(password="s3cret-pw")
        yield store.write(with_crew())
        self.assertEqual([c.code for c in (yield store.find_crew(ALPHA)).crews], [ALPHA])
        with self.assertRaises(StoreError) as e:
            self.open(password="wrong")
        self.assertIn("refused", str(e.exception))
        self.assertNotIn("wrong", str(e.exception).replace("WRONGPASS", ""))


class OutageTests(RedisTestCase):
    """
    Redis going away and coming back, under one store.
    """

    @inlineCallbacks
    def test_unavailable_then_back(self):
        """
        While Redis is down a write fails at once with a transient
        StoreError; once it is back on the same port (its AOF read back),
        the store reconnects by itself and what was written before is
        there.
        """
        store = self.open(max_retry_delay=0.2)
        yield store.write(with_crew(*appends(entry(1))))
        lost = next_event("lost the connection to Redis")
        yield self.redis.stop()
        yield lost
        error = yield store.write(appends(entry(2))).addCallbacks(lambda _: None, lambda f: f.value)
        self.assertIsInstance(error, StoreError)
        self.assertTrue(error.transient)
        back = next_event("connected to Redis at")
        yield self.redis.start()
        yield back
        yield store.write(appends(entry(2)))
        replay = yield store.replay(ALPHA, 0, 9, 0.0, "nobody", 9)
        self.assertEqual([seq for seq, _ in replay.entries], [1, 2])


def next_event(text):
    """
    A Deferred firing with the next event logged whose format contains
    C{text}.
    """
    d = defer.Deferred()

    def observe(event):
        if text in (event.get("log_format") or "") and not d.called:
            globalLogPublisher.removeObserver(observe)
            d.callback(event)

    globalLogPublisher.addObserver(observe)
    return d


class TLSTests(TestCase):
    """
    rediss:// against a redis-server serving TLS with a certificate from a
    throwaway CA: the certificate and the host name are verified, on the
    start-up read and on the relay's own connection alike.
    """

    skip = SKIP
    timeout = 20

    def setUp(self):
        from leeloo.testca import ThrowawayCA, key_pem

        self.ca = ThrowawayCA()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)

        def write(name, data):
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            return path

        issued = self.ca.issue(["localhost"])
        other = ThrowawayCA("someone else").root_pem
        self.other_ca = write("other.pem", other)
        # A bundle: the CA that signed comes second.
        self.ca_file = write("ca.pem", other + self.ca.root_pem)
        self.redis = RedisServer(self, tls=(write("cert.pem", issued.fullchain_pem),
                                            write("key.pem", key_pem(issued.key)),
                                            write("root.pem", self.ca.root_pem)))
        return self.redis.start()

    def url(self, host="localhost"):
        return f"rediss://{host}:{self.redis.port}/0"

    @inlineCallbacks
    def test_verified_connection(self):
        """
        With the CA that signed Redis's certificate (the second of a
        bundle), the store opens over TLS and writes and reads through its
        own connection.
        """
        store = RedisStore(parse_redis_url(self.url(), ca_file=self.ca_file), reactor)
        self.addCleanup(store.close)
        yield store.write(with_crew(*appends(entry(1))))
        replay = yield store.replay(ALPHA, 0, 1, 0.0, "nobody", 1)
        self.assertEqual([seq for seq, _ in replay.entries], [1])

    def test_untrusted_certificate_refused(self):
        """
        A certificate from another CA, or one for another host name, is
        refused at start with a StoreError.
        """
        for url, ca in [(self.url(), self.other_ca), (self.url("127.0.0.1"), self.ca_file)]:
            with self.assertRaises(StoreError) as e:
                RedisStore(parse_redis_url(url, ca_file=ca), reactor)
            self.assertIn("TLS to Redis", str(e.exception))

    @inlineCallbacks
    def test_relay_connection_verifies_too(self):
        """
        The relay's own connection (ClientService over TLS) refuses a
        certificate its CA did not sign: commands fail with a StoreError and
        nothing is written.
        """
        from leeloo.redisstore import RedisConnection

        good = BlockingRedis(parse_redis_url(self.url(), ca_file=self.ca_file))
        self.addCleanup(good.close)
        connection = RedisConnection(parse_redis_url(self.url(), ca_file=self.other_ca), reactor)
        connection.start()
        self.addCleanup(connection.stop)
        error = yield connection.call("SET", "written", "1").addCallbacks(lambda _: None, lambda f: f.value)
        self.assertIsInstance(error, StoreError)
        self.assertIsNone(good.command("GET", "written"))


class ReservationTests(RedisTestCase):
    @inlineCallbacks
    def test_reservation_goes_with_the_crew(self):
        """
        A generated code's reservation (several nodes: leeloo.fanout.redis)
        is dropped when its crew is deleted, so the reservations do not
        grow for ever; another crew's stays.
        """
        from leeloo.store import DELETE_CREW

        store = self.open()
        yield store.write([*with_crew(code=ALPHA), *with_crew(code="LEELOO-KEEP")])
        yield store.connection.call("HSET", "leeloo:codes", ALPHA, "node-a")
        yield store.connection.call("HSET", "leeloo:codes", "LEELOO-KEEP", "node-a")
        yield store.write([(DELETE_CREW, ALPHA)])
        self.assertEqual((yield store.connection.call("HKEYS", "leeloo:codes")), [b"LEELOO-KEEP"])


class MintingTests(RedisTestCase):
    """
    Redis mints each crew's sequence numbers as it stores the entries: two
    relays sharing one Redis never store one number twice, nor refuse a
    message because the other took its number.
    """

    def two_relays(self):
        """
        Two relays, each on its own store on this Redis, and C{settled(i)}:
        fires once relay i's lookups and writes so far are done.
        """
        from leeloo.relay import Relay

        stores = [self.open(), self.open()]
        relays = [Relay(reactor, store, presence_grace=0, bind_timeout=0) for store in stores]

        @inlineCallbacks
        def settled(i, rounds=1):
            # Redis answers in order: once a PING sent now is answered, the
            # lookups sent before it were, and what they queued is written
            # once the journal's barrier fires.
            for _ in range(rounds):
                yield stores[i].connection.call("PING")
                yield relays[i].journal.barrier()

        return stores, relays, settled

    def minted_entry(self, seq, renumbered, text="x"):
        """
        A log entry as the relay makes it: stamped with C{seq}, which Redis
        may change (C{renumbered} is told).
        """
        payload = json.dumps({"type": "message", "payload": {"text": text, "seq": seq, "id": "fake"},
                              "timestamp": 1, "seq": seq, "id": f"id-{text}", "crew_code": ALPHA},
                             separators=(",", ":")).encode()
        return replace(entry(seq, client_msg_id=f"c-{text}", payload=payload), renumber=renumbered.append)

    @inlineCallbacks
    def test_numbers_minted_in_redis(self):
        """
        Two stores proposing the same number both store their entry: the
        second is numbered after the first, told so, and its payload is
        stamped with the number Redis gave (its own "seq" fields left
        alone); the proposal that matched is not renumbered.
        """
        one, two = self.open(), self.open()
        yield one.write(with_crew())
        first, second = [], []
        yield one.write(appends(self.minted_entry(1, first, "one")))
        yield two.write(appends(self.minted_entry(1, second, "two")))
        self.assertEqual((first, second), ([], [2]))
        replay = yield one.replay(ALPHA, 0, 9, 0.0, "nobody", 9)
        self.assertEqual([seq for seq, _ in replay.entries], [1, 2])
        stored = json.loads(replay.entries[1][1])
        self.assertEqual((stored["seq"], stored["payload"]["seq"], stored["id"]), (2, 1, "id-two"))
        found = yield one.find_sent(ALPHA, "leeloo_a", "c-two")
        self.assertEqual(found.seq, 2)
        self.assertEqual(two.sequences.next(ALPHA), 3)

    @inlineCallbacks
    def test_resend_through_another_relay_stored_once(self):
        """
        A resend of a client_msg_id written by a second store while the
        first one's write was on its way (neither store held it) is not
        stored again: the second is told the first one's number and id, and
        the log holds one entry, its number spent once.
        """
        one, two = self.open(), self.open()
        yield one.write(with_crew())
        first, second = [], []
        a = replace(self.minted_entry(1, [], "same"), id="id-same", renumber=lambda *args: first.append(args))
        b = replace(self.minted_entry(1, [], "same"), id="id-resent",
                    renumber=lambda *args: second.append(args))
        yield one.write(appends(a))
        yield two.write(appends(b))
        self.assertEqual((first, second), ([], [(1, "id-same")]))
        replay = yield one.replay(ALPHA, 0, 9, 0.0, "nobody", 9)
        self.assertEqual([seq for seq, _ in replay.entries], [1])
        self.assertEqual(json.loads(replay.entries[0][1])["id"], "id-same")
        # The next message is numbered 2: the resend took no number.
        third = []
        yield two.write(appends(self.minted_entry(5, third, "next")))
        self.assertEqual(third, [2])

    @inlineCallbacks
    def test_resend_racing_on_two_relays(self):
        """
        One device sends a message with a client_msg_id through two relays
        at once (a connection on each, neither relay holding the id yet):
        both connections are answered sent with one number and one id, and
        the crew's log holds it once.
        """
        from leeloo.testing import Device

        stores, relays, settled = self.two_relays()

        here, there = Device(relays[0], "127.0.0.1"), Device(relays[1], "127.0.0.1")
        here.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code=ALPHA)
        yield settled(0)
        there.send(type="join_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code=ALPHA)
        yield settled(1)
        self.assertEqual([here.take()[0]["type"], there.take()[0]["type"]], ["crew_created", "crew_joined"])
        for device in (here, there):
            device.send(type="message", payload={"text": "once"}, client_msg_id="m1")
        sent = {}
        for _ in range(20):
            for i, device in enumerate((here, there)):
                yield settled(i)
                sent.update({i: m for m in device.take() if m["type"] == "sent"})
            if len(sent) == 2:
                break
        for device in (here, there):
            device.close()
        for relay in relays:
            yield relay.journal.drain()
        self.assertEqual(len(sent), 2, sent)
        self.assertEqual((sent[0]["seq"], sent[0]["id"]), (sent[1]["seq"], sent[1]["id"]))
        replay = yield stores[0].replay(ALPHA, 0, 9, 0.0, "nobody", 9)
        self.assertEqual([seq for seq, _ in replay.entries], [sent[0]["seq"]])
        self.assertEqual(json.loads(replay.entries[0][1])["id"], sent[0]["id"])

    @inlineCallbacks
    def test_renamed_on_another_relay(self):
        """
        A legacy device that comes back with its crew's old code through a
        relay that never held the crew (renamed through another relay
        sharing the Redis) joins the crew under its new code, as through
        the relay that renamed it, rather than being told no such crew
        (and then making a new crew of the old code).
        """
        from leeloo.testing import Device

        stores, relays, settled3 = self.two_relays()

        def settled(i):
            return settled3(i, rounds=3)

        ann, bob = Device(relays[0], "127.0.0.1"), Device(relays[0], "127.0.0.1")
        ann.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code=ALPHA)
        yield settled(0)
        bob.send(type="join_crew", device_id="leeloo_bbbbbbbbbbbb", crew_code=ALPHA)
        yield settled(0)
        bob.close()
        yield relays[0].operator.rename_crew(ALPHA, "LEELOO-BRAV")
        bob = Device(relays[1], "127.0.0.1")
        bob.send(type="join_crew", device_id="leeloo_bbbbbbbbbbbb", crew_code=ALPHA)
        yield settled(1)
        [joined] = bob.take()
        self.assertEqual(joined["type"], "crew_joined", joined)
        bob.send(type="message", payload={"text": "back"}, client_msg_id="b1")
        yield settled(1)
        [sent] = [m for m in bob.take() if m["type"] == "sent"]
        self.assertEqual(sent["crew_code"], "LEELOO-BRAV")
        for device in (ann, bob):
            device.close()
        for relay in relays:
            yield relay.journal.drain()
        self.assertEqual(sorted((yield stores[1].connection.call("HKEYS", "leeloo:crews"))), [b"LEELOO-BRAV"])
        replay = yield stores[1].replay("LEELOO-BRAV", 0, 9, 0.0, "nobody", 9)
        self.assertEqual([json.loads(p)["payload"]["text"] for _, p in replay.entries], ["back"])

    @inlineCallbacks
    def test_two_relays_one_crew(self):
        """
        Devices on two relays sharing one Redis send to one crew: each
        message is answered sent with its own number, in the order stored,
        and the log holds both, stamped with those numbers.
        """
        from leeloo.testing import Device

        stores, relays, settled = self.two_relays()

        ann, bob = Device(relays[0], "127.0.0.1"), Device(relays[1], "127.0.0.1")
        ann.send(type="create_crew", device_id="leeloo_aaaaaaaaaaaa", crew_code=ALPHA)
        yield settled(0)
        bob.send(type="join_crew", device_id="leeloo_bbbbbbbbbbbb", crew_code=ALPHA)
        yield settled(1)
        self.assertEqual([ann.take()[0]["type"], bob.take()[0]["type"]], ["crew_created", "crew_joined"])
        ann.send(type="message", payload={"text": "from a"}, client_msg_id="a1")
        bob.send(type="message", payload={"text": "from b"}, client_msg_id="b1")
        sent = []
        for i, device in enumerate((ann, bob)):
            # Each message takes a lookup, then a write: settle until it is
            # answered (a few round trips to Redis, no timer).
            for _ in range(10):
                yield settled(i)
                sent += [m for m in device.take() if m["type"] == "sent"]
                if len(sent) == i + 1:
                    break
        for device in (ann, bob):
            device.close()
        for relay in relays:
            yield relay.journal.drain()
        self.assertEqual(sorted(m["seq"] for m in sent), [1, 2])
        replay = yield stores[0].replay(ALPHA, 0, 9, 0.0, "nobody", 9)
        self.assertEqual(sorted((seq, json.loads(p)["seq"], json.loads(p)["payload"]["text"])
                                for seq, p in replay.entries),
                         sorted((m["seq"], m["seq"], "from a" if m["client_msg_id"] == "a1" else "from b")
                                for m in sent))
