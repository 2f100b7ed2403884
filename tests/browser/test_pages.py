"""
The relay's pages in real headless Chromium: the landing page's live
counts, the crew page as a crew member beside devices on the WebSocket,
hostile content, accessibility (axe-core, WCAG 2 A and AA) and
screenshots at phone and desktop widths.
"""

import json

from twisted.internet import defer

from ..support import TIMEOUT
from .support import DESKTOP, PHONE, RelayBrowserTestCase, axe_source, in_thread

from websockets.sync.client import connect


def device(stack, port, name, code=None, create=False, device_id=None):
    """
    A raw WebSocket device (what the deployed ones speak), in crew C{code}
    (created when C{create}) and closed with C{stack}; returns the socket
    and its reply.
    """
    ws = stack.enter_context(
        connect(f"ws://127.0.0.1:{port}/ws", open_timeout=TIMEOUT, close_timeout=TIMEOUT))
    hello = {"type": "create_crew" if create else "join_crew", "display_name": name}
    if code is not None:
        hello["crew_code"] = code
    if device_id is not None:
        hello["device_id"] = device_id
    ws.send(json.dumps(hello))
    return ws, json.loads(ws.recv(timeout=TIMEOUT))


def next_of(ws, kind):
    """
    The next frame of type C{kind} the device receives.
    """
    while True:
        frame = json.loads(ws.recv(timeout=TIMEOUT))
        if frame.get("type") == kind:
            return frame


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
