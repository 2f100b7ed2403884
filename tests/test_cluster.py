"""
Several relay nodes on one Redis, for real (L{tests.cluster_support}):
devices on different nodes are one crew (messages, presence, counts and
names, the bot API), a newer connection on one node replaces the older on
another, a node killed with SIGKILL has its devices shown offline, and
nothing acknowledged is lost across a Redis restart or a rolling restart.
"""

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase
from websockets.sync.client import connect

from .cluster_support import Cluster
from .redis_support import SKIP
from .support import TIMEOUT, recv, ws_session

A, B, C = "leeloo_aaaaaaaaaaaa", "leeloo_bbbbbbbbbbbb", "leeloo_cccccccccccc"


def send(ws, **fields):
    ws.send(json.dumps(fields))


def until(ws, kind):
    """
    Receive until a message of type C{kind}; return it.
    """
    while True:
        message = recv(ws)
        if message["type"] == kind:
            return message


def join(ws, device_id, code, name, **fields):
    """
    What a deployed device does: join_crew, then create_crew if the crew
    is not there.  Returns the answer.
    """
    send(ws, type="join_crew", device_id=device_id, crew_code=code, display_name=name, **fields)
    answer = recv(ws)
    if answer["type"] == "error" and answer["error"] == "invalid_crew_code":
        send(ws, type="create_crew", device_id=device_id, crew_code=code, display_name=name, **fields)
        answer = recv(ws)
    return answer


def opener(node):
    return connect(node.url, open_timeout=TIMEOUT, close_timeout=TIMEOUT)


def in_thread(script):
    return ws_session(0, lambda _: script())


class TwoNodeTests(TestCase):
    """
    Two nodes, a device on each.
    """

    skip = SKIP
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = yield Cluster(self, 2).start()
        self.one, self.two = self.cluster.nodes

    @defer.inlineCallbacks
    def test_one_crew_across_nodes(self):
        """
        A device on node one and one on node two in a crew see each
        other's messages (with seq), member_joined and member_offline;
        crew_joined counts and names the member on the other node, and
        each node's bot API counts and names both.
        """
        one, two = self.one, self.two

        def script():
            with opener(one) as a, opener(two) as b:
                created = join(a, A, "duo", "Ann")
                one.until_online("DUO", 1)
                two.until_online("DUO", 1)
                joined = join(b, B, "duo", "Bob")
                announced = until(a, "member_joined")
                statuses = [one.until_online("DUO", 2), two.until_online("DUO", 2)]
                send(b, type="share_music", spotify_uri="spotify:track:1", artist="X", track="Y", album="Z")
                music = until(a, "music_shared")
                send(a, type="reaction", reaction_type="fire")
                reaction = until(b, "reaction")
                send(a, type="message", msg_type="text", payload={"text": "hi"}, client_msg_id="m1")
                sent = until(a, "sent")
                text = until(b, "message")
                b.close()
                offline = until(a, "member_offline")
                after = one.until_online("DUO", 1)
                return created, joined, announced, statuses, music, reaction, sent, text, offline, after

        created, joined, announced, statuses, music, reaction, sent, text, offline, after = yield in_thread(script)
        self.assertEqual(created["type"], "crew_created")
        self.assertEqual((joined["type"], joined["crew_members"], joined["member_names"]),
                         ("crew_joined", 2, ["Ann"]))
        self.assertEqual((announced["device_id"], announced["display_name"]), (B, "Bob"))
        for status in statuses:
            self.assertEqual((status["devices_online"], sorted(status["device_names"])), (2, ["Ann", "Bob"]))
        self.assertEqual((music["pushed_by"], music["track"], music["seq"]), ("Bob", "Y", 1))
        self.assertEqual((reaction["from"], reaction["seq"]), ("Ann", 2))
        self.assertEqual((text["payload"], text["seq"], text["id"]), ({"text": "hi"}, 3, sent["id"]))
        self.assertEqual((offline["device_id"], offline["display_name"]), (B, "Bob"))
        self.assertEqual((after["devices_online"], after["device_names"]), (1, ["Ann"]))

    @defer.inlineCallbacks
    def test_replaced_across_nodes(self):
        """
        A newer connection for a device id on node two closes the one on
        node one with 4001; the crew counts the device once, and hears no
        member_offline for it.
        """
        one, two = self.one, self.two

        def script():
            with opener(one) as a, opener(one) as c:
                first = join(a, A, "trio", "Ann")
                join(c, C, "trio", "Cat")
                until(a, "member_joined")
                with opener(two) as again:
                    rejoined = join(again, A, "trio", "Ann", device_key=first["device_key"])
                    try:
                        while True:
                            recv(a)
                    except Exception:
                        pass
                    code = a.close_code
                    status = one.until_online("TRIO", 2)
                    send(again, type="ping")
                    until(again, "pong")
                    send(c, type="reaction", reaction_type="love")
                    reaction = until(again, "reaction")
                    return rejoined, code, status, reaction

        rejoined, code, status, reaction = yield in_thread(script)
        self.assertEqual((rejoined["type"], rejoined["crew_members"], rejoined["member_names"]),
                         ("crew_joined", 2, ["Cat"]))
        self.assertEqual(code, 4001)
        self.assertEqual((status["devices_online"], sorted(status["device_names"])), (2, ["Ann", "Cat"]))
        self.assertEqual(reaction["from"], "Cat")

    @defer.inlineCallbacks
    def test_key_bound_on_another_node(self):
        """
        A device key issued by node two and first presented on node one is
        required on node two from then on, though node two held the id
        unbound.
        """
        one, two = self.one, self.two

        def script():
            with opener(two) as first:
                issued = join(first, A, "keys", "Ann")
            with opener(one) as bound:
                presented = join(bound, A, "keys", "Ann", device_key=issued["device_key"])
                # Answered sent once durable, with the binding written before it.
                send(bound, type="message", payload={"text": "bound"}, client_msg_id="k1")
                until(bound, "sent")
            with opener(two) as thief:
                refused = join(thief, A, "keys", "Ann")
            with opener(two) as owner:
                again = join(owner, A, "keys", "Ann", device_key=issued["device_key"])
            return issued, presented, refused, again

        issued, presented, refused, again = yield in_thread(script)
        self.assertIn("device_key", issued)
        self.assertEqual(presented["type"], "crew_joined")
        self.assertEqual((refused["type"], refused["error"]), ("error", "device_auth_failed"))
        self.assertEqual(again["type"], "crew_joined")

    @defer.inlineCallbacks
    def test_key_reset_on_another_node(self):
        """
        The operator's key reset on node one closes the device's
        connection on node two (4004) and node two forgets the key: the
        device comes back there without one and is issued a new key.
        """
        one, two = self.one, self.two

        def script():
            with opener(two) as first:
                issued = join(first, A, "reset", "Ann")
            with opener(two) as holder:
                bound = join(holder, A, "reset", "Ann", device_key=issued["device_key"])
                send(holder, type="message", payload={"text": "bound"}, client_msg_id="r1")
                until(holder, "sent")
                answer = one.admin("reset-key", {"device_id": A})
                try:
                    while True:
                        recv(holder)
                except Exception:
                    code = holder.close_code
            with opener(two) as back:
                again = join(back, A, "reset", "Ann")
            return issued, bound, answer, code, again

        issued, bound, answer, code, again = yield in_thread(script)
        self.assertEqual((bound["type"], answer["device_id"]), ("crew_joined", A))
        self.assertEqual(code, 4004)
        self.assertEqual(again["type"], "crew_joined")
        self.assertNotEqual(again.get("device_key"), issued["device_key"])
        self.assertIn("device_key", again)

    @defer.inlineCallbacks
    def test_bot_on_either_node(self):
        """
        A crew made by the bot API on node one is found by node two's;
        a bot message sent through node two reaches a device on node one,
        counted in devices_reached.
        """
        one, two = self.one, self.two

        def script():
            made = one.bot("/api/telegram/crew/create", {"telegram_user_id": "7", "display_name": "Tel"})
            code = made["crew_code"]
            with opener(one) as a:
                join(a, A, code, "Ann")
                two.until_online(code, 1)
                joined = two.bot("/api/telegram/crew/join",
                                 {"telegram_user_id": "8", "crew_code": code, "display_name": "Gram"})
                reached = two.bot("/api/telegram/message", {
                    "telegram_user_id": "8", "crew_code": code, "sender_name": "Gram", "msg_type": "text",
                    "payload": {"text": "from the bot"}})
                message = until(a, "message")
                status = one.until_status(code, lambda s: len(s["telegram_user_names"]) == 2)
                return made, joined, reached, message, status

        made, joined, reached, message, status = yield in_thread(script)
        self.assertTrue(made["crew_code"].startswith("LEELOO-"))
        self.assertEqual((joined["success"], joined["devices_online"]), (True, 1))
        self.assertEqual(reached, {"success": True, "devices_reached": 1})
        self.assertEqual((message["from_device"], message["from_name"], message["payload"]),
                         ("telegram", "Gram", {"text": "from the bot"}))
        self.assertEqual(sorted(status["telegram_user_names"]), ["Gram", "Tel"])

    @defer.inlineCallbacks
    def test_resend_on_another_node(self):
        """
        A client_msg_id sent through node one and sent again through node
        two (the device moved) is answered with its first seq and id, and
        not delivered twice.
        """
        one, two = self.one, self.two

        def script():
            with opener(two) as b:
                join(b, B, "once", "Bob", last_seq=0)
                with opener(one) as a:
                    first = join(a, A, "once", "Ann", last_seq=0)
                    send(a, type="message", payload={"text": "x"}, client_msg_id="cx")
                    sent = until(a, "sent")
                with opener(two) as a:
                    join(a, A, "once", "Ann", last_seq=sent["seq"], device_key=first["device_key"])
                    send(a, type="message", payload={"text": "x"}, client_msg_id="cx")
                    again = until(a, "sent")
                received = until(b, "message")
                send(b, type="ping")
                between = []
                while True:
                    message = recv(b)
                    if message["type"] == "pong":
                        break
                    between.append(message["type"])
                return sent, again, received, between

        sent, again, received, between = yield in_thread(script)
        self.assertEqual((again["seq"], again["id"]), (sent["seq"], sent["id"]))
        self.assertEqual((received["seq"], received["id"]), (sent["seq"], sent["id"]))
        self.assertNotIn("message", between)

    @defer.inlineCallbacks
    def test_one_crew_made_on_two_nodes(self):
        """
        Two devices creating the same code at once on two nodes are in one
        crew; a code the relay generates is reserved in Redis for the node
        that made it.
        """
        one, two = self.one, self.two

        def script():
            from leeloo.redisstore import BlockingRedis
            from leeloo.redisurl import parse_redis_url

            with opener(one) as a, opener(two) as b, opener(one) as c:
                send(a, type="create_crew", device_id=A, crew_code="same", display_name="Ann")
                send(b, type="create_crew", device_id=B, crew_code="same", display_name="Bob")
                answers = [recv(a), recv(b)]
                statuses = [one.until_online("SAME", 2), two.until_online("SAME", 2)]
                send(c, type="create_crew", device_id=C, display_name="Cat")
                made = recv(c)
                redis = BlockingRedis(parse_redis_url(self.cluster.redis.url))
                try:
                    reserved = redis.command("HEXISTS", "leeloo:codes", made["crew_code"])
                finally:
                    redis.close()
                return answers, statuses, made, reserved

        answers, statuses, made, reserved = yield in_thread(script)
        self.assertEqual([a["crew_code"] for a in answers], ["SAME", "SAME"])
        for status in statuses:
            self.assertEqual(sorted(status["device_names"]), ["Ann", "Bob"])
        self.assertTrue(made["crew_code"].startswith("LEELOO-"))
        self.assertEqual(int(reserved), 1)

    @defer.inlineCallbacks
    def test_node_killed(self):
        """
        Node one is killed with SIGKILL: its device is shown offline to
        its crew on node two (within 30 s; here three short heartbeats),
        and node two's bot API counts no ghost.
        """
        one, two = self.one, self.two

        def before():
            a, b = opener(one), opener(two)
            join(a, A, "gone", "Ann")
            join(b, B, "gone", "Bob")
            two.until_online("GONE", 2)
            return a, b

        a, b = yield in_thread(before)
        self.addCleanup(b.close)
        self.addCleanup(a.close)
        reaped = two.logged(r"stopped beating")
        yield one.stop("KILL")
        yield reaped

        def after():
            offline = until(b, "member_offline")
            return offline, two.status("GONE")

        offline, status = yield in_thread(after)
        self.assertEqual((offline["device_id"], offline["display_name"]), (A, "Ann"))
        self.assertEqual((status["devices_online"], status["device_names"]), (1, ["Bob"]))


class RestartTests(TestCase):
    """
    Two nodes through a Redis restart, and nodes restarted one by one.
    """

    skip = SKIP
    timeout = 90

    @defer.inlineCallbacks
    def test_redis_restart_under_traffic(self):
        """
        Redis stops and starts again (its AOF read back) while a device
        on each node is connected: both nodes subscribe again, and a
        message sent after is stored and reaches the other node's device
        exactly once, numbered after those before.
        """
        cluster = yield Cluster(self, 2, appendfsync="everysec").start()
        one, two = cluster.nodes

        def before():
            a, b = opener(one), opener(two)
            join(a, A, "storm", "Ann", last_seq=0)
            join(b, B, "storm", "Bob", last_seq=0)
            one.until_online("STORM", 2)
            send(a, type="message", payload={"text": "before"}, client_msg_id="c1")
            until(a, "sent")
            return a, b, until(b, "message")

        a, b, first = yield in_thread(before)
        self.addCleanup(b.close)
        self.addCleanup(a.close)
        # Each node's cluster links and its store's connection are back.
        again = [node.logged(pattern) for node in (one, two)
                 for pattern in (r"subscribed again", r"connected to Redis at \S+ again")]
        yield cluster.redis.stop()
        yield cluster.redis.start()
        yield defer.gatherResults(again)

        def after():
            two.until_online("STORM", 2)
            send(a, type="message", payload={"text": "after"}, client_msg_id="c2")
            sent = until(a, "sent")
            received = until(b, "message")
            send(b, type="ping")
            between = []
            while True:
                message = recv(b)
                if message["type"] == "pong":
                    break
                between.append(message)
            return sent, received, between

        sent, received, between = yield in_thread(after)
        self.assertEqual((first["seq"], first["payload"]), (1, {"text": "before"}))
        self.assertEqual((sent["seq"], received["seq"], received["payload"]), (2, 2, {"text": "after"}))
        self.assertEqual(between, [])

    @defer.inlineCallbacks
    def test_rolling_restart(self):
        """
        Nodes stopped one by one (a new one started in between) with
        devices connected: each device is closed with 1001, comes back on
        a node still running, and receives every message the other
        acknowledged as sent, once.
        """
        cluster = yield Cluster(self, 2).start()
        one, two = cluster.nodes

        def phase1():
            a, b = opener(one), opener(two)
            join(a, A, "roll", "Ann", last_seq=0)
            join(b, B, "roll", "Bob", last_seq=0)
            one.until_online("ROLL", 2)
            send(a, type="message", payload={"text": "m1"}, client_msg_id="c1")
            sent = until(a, "sent")
            return a, b, sent, until(b, "message")

        a, b, sent1, got1 = yield in_thread(phase1)
        self.addCleanup(b.close)
        yield one.stop("TERM")

        def phase2():
            closed = []
            try:
                while True:
                    recv(a)
            except Exception:
                closed.append(a.close_code)
            send(b, type="message", payload={"text": "m2"}, client_msg_id="c2")
            sent = until(b, "sent")
            a2 = opener(two)
            join(a2, A, "roll", "Ann", last_seq=sent1["seq"])
            got = until(a2, "message")
            return closed, a2, sent, got

        closed, a2, sent2, got2 = yield in_thread(phase2)
        self.addCleanup(a2.close)
        three = yield cluster.node("node3").start()
        yield two.stop("TERM")

        def phase3():
            codes = []
            for ws in (a2, b):
                try:
                    while True:
                        recv(ws)
                except Exception:
                    codes.append(ws.close_code)
            with opener(three) as a3, opener(three) as b3:
                join(a3, A, "roll", "Ann", last_seq=got2["seq"])
                join(b3, B, "roll", "Bob", last_seq=sent2["seq"])
                three.until_online("ROLL", 2)
                send(a3, type="message", payload={"text": "m3"}, client_msg_id="c3")
                sent = until(a3, "sent")
                return codes, sent, until(b3, "message")

        codes, sent3, got3 = yield in_thread(phase3)
        self.assertEqual(closed + codes, [1001, 1001, 1001])
        self.assertEqual([(s["seq"], s["id"]) for s in (sent1, sent2, sent3)],
                         [(g["seq"], g["id"]) for g in (got1, got2, got3)])
        self.assertEqual([g["payload"]["text"] for g in (got1, got2, got3)], ["m1", "m2", "m3"])
        self.assertEqual([g["seq"] for g in (got1, got2, got3)], [1, 2, 3])


class OperatorTests(TestCase):
    """
    The operator renames or deletes a crew through one node's admin API.
    """

    skip = SKIP
    timeout = 60

    @defer.inlineCallbacks
    def test_rename_then_delete_across_nodes(self):
        """
        A crew renamed on node one is renamed on node two: its member
        there is told, sends under the new code, and both nodes count both
        members under it.  Deleted on node one, its member on node two is
        told and closed (4004), and node two knows the crew no more.
        """
        cluster = yield Cluster(self, 2).start()
        one, two = cluster.nodes

        def script():
            with opener(one) as a, opener(two) as b:
                join(a, A, "band", "Ann")
                join(b, B, "band", "Bob")
                one.until_online("BAND", 2)
                renamed = one.admin("rename-crew", {"crew_code": "BAND", "new_crew_code": "GROUP"})
                told = [until(a, "crew_renamed"), until(b, "crew_renamed")]
                status = two.until_online("GROUP", 2)
                send(b, type="reaction", reaction_type="love")
                reaction = until(a, "reaction")
                deleted = one.admin("delete-crew", {"crew_code": "GROUP"})
                gone = until(b, "crew_deleted")
                try:
                    while True:
                        recv(b)
                except Exception:
                    code = b.close_code
                after = two.until_status("GROUP", lambda s: not s["exists"])
                return renamed, told, status, reaction, deleted, gone, code, after

        renamed, told, status, reaction, deleted, gone, code, after = yield in_thread(script)
        self.assertEqual((renamed["old_crew_code"], renamed["crew_code"]), ("BAND", "GROUP"))
        self.assertEqual([(t["crew_code"], t["old_crew_code"]) for t in told], [("GROUP", "BAND")] * 2)
        self.assertEqual(sorted(status["device_names"]), ["Ann", "Bob"])
        self.assertEqual((reaction["from"], reaction["crew_code"]), ("Bob", "GROUP"))
        self.assertEqual(deleted["crew_code"], "GROUP")
        self.assertEqual((gone["crew_code"], code), ("GROUP", 4004))
        self.assertFalse(after["exists"])


class RemoveTests(TestCase):
    skip = SKIP
    timeout = 60

    @defer.inlineCallbacks
    def test_member_removed_on_another_node(self):
        """
        The operator on node one takes a member online on node two out of
        its crew: it is told crew_left there, the crew hears it went
        offline, and both nodes count one member.
        """
        cluster = yield Cluster(self, 2).start()
        one, two = cluster.nodes

        def script():
            with opener(one) as a, opener(two) as b:
                join(a, A, "pair", "Ann")
                join(b, B, "pair", "Bob")
                one.until_online("PAIR", 2)
                answer = one.admin("remove", {"device_id": B, "crew_code": "PAIR"})
                left = until(b, "crew_left")
                offline = until(a, "member_offline")
                return answer, left, offline, [one.until_online("PAIR", 1), two.until_online("PAIR", 1)]

        answer, left, offline, statuses = yield in_thread(script)
        self.assertEqual((answer["device_id"], answer["online"]), (B, False))
        self.assertEqual(left["crew_code"], "PAIR")
        self.assertEqual(offline["device_id"], B)
        for status in statuses:
            self.assertEqual(status["device_names"], ["Ann"])


class SpotifyTests(TestCase):
    """
    The Spotify callback on one node, the device on another.
    """

    skip = SKIP
    timeout = 60

    @defer.inlineCallbacks
    def test_tokens_reach_a_device_on_another_node(self):
        """
        The callback on node two hands the tokens to the device online on
        node one; tokens for a device offline are kept, and handed to it
        when it registers on node one.
        """
        from twisted.internet import reactor
        from twisted.web.server import Site

        from leeloo.testing import FakeSpotifyAccounts

        redirect = "https://relay.cluster.test/spotify/callback"
        accounts = FakeSpotifyAccounts("cid", "csecret", redirect)
        accounts.issue("code-online", "access-online", "refresh-online")
        accounts.issue("code-offline", "access-offline", "refresh-offline")
        port = reactor.listenTCP(0, Site(accounts), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        cluster = yield Cluster(self, 2, environ={
            "SPOTIFY_CLIENT_ID": "cid", "SPOTIFY_CLIENT_SECRET": "csecret", "SPOTIFY_REDIRECT_URI": redirect,
            "SPOTIFY_ACCOUNTS_URL": f"http://127.0.0.1:{port.getHost().port}"}).start()
        one, two = cluster.nodes

        def script():
            import urllib.request

            with opener(one) as a:
                # Its claim and its crew reach node two in one batch.
                join(a, A, "spot", "Ann")
                two.until_online("SPOT", 1)
                page = urllib.request.urlopen(
                    f"http://127.0.0.1:{two.port}/spotify/callback?code=code-online&state={A}", timeout=TIMEOUT)
                online = until(a, "spotify_auth_complete")
            urllib.request.urlopen(
                f"http://127.0.0.1:{two.port}/spotify/callback?code=code-offline&state={C}", timeout=TIMEOUT)
            with opener(one) as c:
                send(c, type="register", device_id=C)
                recv(c)
                offline = until(c, "spotify_auth_complete")
            return page.status, online, offline

        status, online, offline = yield in_thread(script)
        self.assertEqual(status, 200)
        self.assertEqual(online["tokens"]["access_token"], "access-online")
        self.assertEqual(offline["tokens"]["access_token"], "access-offline")


class ThreeNodeTests(TestCase):
    """
    Three nodes, a device on each.
    """

    skip = SKIP
    timeout = 60

    @defer.inlineCallbacks
    def test_three_nodes(self):
        """
        A message from the device on node one reaches those on nodes two
        and three (one command to both nodes); every node counts three;
        node two killed, the others' devices see its device offline and
        every node counts two.
        """
        cluster = yield Cluster(self, 3).start()
        one, two, three = cluster.nodes

        def before():
            a, b, c = opener(one), opener(two), opener(three)
            join(a, A, "tri", "Ann")
            join(b, B, "tri", "Bob")
            join(c, C, "tri", "Cat")
            counts = [node.until_online("TRI", 3)["devices_online"] for node in cluster.nodes]
            send(a, type="share_music", spotify_uri="spotify:track:9", artist="X", track="T", album="Z")
            got = [until(b, "music_shared"), until(c, "music_shared")]
            return a, b, c, counts, got

        a, b, c, counts, got = yield in_thread(before)
        for ws in (a, b, c):
            self.addCleanup(ws.close)
        # Whichever of the two left reaps it.
        reaped = defer.DeferredList([one.logged(r"stopped beating"), three.logged(r"stopped beating")],
                                    fireOnOneCallback=True)
        yield two.stop("KILL")
        yield reaped

        def after():
            offline = [until(a, "member_offline"), until(c, "member_offline")]
            return offline, [one.until_online("TRI", 2), three.until_online("TRI", 2)]

        offline, statuses = yield in_thread(after)
        self.assertEqual(counts, [3, 3, 3])
        self.assertEqual([(m["pushed_by"], m["seq"]) for m in got], [("Ann", 1), ("Ann", 1)])
        self.assertEqual([m["device_id"] for m in offline], [B, B])
        for status in statuses:
            self.assertEqual(sorted(status["device_names"]), ["Ann", "Cat"])
