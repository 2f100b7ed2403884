"""
The relay's pages in real headless Chromium: the landing page's live
counts, the crew page as a crew member beside devices on the WebSocket,
hostile content, accessibility (axe-core, WCAG 2 A and AA) and
screenshots at phone and desktop widths.
"""

import json

from twisted.internet import defer

from .support import DESKTOP, PHONE, RelayBrowserTestCase, axe_source, device, in_thread


class LandingTests(RelayBrowserTestCase):
    @defer.inlineCallbacks
    def test_live_counts(self):
        """
        The landing page shows how many devices and crews are online now,
        and its script updates them from /health.
        """

        def script(stack):
            b = self.browser()
            _, created = device(stack, self.port, "Ann", create=True)
            b.driver.get(self.base + "/")
            first = (b.text_of("#devices-online"), b.text_of("#crews-online"))
            device(stack, self.port, "Cy", create=True)
            device(stack, self.port, "Dee", created["crew_code"])
            b.driver.execute_async_script(
                "var done = arguments[arguments.length - 1]; leelooLanding.refresh().then(done);")
            second = (b.text_of("#devices-online"), b.text_of("#crews-online"))
            link = b.find("a.button").get_attribute("href")
            return first, second, link, b.console_errors()

        first, second, link, errors = yield in_thread(script)
        self.assertEqual(first, ("1", "1"))
        self.assertEqual(second, ("3", "2"))
        self.assertEqual(link, self.base + "/crew")
        self.assertEqual(errors, [])

    @defer.inlineCallbacks
    def test_text_without_javascript(self):
        """
        With JavaScript off, the landing page still says what LEELOO is,
        that the relay is up, the counts, and links to /crew.
        """

        def script(stack):
            device(stack, self.port, "Ann", create=True)
            b = self.browser(javascript=False)
            b.driver.get(self.base + "/")
            return b.find("main").text, b.text_of("#devices-online"), b.find("a.button").get_attribute("href")

        text, devices, link = yield in_thread(script)
        self.assertIn("LEELOO is a little music-sharing gadget", text)
        self.assertIn("Relay online", text)
        self.assertIn("Devices online", text)
        self.assertEqual(devices, "1")
        self.assertEqual(link, self.base + "/crew")


def fits(b, width):
    """
    Whether the page at C{width} needs no sideways scrolling.
    """
    return b.driver.execute_script("return document.documentElement.scrollWidth") <= width


class LookTests(RelayBrowserTestCase):
    """
    Every page passes axe-core's WCAG 2 A and AA rules, fits a 375 px
    phone, and is saved as a screenshot at phone and desktop widths.
    """

    @defer.inlineCallbacks
    def setUp(self):
        from treq.testing import StubTreq

        from leeloo.testing import FakeSpotifyAccounts

        self.accounts = FakeSpotifyAccounts("client", "secret", "https://relay.test/spotify/callback")
        self.accounts.issue("good-code", "access", "refresh")
        self.env = {"SPOTIFY_CLIENT_ID": "client", "SPOTIFY_CLIENT_SECRET": "secret",
                    "SPOTIFY_REDIRECT_URI": "https://relay.test/spotify/callback"}
        self.http = StubTreq(self.accounts)
        yield super().setUp()

    def start_relay(self, env=None, http=None):
        return super().start_relay(env=self.env, http=self.http)

    def check(self, b, name, axe):
        """
        axe's violations on the page, whether it fits a phone, and its two
        screenshots.
        """
        violations = b.axe(axe)
        b.driver.set_window_size(*PHONE)
        fit = fits(b, PHONE[0])
        shots = [b.screenshot(name, PHONE), b.screenshot(name, DESKTOP)]
        return {"page": name, "violations": [(v["id"], v["help"], [n["target"] for n in v["nodes"]])
                                              for v in violations], "fits": fit, "shots": shots}

    def assertLooksRight(self, results):
        for result in results:
            self.assertEqual(result["violations"], [], result["page"])
            self.assertTrue(result["fits"], f"{result['page']} is wider than a phone")
            for shot in result["shots"]:
                self.assertGreater(shot.stat().st_size, 5000, shot)

    @defer.inlineCallbacks
    def test_landing(self):
        """
        The landing page.
        """
        axe = axe_source()

        def script(stack):
            device(stack, self.port, "Ann", create=True)
            b = self.browser()
            b.driver.get(self.base + "/")
            return [self.check(b, "landing", axe)]

        self.assertLooksRight((yield in_thread(script)))

    @defer.inlineCallbacks
    def test_crew(self):
        """
        The crew page: the join form, the unknown-crew state, and a crew
        with people online and a song, a text, a reaction and a nudge in
        its feed.
        """
        axe = axe_source()

        def script(stack):
            dev, created = device(stack, self.port, "Den", create=True)
            code = created["crew_code"]
            b = self.browser(size=PHONE)
            b.driver.get(self.base + "/crew")
            b.ready()
            results = [self.check(b, "crew-join", axe)]
            b.join("nope", "Ann")
            b.wait_state("unknown-crew")
            results.append(self.check(b, "crew-unknown", axe))
            b.join(code, "Ann")
            b.wait_state("online")
            say = lambda t, **p: dev.send(json.dumps({"type": "message", "msg_type": t, "payload": p}))
            say("song_push", artist="Björk", track="Hyperballad", album="Post", note="for the morning",
                spotify_uri="spotify:track:6rqhFgbbKwnb9MLmUQDhG6",
                album_art_url="https://i.scdn.co/image/ab67616d0000b273aaaaaaaaaaaaaaaaaaaaaaaa")
            say("text", text="a very long message with a-very-long-word-that-must-wrap-on-a-phone-" * 2)
            say("reaction", reaction="fire", to_device=None)
            say("hang_propose", datetime="Friday 8pm", description="pizza at Ann's")
            say("nudge")
            b.wait_feed("nudged the crew")
            b.find("#text").send_keys("on my way")
            b.find("#text-form button").click()
            b.wait(lambda d: "sent" in b.feed_texts()[0], "the text was never confirmed")
            results.append(self.check(b, "crew", axe))
            return results

        self.assertLooksRight((yield in_thread(script)))

    @defer.inlineCallbacks
    def test_spotify_callback_pages(self):
        """
        The pages a phone sees at the end of Spotify's pairing: connected,
        cancelled, failed, and a link opened without its code.
        """
        axe = axe_source()

        def script(stack):
            b = self.browser(size=PHONE)
            results = []
            for name, query in (("spotify-connected", "code=good-code&state=leeloo_aaaaaaaaaaaa"),
                                ("spotify-cancelled", "error=access_denied&state=leeloo_aaaaaaaaaaaa"),
                                ("spotify-failed", "code=spent-code&state=leeloo_aaaaaaaaaaaa"),
                                ("spotify-no-code", "state=leeloo_aaaaaaaaaaaa")):
                b.driver.get(self.base + "/spotify/callback?" + query)
                result = self.check(b, name, axe)
                result["text"] = b.find("main").text
                result["stylesheet"] = b.driver.execute_script(
                    "return getComputedStyle(document.querySelector('.card')).borderRadius")
                results.append(result)
            return results

        results = yield in_thread(script)
        self.assertLooksRight(results)
        self.assertIn("Spotify is connected", results[0]["text"])
        self.assertIn("You chose not to connect Spotify", results[1]["text"])
        self.assertIn("That did not work", results[2]["text"])
        self.assertIn("Something is missing", results[3]["text"])
        # One look: the shared stylesheet styles every one of them.
        self.assertEqual({r["stylesheet"] for r in results}, {"16px"})
