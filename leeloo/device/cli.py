"""
C{leeloo-device COMMAND URL [options]}, for operators and device developers.

Exit status: 0 on success, 1 when the check or the command failed, 2 for
bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence
from urllib.parse import quote, urlencode

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from leeloo.device.check import CROSS, TICK, Check
from leeloo.device.connection import BadURL, RelayURL, load_ca

SPOTIFY_AUTHORIZE = "https://accounts.spotify.com/authorize"
SPOTIFY_SCOPES = "user-read-currently-playing user-read-playback-state"


def _url(value: str) -> str:
    try:
        RelayURL.parse(value)
    except BadURL as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return seconds


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="leeloo-device",
        description="Talk to a LEELOO relay as a device does.",
        epilog="Exit status: 0 success, 1 the check or command failed, 2 bad usage.",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, state: bool = True) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.add_argument("url", metavar="URL", type=_url, help="the relay, e.g. wss://leeloobot.xyz/ws")
        p.add_argument("--ca", metavar="FILE", help="verify the relay's certificate against this CA (PEM) "
                                                    "instead of the system's CA store")
        if state:
            p.add_argument("--state", metavar="DIR", required=True,
                           help="the device's state directory (crew_config.json and friends)")
            p.add_argument("--name", help="the device's display name (saved in crew_config.json)")
            p.add_argument("--crew", metavar="CODE", help="join this crew (and make it the device's crew)")
        return p

    p = command("check", "Check a relay with a real round trip.", state=False)
    p.add_argument("--timeout", type=_seconds, default=15.0, metavar="SECONDS",
                   help="give up after this long (default 15)")
    command("listen", "Run as a device and print every event as a JSON line.")
    p = command("send", "Send a text message to the device's crew.")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("--timeout", type=_seconds, default=15.0, metavar="SECONDS",
                   help="how long to wait for the relay to confirm it (default 15)")
    p = command("pair-spotify", "Pair Spotify: print the relay's pairing URL, its QR code and the code to "
                                "check on the phone, and wait for the tokens. Against a relay that predates "
                                "pairing, the legacy way: Spotify's authorize URL with the device id as state "
                                "(needs --client-id and --redirect-uri).")
    p.add_argument("--client-id", metavar="ID", help="the Spotify app's client id (legacy pairing only)")
    p.add_argument("--redirect-uri", metavar="URI",
                   help="the relay's callback, e.g. https://leeloobot.xyz/spotify/callback (legacy pairing only)")
    p.add_argument("--legacy", action="store_true",
                   help="pair the legacy way even if the relay can broker the pairing")
    p.add_argument("--scope", default=None, help=f"Spotify scopes (default {SPOTIFY_SCOPES!r})")
    p.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="how long to wait for the tokens (default 600)")
    return top


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """
    Parse C{argv}; exit 2 with a usage message when it is wrong.
    """
    p = parser()
    args = p.parse_args(argv)
    args.trust_root = None
    if args.command == "pair-spotify":
        if bool(args.client_id) != bool(args.redirect_uri):
            p.error("--client-id and --redirect-uri go together (the legacy pairing needs both)")
        if args.legacy and not args.client_id:
            p.error("--legacy needs --client-id and --redirect-uri")
    if args.ca:
        try:
            args.trust_root = load_ca(args.ca)
        except ValueError as e:
            p.error(str(e))
    return args


def spotify_authorize_url(client_id: str, redirect_uri: str, device_id: str, scope: str = SPOTIFY_SCOPES) -> str:
    """
    The authorize URL deployed devices show as a QR code: C{state} is the
    device id the relay routes the tokens back to.
    """
    query = urlencode({
        "client_id": client_id, "response_type": "code", "redirect_uri": redirect_uri,
        "scope": scope, "state": device_id, "show_dialog": "true",
    }, quote_via=quote)
    return f"{SPOTIFY_AUTHORIZE}?{query}"


def run(reactor: Any, args: argparse.Namespace, out: Any) -> Deferred:
    """
    Run the parsed command; fire with its exit status.  Cancelling the
    Deferred stops a long-running command (C{listen}).
    """
    if args.command == "check":
        return Check(reactor, args.url, out, timeout=args.timeout, trust_root=args.trust_root).run()
    return _DeviceCommand(reactor, args, out).run()


class _DeviceCommand:
    def __init__(self, reactor: Any, args: argparse.Namespace, out: Any) -> None:
        self.reactor = reactor
        self.args = args
        self.out = out
        self.result: Deferred = Deferred(self._cancel)
        self.device: Any = None
        # Once the outcome is known, what stopping the device says is noise.
        self.finishing = False

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> Deferred:
        from leeloo.device.client import LeelooDevice
        from leeloo.device.state import StateError

        try:
            self.device = LeelooDevice(self.args.url, self.args.state, self.args.name, reactor=self.reactor,
                                       trust_root=self.args.trust_root)
        except StateError as e:
            self.say(f"{CROSS} {e}")
            return _fired(1)
        except OSError as e:
            self.say(f"{CROSS} cannot use the state directory {self.args.state}: {e.strerror}")
            return _fired(1)
        self.device.on("stopped", self._stopped)
        getattr(self, "_" + self.args.command.replace("-", "_"))()
        if self.args.crew:
            self.device.join_crew(self.args.crew).addErrback(self._fail, f"join crew {self.args.crew}")
        self.device.startService()
        timeout = getattr(self.args, "timeout", None)
        if timeout is not None:
            self._timer = self.reactor.callLater(timeout, self._timed_out, timeout)
        return self.result

    def _finish(self, status: int) -> None:
        if self.result.called or self.finishing:
            return
        self.finishing = True
        timer = getattr(self, "_timer", None)
        if timer is not None and timer.active():
            timer.cancel()
        d = maybeDeferred(self.device.stopService)
        d.addBoth(lambda _: self.result.called or self.result.callback(status))

    def _cancel(self, result: Deferred) -> None:
        self.finishing = True
        self.device.stopService()
        result.callback(0)

    def _fail(self, failure: Failure, what: str) -> None:
        if self.finishing:
            return
        value = failure.value
        code = getattr(value, "code", None)
        why = f"{code}: {getattr(value, 'message', value)}" if code else str(value)
        self.say(f"{CROSS} {what}: {why}")
        self._finish(1)

    def _stopped(self, frame: dict) -> None:
        if self.finishing:
            return
        self.say(f"{CROSS} {frame.get('message')}")
        self._finish(1)

    def _timed_out(self, timeout: float) -> None:
        what = {"send": "the message stays in the outbox and goes out the next time this device connects",
                "pair-spotify": "no tokens arrived"}.get(self.args.command, "")
        self.say(f"{CROSS} timed out after {timeout:g}s waiting for the relay; {what}")
        self._finish(1)

    # ------------------------------------------------------------ commands

    def _listen(self) -> None:
        def printed(event: str, frame: dict) -> None:
            self.say(json.dumps({"event": event, **frame}, ensure_ascii=False))

        self.device.observe(printed)

    def _send(self) -> None:
        def sent(frame: dict) -> None:
            self.say(f"{TICK} sent to crew {self.device.crew_code} (seq {frame.get('seq')})")
            self._finish(0)

        d = self.device.send_text(self.args.text)
        d.addCallbacks(sent, self._fail, errbackArgs=("send",))

    def _pair_spotify(self) -> None:
        asked = []

        def connected(frame: dict) -> None:
            if asked:
                return
            asked.append(True)
            if self.args.legacy:
                self._legacy_pairing(frame["device_id"])
                return
            d = self.device.pair_spotify(self.args.scope)
            d.addCallbacks(paired, refused, errbackArgs=(frame["device_id"],))

        def paired(frame: dict) -> None:
            url = frame["url"]
            self.say(f"Open this URL on a phone (or scan the QR code), check the code {frame['user_code']} "
                     "and press the button:")
            self.say(url)
            self._qr(url)
            self.say(f"code: {frame['user_code']} (valid {frame['expires_in'] // 60} minutes); "
                     "waiting for the tokens ...")

        def refused(failure: Failure, device_id: str) -> None:
            from leeloo.device.client import PairingUnsupported

            if failure.check(PairingUnsupported):
                self.say("the relay predates pairing; falling back to the legacy authorize URL")
                self._legacy_pairing(device_id)
                return
            self._fail(failure, "pair Spotify")

        def failed(frame: dict) -> None:
            if self.finishing:
                return
            advice = {"denied": "Spotify access was not allowed", "expired": "the code expired",
                      "cancelled": "a newer pairing replaced it", "refused": "Spotify refused the pairing"}
            reason = frame.get("reason")
            self.say(f"{CROSS} pairing {frame.get('user_code')} ended: {advice.get(reason, reason)}; "
                     "run pair-spotify again")
            self._finish(1)

        def tokens(frame: dict) -> None:
            self.say(f"{TICK} Spotify tokens saved to {self.device.state.path('spotify_tokens.json')}")
            self._finish(0)

        self.device.on("connected", connected)
        self.device.on("spotify_pair_failed", failed)
        self.device.on("spotify_auth_complete", tokens)

    def _legacy_pairing(self, device_id: str) -> None:
        if not (self.args.client_id and self.args.redirect_uri):
            self.say(f"{CROSS} the legacy pairing needs --client-id and --redirect-uri (the relay's "
                     "Spotify app and callback)")
            self._finish(1)
            return
        url = spotify_authorize_url(self.args.client_id, self.args.redirect_uri, device_id,
                                    self.args.scope or SPOTIFY_SCOPES)
        self.say("Open this URL on a phone (or scan the QR code) and allow LEELOO:")
        self.say(url)
        self._qr(url)
        self.say(f"waiting for the tokens for device {device_id} ...")

    def _qr(self, url: str) -> None:
        try:
            import qrcode
        except ImportError:
            self.say("(install the device extra, pip install 'leeloo-relay[device]', for a QR code here)")
            return
        qr = qrcode.QRCode(border=2)
        qr.add_data(url)
        qr.make(fit=True)
        qr.print_ascii(out=self.out)
        self.out.flush()


def _fired(value: Any) -> Deferred:
    d = Deferred()
    d.callback(value)
    return d


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{leeloo-device} console script.
    """
    args = parse(sys.argv[1:] if argv is None else argv)
    from twisted.internet import task

    def command(reactor: Any) -> Deferred:
        d = run(reactor, args, sys.stdout)

        def status(code: int) -> None:
            if code:
                raise SystemExit(code)

        return d.addCallback(status)

    task.react(command)
