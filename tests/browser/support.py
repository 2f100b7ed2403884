"""
Real headless Chromium for the page tests: Debian's ``chromium`` and
``chromium-driver`` driven with Selenium (no Selenium Manager, no network
beyond loopback), axe-core from npm, and the relay's service tree on the
real reactor.

Selenium and the websockets client block, so each test runs its browser
script in a thread (L{in_thread}) while the reactor serves the relay.

Environment:
    ``LEELOO_SKIP_BROWSER=1``  skip these tests, saying why (otherwise a
                               missing Chromium fails them)
    ``LEELOO_CHROMIUM``        the browser (default ``/usr/bin/chromium``)
    ``LEELOO_CHROMEDRIVER``    its driver (default ``/usr/bin/chromedriver``)
    ``LEELOO_AXE``             axe.min.js (default: installed by
                               ``scripts/test.sh`` under
                               ``tests/browser/node_modules/``)
    ``LEELOO_SCREENSHOTS``     where screenshots go (default
                               ``build/screenshots/`` in the checkout)
"""

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import txaio
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase
from websockets.sync.client import connect

from leeloo.tap import Options, build_service

from ..support import CHECKOUT, listening_port
from ..support import TIMEOUT as WS_TIMEOUT

TIMEOUT = 15
PHONE = (375, 812)
DESKTOP = (1280, 900)
HERE = Path(__file__).resolve().parent

CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--no-default-browser-check", "--disable-extensions",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--lang=en-US", "--hide-scrollbars",
    # Loopback only: every other name fails to resolve (album art from
    # Spotify's hosts included, so the pages' images stay unloaded).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def chromium_paths():
    """
    The browser and driver to use; a clear failure when they are missing,
    or L{SkipTest} when C{LEELOO_SKIP_BROWSER} is set.
    """
    if os.environ.get("LEELOO_SKIP_BROWSER"):
        raise SkipTest("LEELOO_SKIP_BROWSER is set: the browser tests do not run")
    browser = os.environ.get("LEELOO_CHROMIUM", "/usr/bin/chromium")
    driver = os.environ.get("LEELOO_CHROMEDRIVER", "/usr/bin/chromedriver")
    for path, package in ((browser, "chromium"), (driver, "chromium-driver")):
        if not os.access(path, os.X_OK):
            raise AssertionError(
                f"{path} not found: install Debian's {package} (scripts/test.sh does), "
                "or set LEELOO_SKIP_BROWSER=1 to skip the browser tests")
    return browser, driver


def axe_source():
    path = Path(os.environ.get("LEELOO_AXE", HERE / "node_modules" / "axe-core" / "axe.min.js"))
    if not path.is_file():
        raise AssertionError(
            f"{path} not found: run `npm install --no-save --prefix tests/browser axe-core` "
            "(scripts/test.sh does)")
    return path.read_text("utf-8")


def screenshot_dir():
    path = Path(os.environ.get("LEELOO_SCREENSHOTS", os.path.join(CHECKOUT, "build", "screenshots")))
    path.mkdir(parents=True, exist_ok=True)
    return path


def in_thread(script, *args):
    """
    Run the blocking C{script(stack, *args)} in a thread, with an
    L{ExitStack} that closes what it opened (WebSocket clients) when it
    returns; a Deferred of its result.
    """
    def run():
        with ExitStack() as stack:
            return script(stack, *args)
    return deferToThread(run)


def device(stack, port, name, code=None, create=False, device_id=None):
    """
    A raw WebSocket device in crew C{code} (created when C{create}; a new
    code when C{code} is None), closed with C{stack}: its socket and reply.
    """
    ws = stack.enter_context(
        connect(f"ws://127.0.0.1:{port}/ws", open_timeout=WS_TIMEOUT, close_timeout=WS_TIMEOUT))
    hello = {"type": "create_crew" if create else "join_crew", "display_name": name}
    if code is not None:
        hello["crew_code"] = code
    if device_id is not None:
        hello["device_id"] = device_id
    ws.send(json.dumps(hello))
    return ws, json.loads(ws.recv(timeout=WS_TIMEOUT))


def next_of(ws, *kinds):
    """
    The next frame the device receives whose type (or msg_type) is one of
    C{kinds}.
    """
    while True:
        frame = json.loads(ws.recv(timeout=WS_TIMEOUT))
        if frame.get("type") in kinds or frame.get("msg_type") in kinds:
            return frame


def say(ws, msg_type, **payload):
    ws.send(json.dumps({"type": "message", "msg_type": msg_type, "payload": payload}))


class Browser:
    """
    One headless Chromium with a fresh profile, driven by Selenium; use it
    from a thread.
    """

    def __init__(self, javascript=True, size=DESKTOP):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver = chromium_paths()
        self.profile = tempfile.mkdtemp(prefix="leeloo-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={size[0]},{size[1]}")
        if not javascript:
            options.add_experimental_option(
                "prefs", {"profile.managed_default_content_settings.javascript": 2})
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=driver), options=options)
        self.driver.set_page_load_timeout(TIMEOUT)
        self.driver.set_script_timeout(TIMEOUT)

    def quit(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    # ---------------------------------------------------------- helpers

    def wait(self, condition, message=""):
        """
        Wait (polling the page) until C{condition(driver)} is true; return
        its value.
        """
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.driver, TIMEOUT, poll_frequency=0.05).until(condition, message)

    def find(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text_of(self, css):
        return self.find(css).text

    def state(self):
        return self.find("#status").get_attribute("data-state")

    def wait_state(self, state):
        self.wait(lambda d: self.state() == state,
                  f"the page never reached state {state!r} (it is {self.state()!r}: {self.text_of('#status')!r})")

    def ready(self):
        self.wait(lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"),
                  "crew.js never started")

    def join(self, code, name):
        self.find("#crew-code").clear()
        self.find("#crew-code").send_keys(code)
        self.find("#display-name").clear()
        self.find("#display-name").send_keys(name)
        self.find("#join").click()

    def enter_crew(self, base, code, name):
        """
        Open C{base}'s crew page for C{code}, join it as C{name} and wait
        until the page says it is online.
        """
        self.driver.get(base + "/crew?code=" + code)
        self.ready()
        self.join(code, name)
        self.wait_state("online")

    def feed_texts(self):
        return [li.text for li in self.find_all("#feed li")]

    def wait_feed(self, needle):
        self.wait(lambda d: any(needle in t for t in self.feed_texts()),
                  f"{needle!r} never appeared in the feed: {self.feed_texts()!r}")

    def axe(self, source):
        """
        axe-core's WCAG 2 A and AA violations on the current page.
        """
        self.driver.execute_script(source)
        result = self.driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})"
            ".then(function (r) { done(JSON.stringify(r.violations)); },"
            "      function (e) { done(JSON.stringify([{id: 'axe-error', help: String(e)}])); });")
        return json.loads(result)

    def console_errors(self):
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def screenshot(self, name, size):
        self.driver.set_window_size(*size)
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(size[0], max(size[1], min(height, 4000)))
        path = screenshot_dir() / f"{name}-{size[0]}px.png"
        self.driver.save_screenshot(str(path))
        return path


class RelayBrowserTestCase(TestCase):
    """
    A relay service tree on loopback, on the real reactor, and browsers
    that quit when the test ends.
    """

    timeout = 90
    relay_args = ()

    @defer.inlineCallbacks
    def setUp(self):
        chromium_paths()
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        self.data_dir = os.path.abspath(self.mktemp())
        self.port = None
        yield self.start_relay()

    @defer.inlineCallbacks
    def start_relay(self, env=None, http=None):
        """
        Start the service tree (again, on the same port and data dir when it
        ran before).
        """
        listen = f"tcp:{self.port or 0}:interface=127.0.0.1"
        options = Options(environ=env or {})
        # Presence at once: the pages show a member going offline without
        # waiting out the relay's 10-second grace.
        options.parseOptions(["--listen", listen, "--data-dir", self.data_dir, "--presence-grace", "0",
                              *self.relay_args])
        self.service = build_service(options.config, reactor, http=http)
        self.service.startService()
        port = yield listening_port(self.service)
        self.port = port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"
        service = self.service

        def stop():
            if service.running:
                return service.stopService()
        self.addCleanup(stop)

    def stop_relay(self):
        return self.service.stopService()

    def browser(self, **kwargs):
        """
        A L{Browser}, from a thread; it quits at the end of the test.
        """
        b = Browser(**kwargs)
        self.addCleanup(deferToThread, b.quit)
        return b
