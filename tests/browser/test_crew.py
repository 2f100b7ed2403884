"""
The /crew browser client in real headless Chromium, as a member of a crew
beside devices that speak the WebSocket protocol (the deployed devices'
frames): joining, live traffic both ways, what was missed, reconnecting
after a relay restart, and its states.
"""

import json

from twisted.internet import defer, reactor
from twisted.internet.threads import blockingCallFromThread

from websockets.sync.client import connect

from .support import RelayBrowserTestCase, device, in_thread, next_of, say

ART = "https://i.scdn.co/image/ab67616d0000b273aaaaaaaaaaaaaaaaaaaaaaaa"


class CrewTests(RelayBrowserTestCase):
    @defer.inlineCallbacks
    def test_two_tabs_see_each_others_text_and_reaction(self):
        """
        Two tabs of one browser join a crew as two members (each its own
        device id); each sees the other online and, live, the other's text
        and reaction; a device in the crew sees both by their names and
        receives what they send.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            code = created["crew_code"]
            b = self.browser()
            b.driver.get(self.base + "/crew")
            b.ready()
            b.join(code, "Ann")
            b.wait_state("online")
            ann = b.driver.current_window_handle
            joined = [next_of(dev, "member_joined")["display_name"]]
            b.driver.switch_to.new_window("tab")
            b.driver.get(self.base + "/crew?code=" + code.lower())
            b.ready()
            prefilled = b.find("#crew-code").get_attribute("value")
            b.join(code, "Bob")
            b.wait_state("online")
            bob = b.driver.current_window_handle
            joined.append(next_of(dev, "member_joined")["display_name"])
            bob_sees = b.text_of("#online")
            b.find("#text").send_keys("hello from Bob")
            b.find("#text-form button").click()
            b.wait(lambda d: "sent" in b.feed_texts()[0], "Bob's text was never confirmed")
            from_bob = next_of(dev, "text")
            b.driver.switch_to.window(ann)
            b.wait_feed("hello from Bob")
            ann_sees = b.text_of("#online")
            b.find("#react-love").click()
            from_ann = next_of(dev, "reaction")
            b.driver.switch_to.window(bob)
            b.wait_feed("sent love")
            ids = b.driver.execute_script(
                "return Object.keys(localStorage).filter(function (k) { return k.indexOf('leeloo.') === 0; })"
                ".map(function (k) { return JSON.parse(localStorage.getItem(k)).device_id; });")
            return (code, prefilled, joined, bob_sees, ann_sees, from_bob, from_ann, ids,
                    b.console_errors())

        (code, prefilled, joined, bob_sees, ann_sees, from_bob, from_ann, ids,
         errors) = yield in_thread(script)
        self.assertEqual(prefilled, code)
        self.assertEqual(joined, ["Ann", "Bob"])
        self.assertIn("Ann", bob_sees)
        self.assertIn("Den", bob_sees)
        self.assertIn("Bob", ann_sees)
        self.assertEqual((from_bob["from_name"], from_bob["payload"]), ("Bob", {"text": "hello from Bob"}))
        self.assertEqual((from_ann["from_name"], from_ann["payload"]), ("Ann", {"reaction": "love", "to_device": None}))
        self.assertEqual(len(set(ids)), 2)
        self.assertEqual(errors, [])

    @defer.inlineCallbacks
    def test_device_song_push_shows_title_artist_and_art(self):
        """
        A song a device pushes (the devices' song_push, and share_music)
        shows at once with its title, artist, album, album art from
        Spotify's image host and a link to open it in Spotify.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            b = self.browser()
            b.enter_crew(self.base, created["crew_code"], "Ann")
            say(dev, "song_push", artist="Björk", track="Hyperballad", album="Post",
                spotify_uri="spotify:track:6rqhFgbbKwnb9MLmUQDhG6", album_art_url=ART, note="for you")
            b.wait_feed("Hyperballad")
            pushed = b.find("#feed li")
            pushed = (pushed.text, pushed.find_element("css selector", "img").get_attribute("src"),
                      pushed.find_element("css selector", "a").get_attribute("href"))
            dev.send(json.dumps({"type": "share_music", "spotify_uri": "spotify:track:1VdZ0vKfR5jneCmWIUAMxK",
                                 "artist": "Daft Punk", "track": "One More Time", "album": "Discovery"}))
            b.wait_feed("One More Time")
            shared = b.find("#feed li")
            return pushed, (shared.text, shared.find_element("css selector", "a").get_attribute("href"))

        (text, art, link), (shared, shared_link) = yield in_thread(script)
        for part in ("Den shared a song", "Hyperballad", "Björk", "Post", "for you"):
            self.assertIn(part, text)
        self.assertEqual(art, ART)
        self.assertEqual(link, "https://open.spotify.com/track/6rqhFgbbKwnb9MLmUQDhG6")
        self.assertIn("One More Time", shared)
        self.assertIn("Daft Punk", shared)
        self.assertEqual(shared_link, "https://open.spotify.com/track/1VdZ0vKfR5jneCmWIUAMxK")

    @defer.inlineCallbacks
    def test_browser_sends_song_nudge_and_hang_are_shown(self):
        """
        A song the browser shares from an open.spotify.com link reaches the
        devices as song_push with its spotify: URI; a nudge as nudge; and a
        device's nudge and hang proposal show in the browser.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            b = self.browser()
            b.enter_crew(self.base, created["crew_code"], "Ann")
            b.find("#song-link").send_keys("https://open.spotify.com/intl-de/track/6rqhFgbbKwnb9MLmUQDhG6?si=abc")
            b.find("#song-track").send_keys("Hyperballad")
            b.find("#song-note").send_keys("listen")
            b.find("#song-form button").click()
            song = next_of(dev, "song_push")
            b.find("#nudge").click()
            nudge = next_of(dev, "nudge")
            say(dev, "nudge")
            b.wait_feed("nudged the crew")
            say(dev, "hang_propose", datetime="Friday 8pm", description="pizza")
            b.wait_feed("pizza")
            return song, nudge, b.feed_texts()

        song, nudge, feed = yield in_thread(script)
        self.assertEqual(song["from_name"], "Ann")
        self.assertEqual(
            {k: song["payload"][k] for k in ("spotify_uri", "track", "note")},
            {"spotify_uri": "spotify:track:6rqhFgbbKwnb9MLmUQDhG6", "track": "Hyperballad", "note": "listen"})
        self.assertEqual(nudge["payload"], {})
        self.assertIn("Den", feed[1])
        self.assertIn("Friday 8pm", feed[0])

    @defer.inlineCallbacks
    def test_unknown_crew_shows_the_error_state(self):
        """
        A crew code the relay does not know shows the unknown-crew state
        with the form to try another, and the page stops trying.
        """

        def script(stack):
            b = self.browser()
            b.driver.get(self.base + "/crew?code=NOPE")
            b.ready()
            b.join("nope", "Ann")
            b.wait_state("unknown-crew")
            return (b.text_of("#status"), b.find("#join-view").is_displayed(),
                    b.find("#crew-view").is_displayed(), b.find("#crew-code").get_attribute("value"),
                    b.driver.execute_script("return location.search"))

        status, form, crew, code, search = yield in_thread(script)
        self.assertIn("There is no crew NOPE", status)
        self.assertEqual((form, crew, code, search), (True, False, "NOPE", ""))


# Installed before the page's own script: the random part of the backoff
# pinned at one half, and the time of every WebSocket the page opens.
COUNT_ATTEMPTS = """
Math.random = function () { return 0.5; };
window.attempts = [];
window.WebSocket = class extends WebSocket {
  constructor(url, protocols) { window.attempts.push(performance.now()); super(url, protocols); }
};
"""


class ResumeTests(RelayBrowserTestCase):
    @defer.inlineCallbacks
    def test_reconnects_after_a_relay_restart(self):
        """
        When the relay restarts the page goes offline, reconnects by itself
        and takes up where it was: what a device sent while the page could
        not connect is shown, and what it had already shown is not shown
        again.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True, device_id="leeloo_aaaaaaaaaaaa")
            code = created["crew_code"]
            b = self.browser()
            b.enter_crew(self.base, code, "Ann")
            say(dev, "text", text="before the restart")
            b.wait_feed("before the restart")
            blockingCallFromThread(reactor, self.stop_relay)
            b.wait(lambda d: b.state() in ("offline", "connecting"), "the page never noticed the relay went")
            # Keep the page from reconnecting until the device has spoken,
            # so that what follows is something it missed.
            b.driver.execute_cdp_cmd("Network.enable", {})
            b.driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
                "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            blockingCallFromThread(reactor, self.start_relay)
            again, _ = device(stack, self.port, "Den", code, device_id="leeloo_aaaaaaaaaaaa")
            say(again, "text", text="while you were away")
            say(again, "reaction", reaction="fire", to_device=None)
            b.driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
                "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
            b.wait_state("online")
            b.wait_feed("while you were away")
            b.wait_feed("sent fire")
            b.find("#text").send_keys("back again")
            b.find("#text-form button").click()
            return next_of(again, "text"), b.feed_texts()

        back, feed = yield in_thread(script)
        self.assertEqual(back["payload"], {"text": "back again"})
        self.assertEqual(sum("before the restart" in t for t in feed), 1)
        self.assertEqual(sum("while you were away" in t for t in feed), 1)

    @defer.inlineCallbacks
    def test_backoff_doubles_with_jitter(self):
        """
        While the relay is down the page tries again after a random part
        (full jitter) of a delay that doubles from one second: with the
        random part pinned at one half, after 0.5 s, then 1 s, then 2 s;
        it says it is offline and when it tries next.
        """

        def script(stack):
            _, created = device(stack, self.port, "Den", create=True)
            b = self.browser()
            b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_ATTEMPTS})
            b.enter_crew(self.base, created["crew_code"], "Ann")
            blockingCallFromThread(reactor, self.stop_relay)
            b.wait(lambda d: len(d.execute_script("return window.attempts")) >= 4, "the page stopped trying")
            return b.driver.execute_script("return window.attempts"), b.state(), b.text_of("#status")

        attempts, state, status = yield in_thread(script)
        gaps = [later - earlier for earlier, later in zip(attempts[1:], attempts[2:])]
        self.assertEqual(len(gaps), 2)
        for gap, expected in zip(gaps, (1000, 2000)):
            self.assertGreaterEqual(gap, expected - 20)
            self.assertLess(gap, expected + 800)  # a loaded machine fires timers late
        self.assertEqual(state, "offline")
        self.assertRegex(status, r"^Offline\. Trying again in \d+ s")

    @defer.inlineCallbacks
    def test_shows_what_was_missed_since_the_last_visit(self):
        """
        A browser that comes back to /crew rejoins its crew with the device
        id, key and last seq it kept, and is shown what the crew sent while
        it was away, once.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            code = created["crew_code"]
            b = self.browser()
            b.enter_crew(self.base, code, "Ann")
            say(dev, "text", text="first")
            b.wait_feed("first")
            kept = b.driver.execute_script("return JSON.parse(localStorage.getItem('leeloo.identity.0'))")
            b.driver.get("about:blank")
            offline = next_of(dev, "member_offline")
            say(dev, "text", text="missed one")
            say(dev, "text", text="missed two")
            b.driver.get(self.base + "/crew")
            b.ready()
            b.wait_state("online")
            b.wait_feed("missed two")
            back = next_of(dev, "member_joined")
            return kept, offline, back, b.feed_texts()

        kept, offline, back, feed = yield in_thread(script)
        self.assertEqual(kept["name"], "Ann")
        self.assertRegex(kept["device_id"], r"^leeloo_[0-9a-f]{12}$")
        self.assertTrue(kept["device_key"])
        self.assertEqual(list(kept["seqs"].values()), [1])
        self.assertEqual(offline["device_id"], kept["device_id"])
        self.assertEqual((back["device_id"], back["display_name"]), (kept["device_id"], "Ann"))
        self.assertEqual(["missed two" in feed[0], "missed one" in feed[1], len(feed)], [True, True, 2])

    @defer.inlineCallbacks
    def test_replaced_by_a_newer_connection(self):
        """
        When the browser's device id connects from somewhere else (the relay
        closes this one with 4001), the page says so and does not fight
        back by reconnecting.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            code = created["crew_code"]
            b = self.browser()
            b.enter_crew(self.base, code, "Ann")
            kept = b.driver.execute_script("return JSON.parse(localStorage.getItem('leeloo.identity.0'))")
            other = stack.enter_context(connect(f"ws://127.0.0.1:{self.port}/ws"))
            other.send(json.dumps({"type": "join_crew", "crew_code": code, "device_id": kept["device_id"],
                                   "device_key": kept["device_key"], "display_name": "Ann elsewhere"}))
            joined = next_of(other, "crew_joined")
            b.wait_state("replaced")
            say(dev, "text", text="still the other one?")
            received = next_of(other, "text")
            return joined, received, b.text_of("#status")

        joined, received, status = yield in_thread(script)
        self.assertEqual(joined["type"], "crew_joined")
        self.assertEqual(received["payload"], {"text": "still the other one?"})
        self.assertIn("connected from somewhere else", status)

    @defer.inlineCallbacks
    def test_forget_this_browser(self):
        """
        "Forget this browser" leaves the crew and removes everything the
        page stored; the next visit is a new device.
        """

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            b = self.browser()
            b.enter_crew(self.base, created["crew_code"], "Ann")
            before = b.driver.execute_script("return Object.keys(localStorage)")
            b.find("#forget").click()
            offline = next_of(dev, "member_offline")
            after = b.driver.execute_script("return Object.keys(localStorage)")
            return before, after, offline, b.state(), b.find("#join-view").is_displayed()

        before, after, offline, state, form = yield in_thread(script)
        self.assertEqual(before, ["leeloo.identity.0"])
        self.assertEqual(after, [])
        self.assertEqual(offline["display_name"], "Ann")
        self.assertEqual((state, form), ("idle", True))


HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=1</script><b>bold</b>'
# Names are at most 64 characters.
HOSTILE_NAME = '<img src=x onerror="window.pwned=1"><b>Den</b>'


class HostileContentTests(RelayBrowserTestCase):
    @defer.inlineCallbacks
    def test_markup_in_every_field_stays_text(self):
        """
        Script and markup in every field of every kind of crew message (and
        in the sender's name) is shown as the text it is: nothing runs, no
        element is made from it, no link but Spotify's and no image but
        from Spotify's image hosts.
        """

        def script(stack):
            dev, created = device(stack, self.port, HOSTILE_NAME, create=True)
            b = self.browser()
            b.enter_crew(self.base, created["crew_code"], "Ann")
            h = HOSTILE
            say(dev, "text", text=h)
            say(dev, "reaction", reaction=h, to_device=h)
            say(dev, "song_push", artist=h, track=h, album=h, note=h,
                spotify_uri="javascript:window.pwned=1", album_art_url="javascript:window.pwned=1")
            say(dev, "song_push", artist=h, track=h, album=h, note=h,
                spotify_uri="https://open.spotify.com.evil.example/track/1",
                album_art_url="https://i.scdn.co.evil.example/x.png")
            say(dev, "song_push", track="fine", spotify_uri="spotify:track:" + h,
                album_art_url="http://i.scdn.co/image/x")
            say(dev, "hang_propose", datetime=h, description=h)
            say(dev, "hang_confirm")
            say(dev, HOSTILE_NAME, text=h)  # a msg_type this page does not know
            dev.send(json.dumps({"type": "share_music", "spotify_uri": h, "artist": h, "track": h, "album": h}))
            dev.send(json.dumps({"type": "reaction", "reaction_type": HOSTILE_NAME}))
            say(dev, "text", text={"nested": h}, extra=[h])
            say(dev, "text", text="the end")
            b.wait_feed("the end")
            found = b.driver.execute_script(
                "var feed = document.getElementById('feed');"
                "return {pwned: window.pwned === 1,"
                " made: feed.querySelectorAll('script, b, img[src=\"x\"]').length,"
                " images: Array.prototype.map.call(feed.querySelectorAll('img'), function (i) { return i.src; }),"
                " links: Array.prototype.map.call(feed.querySelectorAll('a'), function (a) { return a.href; }),"
                " online: document.getElementById('online').textContent};")
            return found, b.feed_texts()

        found, feed = yield in_thread(script)
        self.assertFalse(found["pwned"])
        self.assertEqual(found["made"], 0)
        self.assertEqual(found["images"], [])
        self.assertEqual(found["links"], [])
        self.assertIn(HOSTILE_NAME, found["online"])
        self.assertEqual(len(feed), 12)
        # The sender in every item, the unknown msg_type and the
        # reaction_type (both at most 64 characters).
        self.assertEqual(sum(t.count(HOSTILE_NAME) for t in feed), 12 + 2)
        # The text, the reaction, both hostile songs (title, artist, album,
        # note), the hang (when and what) and share_music (title, artist,
        # album): all literally there.
        self.assertEqual(sum(t.count(HOSTILE) for t in feed), 1 + 1 + 4 + 4 + 2 + 3)


# Installed before the page's own script: a text "refuse me" goes out with
# a payload that is not an object, so that the relay refuses it.
SPOIL_A_FRAME = """
(function () {
  var send = WebSocket.prototype.send;
  WebSocket.prototype.send = function (data) {
    var frame = JSON.parse(data);
    if (frame.payload && frame.payload.text === "refuse me") { frame.payload = "spoilt"; data = JSON.stringify(frame); }
    return send.call(this, data);
  };
  window.noticesSeen = [];
  new MutationObserver(function () {
    var notice = document.getElementById("notice");
    if (notice && notice.textContent) window.noticesSeen.push(notice.getAttribute("data-kind"));
  }).observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
})();
"""


class RefusalTests(RelayBrowserTestCase):
    relay_args = ("--messages-per-second", "1", "--message-burst", "4")

    def joined(self, stack, b):
        dev, created = device(stack, self.port, "Den", create=True)
        b.driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SPOIL_A_FRAME})
        b.enter_crew(self.base, created["crew_code"], "Ann")
        return dev

    @defer.inlineCallbacks
    def test_refused_message(self):
        """
        A message the relay refuses shows the refused state with the
        relay's reason, and is marked not sent; the page stays online and
        the next message goes through.
        """

        def script(stack):
            b = self.browser()
            dev = self.joined(stack, b)
            b.find("#text").send_keys("refuse me")
            b.find("#text-form button").click()
            b.wait(lambda d: b.find("#notice").get_attribute("data-kind") == "refused", "no refused notice")
            notice = b.text_of("#notice")
            mine = b.feed_texts()[0]
            b.find("#text").send_keys("fine")
            b.find("#text-form button").click()
            return notice, mine, b.state(), next_of(dev, "text")

        notice, mine, state, received = yield in_thread(script)
        self.assertIn("payload must be an object", notice)
        self.assertIn("not sent: payload must be an object", mine)
        self.assertEqual(state, "online")
        self.assertEqual(received["payload"], {"text": "fine"})

    @defer.inlineCallbacks
    def test_rate_limited(self):
        """
        When the relay says to slow down, the page shows the rate-limited
        state, waits as long as the relay asks, then sends what it held
        back: every reaction arrives, once.
        """

        def script(stack):
            b = self.browser()
            dev = self.joined(stack, b)
            for _ in range(6):
                b.find("#react-fire").click()
            received = [next_of(dev, "reaction") for _ in range(6)]
            b.wait(lambda d: all("sent" in t for t in b.feed_texts()), "not every reaction was confirmed")
            say(dev, "text", text="sentinel")
            b.wait_feed("sentinel")
            dev.send(json.dumps({"type": "ping"}))
            extra = next_of(dev, "reaction", "pong")
            return received, extra, b.driver.execute_script("return window.noticesSeen")

        received, extra, notices = yield in_thread(script)
        self.assertEqual([r["payload"]["reaction"] for r in received], ["fire"] * 6)
        self.assertEqual(extra["type"], "pong")
        self.assertIn("rate-limited", notices)


class JoinLimitTests(RelayBrowserTestCase):
    relay_args = ("--join-attempts", "1")

    @defer.inlineCallbacks
    def test_join_limits_apply_to_the_browser(self):
        """
        The relay's limit on joining crews applies to a browser like to any
        device: from an address that has used up its attempts, the page
        shows the rate-limited state and stays out of the crew.
        """

        def script(stack):
            # Creating a named crew is this address's one attempt.
            _, created = device(stack, self.port, "Den", "HOME", create=True)
            b = self.browser()
            b.driver.get(self.base + "/crew?code=HOME")
            b.ready()
            b.join("HOME", "Ann")
            b.wait(lambda d: b.find("#notice").get_attribute("data-kind") == "rate-limited", "no rate-limited notice")
            return b.text_of("#notice"), b.state()

        notice, state = yield in_thread(script)
        self.assertIn("wait", notice)
        self.assertEqual(state, "offline")
