"""
The Spotify pairing pages in real headless Chromium: accessibility
(axe-core, WCAG 2 A and AA), a phone's width, screenshots, and the page's
Content-Security-Policy as Chrome applies it to the redirect that follows
the button's post.
"""

import json

from twisted.internet import defer

from .support import DESKTOP, PHONE, RelayBrowserTestCase, axe_source, device, in_thread, next_of

REDIRECT_URI = "https://relay.test/spotify/callback"


class PairingPageTests(RelayBrowserTestCase):
    @defer.inlineCallbacks
    def setUp(self):
        from treq.testing import StubTreq

        from leeloo.testing import FakeSpotifyAccounts

        self.accounts = FakeSpotifyAccounts("client", "secret", REDIRECT_URI)
        self.env = {"SPOTIFY_CLIENT_ID": "client", "SPOTIFY_CLIENT_SECRET": "secret",
                    "SPOTIFY_REDIRECT_URI": REDIRECT_URI}
        self.http = StubTreq(self.accounts)
        yield super().setUp()

    def start_relay(self, env=None, http=None):
        return super().start_relay(env=self.env, http=self.http)

    def paired(self, stack, name="Kitchen"):
        """
        A raw WebSocket device in a new crew that asked for a pairing: its
        crew and the path of its pairing page.
        """
        ws, created = device(stack, self.port, name, create=True)
        ws.send(json.dumps({"type": "spotify_pair"}))
        answer = next_of(ws, "spotify_pair")
        return created["crew_code"], answer

    def check(self, b, name, axe):
        violations = b.axe(axe)
        b.driver.set_window_size(*PHONE)
        fit = b.driver.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        shots = [b.screenshot(name, PHONE), b.screenshot(name, DESKTOP)]
        return {"page": name, "violations": [(v["id"], v["help"], [n["target"] for n in v["nodes"]])
                                              for v in violations],
                "fits": fit, "shots": shots, "text": b.find("main").text}

    @defer.inlineCallbacks
    def test_pages_look_right(self):
        """
        The pairing page (the device's name, crew and code, and its button)
        and the pages for an unknown code, a code already used and a
        callback from another browser pass axe, fit a phone, and say what
        they should.
        """
        axe = axe_source()

        def script(stack):
            crew, answer = self.paired(stack)
            path = "/pair/" + answer["user_code"].replace("-", "")
            b = self.browser(size=PHONE)
            results = []
            b.driver.get(self.base + path)
            results.append(self.check(b, "pair", axe))
            b.driver.get(self.base + "/pair/ABCDEFGH")
            results.append(self.check(b, "pair-unknown", axe))
            b.driver.get(self.base + "/spotify/callback?code=x&state=pair~nothing")
            results.append(self.check(b, "pair-callback-unknown", axe))
            return crew, answer, results

        crew, answer, results = yield in_thread(script)
        for result in results:
            self.assertEqual(result["violations"], [], result["page"])
            self.assertTrue(result["fits"], f"{result['page']} is wider than a phone")
            for shot in result["shots"]:
                self.assertGreater(shot.stat().st_size, 5000, shot)
        self.assertIn("Kitchen", results[0]["text"])
        self.assertIn(crew, results[0]["text"])
        self.assertIn(answer["user_code"], results[0]["text"])
        self.assertIn("Continue to Spotify", results[0]["text"])
        self.assertIn("not known", results[1]["text"])
        self.assertIn("Start again on your LEELOO", results[2]["text"])

    @defer.inlineCallbacks
    def test_consent_box(self):
        """
        The pairing page of a device that offers the relay keeping the
        access holds the consent box, unchecked, with its label: it passes
        axe and fits a phone.
        """
        axe = axe_source()

        def script(stack):
            ws, created = device(stack, self.port, "Kitchen", create=True)
            ws.send(json.dumps({"type": "spotify_pair", "keep_access": True}))
            answer = next_of(ws, "spotify_pair")
            b = self.browser(size=PHONE)
            b.driver.get(self.base + "/pair/" + answer["user_code"].replace("-", ""))
            box = b.driver.find_element("id", "keep")
            return self.check(b, "pair-consent", axe), box.is_selected(), box.get_attribute("type")

        result, selected, kind = yield in_thread(script)
        self.assertEqual(result["violations"], [])
        self.assertTrue(result["fits"], "the consent page is wider than a phone")
        self.assertEqual((kind, selected), ("checkbox", False))
        self.assertIn("let the relay keep access so this LEELOO can share what you're playing", result["text"])

    @defer.inlineCallbacks
    def test_button_reaches_spotify(self):
        """
        The button's post and the 303 after it take Chrome on to Spotify's
        authorize URL: the pairing page's form-action allows exactly that
        (Chrome checks the redirect too), with no CSP complaint; the code
        is spent.
        """

        def script(stack):
            _, answer = self.paired(stack)
            path = "/pair/" + answer["user_code"].replace("-", "")
            b = self.browser(size=PHONE)
            b.driver.get(self.base + path)
            b.find("#connect").click()
            b.wait(lambda d: d.current_url.startswith("https://accounts.spotify.com/authorize?"),
                   "the button never led to Spotify")
            url = b.driver.current_url
            errors = [e["message"] for e in b.console_errors() if "Content Security Policy" in e["message"]]
            b.driver.get(self.base + path)
            return url, errors, b.find("main").text

        url, errors, again = yield in_thread(script)
        self.assertIn("code_challenge_method=S256", url)
        self.assertIn("state=pair~", url)
        self.assertEqual(errors, [])
        self.assertIn("already used", again)
