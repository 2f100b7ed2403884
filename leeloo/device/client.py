"""
The device client: one LEELOO's connection to its relay, kept up for good.

L{LeelooDevice} is a Twisted service.  A L{ClientService} holds the
connection: it reconnects after Wi-Fi drops and relay restarts, waiting a
L{FullJitter} backoff so a fleet does not stampede.  On every connection the
device enters its crew (C{join_crew}, presenting its device id, its device
key and the last crew sequence it handled), then sends what waits in its
outbox.  Crew messages it receives are handed to observers once, in order,
then recorded and acknowledged; sends carry a C{client_msg_id} and stay in
the persisted outbox until the relay answers C{sent}, so that each goes out
once whatever happens to the connection.

What the relay may say, and what the device does:

C{invalid_crew_code} for the saved crew
    the relay lost it: create it again under the same code (what deployed
    devices do).  For a crew the application asked to join, the join fails.
C{invalid_last_seq}
    the relay lost its log: forget the position in that crew and enter again.
C{rate_limited}
    wait C{retry_after} seconds, then enter again / resend the outbox.
C{store_unavailable}
    the message was not stored: resend the outbox after C{resend_delay}.
C{device_auth_failed}
    stop for good and report (L{DeviceStopped}): another device holds this id.
close 4001
    a newer connection took this device id (another process runs with this
    state): stop for good and say so, or two copies would replace each
    other forever.
close 4029
    the relay refused too much: wait the backoff cap before reconnecting.
C{replay_truncated}
    handed to the application (C{replay_truncated} observers).
C{unknown_type} while a pairing is asked for
    the relay predates pairing: L{pair_spotify} fails with
    L{PairingUnsupported}, and the caller falls back to the legacy authorize
    URL (C{state} = the device id).

Several crews (issue 16): L{crew_add} adds a crew and keeps the others (the
device is multi-crew from then on, and saves its other crews in
C{relay_state.json}); L{crew_leave} leaves one; L{crews} asks the relay
for the list.  On every connection the device enters its main crew (the one
C{crew_config.json} names, as deployed devices do), and adds its other
crews again, each after the last sequence it handled there.  A send may
name one of its crews (C{crew_code}); a multi-crew device names the crew on
every send.  Every crew event (C{message}, C{music_shared}, C{reaction},
C{member_joined}, C{member_offline}, C{replay_truncated}, C{sent}) reaches
observers with the C{crew_code} the relay tags it with (an older relay sends
none: its events are the main crew's), and positions and acknowledgements
are kept per crew.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from leeloo import __version__, messages
from leeloo.device.backoff import FullJitter
from leeloo.device.connection import RelayURL, endpoint_for
from leeloo.device.crews import CREW_ERRORS, SeveralCrews
from leeloo.device.state import DeviceState, StateError
from leeloo.messages import (
    FANOUTS,
    CloseCode,
    CrewCreated,
    CrewJoined,
    CrewLeft,
    CrewList,
    ErrorFrame,
    InvalidMessage,
    NotInCrew,
    Pong,
    ProtocolError,
    Registered,
    RelayMessage,
    Sent,
    SpotifyAuthComplete,
    SpotifyForgotten,
    SpotifyPairStarted,
    SpotifySearchResults,
    SpotifyTokens,
)
from leeloo.timers import cancel_close_timer

# The msg_type values deployed devices send and understand.
MSG_TYPES = ("text", "song_push", "reaction", "nudge", "hang_propose", "hang_confirm")

EVENTS = ("message", "music_shared", "reaction", "member_joined", "member_offline",
          "spotify_auth_complete", "spotify_pair", "spotify_pair_failed", "spotify_tokens",
          "spotify_search_results", "spotify_forgotten", "connected", "disconnected",
          "replay_truncated", "sent", "error", "stopped", "crew_joined", "crew_left", "crews")

# The reply that says the relay has put the connection where it asked.
_REPLIES: dict[str, type] = {"join": CrewJoined, "create": CrewCreated, "register": Registered}

_log = Logger()


class DeviceError(Exception):
    """
    Something the device refused or gave up on; C{code} names it.
    """

    code = "device_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OutboxFull(DeviceError):
    """
    A send while the outbox already holds C{outbox_limit} unconfirmed
    messages: it was not queued.
    """

    code = "outbox_full"


class DeviceStopped(DeviceError):
    """
    The device stopped before the relay confirmed the send.  The message
    stays in the outbox and goes out when the device runs again.
    C{reason} is what stopped it (a L{ProtocolError} from the relay, or
    C{None} when the application stopped it).
    """

    code = "device_stopped"

    def __init__(self, message: str, reason: Exception | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class DeviceReplaced(DeviceError):
    """
    The relay closed the connection with 4001: a newer connection claimed
    this device id.
    """

    code = "device_replaced"


class PairingUnsupported(DeviceError):
    """
    The relay does not know C{spotify_pair} (it answered C{unknown_type}):
    pair the legacy way, with C{state} = the device id.
    """

    code = "pairing_unsupported"


class SpotifyUnsupported(DeviceError):
    """
    The relay does not know C{spotify_refresh} / C{spotify_search} (it
    answered C{unknown_type}): an older relay.
    """

    code = "spotify_unsupported"


# The errors that answer a spotify_refresh or spotify_search.
_SPOTIFY_ERRORS = ("unknown_type", "not_registered", "spotify_not_configured", "spotify_refused",
                   "spotify_unavailable", "rate_limited", "invalid_message")
# The errors that answer only some of them.
_SPOTIFY_CALL_ERRORS = {"spotify_refresh": ("not_paired", "store_unavailable"),
                        "spotify_forget": ("store_unavailable",),
                        "share_now_playing": ("nothing_playing", "not_paired", "not_in_crew", "store_unavailable")}
# The answers to them.
_SPOTIFY_ANSWERS = {"spotify_refresh": "spotify_tokens", "spotify_search": "spotify_search_results",
                    "spotify_forget": "spotify_forgotten", "share_now_playing": "sent"}


# The errors that answer a spotify_pair.
_PAIRING_ERRORS = ("unknown_type", "not_registered", "spotify_not_configured", "store_unavailable")


class DeviceProtocol(WebSocketClientProtocol):
    """
    One WebSocket to the relay; it only translates frames for its
    L{LeelooDevice}.
    """

    device: "LeelooDevice"

    def onOpen(self) -> None:
        self.factory.device._opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            _log.warn("the relay sent a binary frame; ignored")
            return
        self.factory.device._received(self, payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.device._closed(self, code, reason)

    def send_frame(self, message: dict) -> None:
        """
        Send C{message}; on a connection already closing it is dropped (a
        send stays in the outbox, the position is saved: the next
        connection catches up).
        """
        if self.state != self.STATE_OPEN:
            return
        self.sendMessage(messages.encode(message))

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        cancel_close_timer(self)


class LeelooDevice(SeveralCrews, Service):
    """
    A LEELOO's client: connects to C{url}, keeps its files in C{state_dir},
    and enters its crew (the saved one, or a new one when it has none and
    C{auto_create} is true) under C{display_name}.

    Observe with L{on} (C{"message"}, C{"member_joined"}, C{"connected"},
    ...; see C{EVENTS}), L{on_message} (one C{msg_type}) or L{observe}
    (everything).  Observers get the relay's frame as a dict.

    @param retry_policy: the reconnect delay for a number of failed
        attempts (default: L{FullJitter} capped at C{backoff_cap}).
    @param trust_root: the CA to verify a C{wss:} relay with (a
        L{twisted.internet.ssl.Certificate}); default: the system's store.
    @param endpoint: connect through this client endpoint instead of the
        one the URL names (tests, proxies).
    """

    def __init__(
        self,
        url: str,
        state_dir: Any,
        display_name: str | None = None,
        *,
        reactor: Any = None,
        trust_root: Any = None,
        endpoint: Any = None,
        retry_policy: FullJitter | Callable[[int], float] | None = None,
        backoff_cap: float = 60.0,
        outbox_limit: int = 100,
        auto_create: bool = True,
        ping_interval: float = 30.0,
        ping_timeout: float = 20.0,
        open_timeout: float = 15.0,
        max_message_size: int = 64 * 1024,
        resend_delay: float = 5.0,
        fsync: bool = True,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.relay = RelayURL.parse(url)
        self.state = DeviceState(state_dir, fsync=fsync)
        if display_name:
            self.state.config.display_name = display_name
        self.policy = retry_policy if retry_policy is not None else FullJitter(cap=backoff_cap)
        self.outbox_limit = outbox_limit
        self.auto_create = auto_create
        self.max_message_size = max_message_size
        self.resend_delay = resend_delay

        self.factory = WebSocketClientFactory(
            url, reactor=reactor, useragent=f"leeloo-device/{__version__}")
        self.factory.protocol = DeviceProtocol
        self.factory.device = self
        self.factory.setProtocolOptions(
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            openHandshakeTimeout=open_timeout,
            closeHandshakeTimeout=5.0,
            maxMessagePayloadSize=1024 * 1024,
            maxFramePayloadSize=1024 * 1024,
        )
        if endpoint is None:
            endpoint = endpoint_for(reactor, self.relay, trust_root, timeout=open_timeout)
        self.endpoint = endpoint
        self._service = ClientService(endpoint, self.factory, retryPolicy=self._retry_delay, clock=reactor)

        self._observers: dict[str, list[Callable[[dict], Any]]] = {}
        self._everything: list[Callable[[str, dict], Any]] = []
        self._proto: DeviceProtocol | None = None
        self.phase = "offline"  # offline, entering, ready, stopped
        self.crew_code: str | None = None  # the crew the relay has this connection in
        self._target = self._default_target()
        self._entering: tuple | None = None
        self._expected: type | None = None
        self._binds = 0
        self._stopping: Deferred | None = None
        self._close_waiters: list[Deferred] = []
        self.close_timeout = 5.0
        self._entry_timer: Any = None
        self.entry_timeout = open_timeout
        self._entry_waiters: list[tuple[tuple, Deferred]] = []
        self._waiting: dict[str, Deferred] = {}
        # pair_spotify() callers waiting for the relay's spotify_pair, and
        # the request to send once connected (None: sent, or none asked).
        self._pairing: list[Deferred] = []
        self._pair_request: dict | None = None
        self._pair_sent = False
        # refresh_spotify() / search() calls: (frame, Deferred), the first
        # one sent (True) or waiting to be; one at a time, as the relay's
        # answers carry no request id.
        self._spotify_calls: list[tuple[dict, Deferred]] = []
        self._spotify_sent = False
        self._init_crews()
        self._unproductive = 0
        self._next_delay: float | None = None
        self._timer: Any = None
        self.stopped_by: Exception | None = None

    # ----------------------------------------------------------- observers

    def on(self, event: str, callback: Callable[[dict], Any]) -> Callable[[], None]:
        """
        Call C{callback(frame)} on every C{event}; return a function that
        stops it.
        """
        self._observers.setdefault(event, []).append(callback)
        return lambda: self._observers[event].remove(callback)

    def on_message(self, msg_type: str, callback: Callable[[dict], Any]) -> Callable[[], None]:
        """
        Call C{callback(frame)} for every crew C{message} of C{msg_type}.
        """
        return self.on(f"message:{msg_type}", callback)

    def observe(self, callback: Callable[[str, dict], Any]) -> Callable[[], None]:
        """
        Call C{callback(event, frame)} for every event.
        """
        self._everything.append(callback)
        return lambda: self._everything.remove(callback)

    def _emit(self, event: str, frame: dict) -> None:
        targets = list(self._observers.get(event, ()))
        if event == "message":
            targets += self._observers.get(f"message:{frame.get('msg_type')}", ())
        for callback in targets:
            self._call(callback, frame)
        for callback in list(self._everything):
            self._call(callback, event, frame)

    def _call(self, callback: Callable, *args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            _log.failure("a device observer raised; the event counts as handled")

    # ------------------------------------------------------------- service

    @property
    def device_id(self) -> str | None:
        return self.state.config.device_id or None

    @property
    def connected(self) -> bool:
        return self.phase == "ready"

    def startService(self) -> None:
        super().startService()
        self.phase = "offline"
        self.stopped_by = None
        self._stopping = None
        _log.info("device {device_id} connecting to {url}", device_id=self.device_id, url=self.relay.url)
        self._service.startService()

    def stopService(self) -> Deferred:
        """
        Close the WebSocket cleanly (the relay tells the crew the device
        went offline) and stop reconnecting.
        """
        super().stopService()
        if self._stopping is not None and self.phase == "stopped":
            return self._stopping
        proto = self._proto
        if (proto is not None and proto.state == proto.STATE_OPEN
                and not getattr(proto.transport, "disconnecting", False)):
            closed = Deferred()
            self._close_waiters.append(closed)
            proto.sendClose(1000, "device stopping")
            closed.addTimeout(self.close_timeout, self.reactor)
            return closed.addBoth(lambda _: self._stop(None))
        return self._stop(None)

    def _stop(self, reason: Exception | None) -> Deferred:
        if self._stopping is not None and self.phase == "stopped":
            return self._stopping
        self.phase = "stopped"
        self.stopped_by = reason
        self._cancel_timer()
        self._cancel_entry_timer()
        d = self._stopping = self._service.stopService()
        waiting, self._waiting = self._waiting, {}
        why = str(reason) if reason is not None else "the device was stopped"
        for w in waiting.values():
            w.errback(DeviceStopped(f"{why}; the message stays in the outbox and goes out when the device runs again",
                                    reason))
        entries, self._entry_waiters = self._entry_waiters, []
        for _, w in entries:
            w.errback(DeviceStopped(why, reason))
        self._fail_pairing(DeviceStopped(why, reason))
        self._fail_spotify_calls(DeviceStopped(why, reason))
        self._fail_crew_calls(DeviceStopped(why, reason))
        return d

    def _give_up(self, reason: Exception) -> None:
        if self.phase == "stopped":
            return
        self.phase = "stopped"
        self.stopped_by = reason
        _log.error("device {device_id} stopped: {reason}", device_id=self.device_id, reason=str(reason))
        if self.running:
            Service.stopService(self)
        self._emit("stopped", {"type": "stopped", "error": getattr(reason, "code", "device_error"),
                               "message": str(reason)})
        self._stopping = None
        self.reactor.callLater(0, self._stop, reason)

    def _retry_delay(self, attempt: int) -> float:
        if self._next_delay is not None:
            delay, self._next_delay = self._next_delay, None
            return delay
        return self.policy(max(attempt, self._unproductive))

    # --------------------------------------------------------------- crews

    def _default_target(self) -> tuple:
        code = self.state.config.crew_code
        if code:
            return ("join", code.strip().upper(), False)
        if self.auto_create:
            return ("create", None, False)
        return ("register", None, False)

    def create_crew(self, crew_code: str | None = None) -> Deferred:
        """
        Create a crew (the relay picks the code unless C{crew_code} is
        given; an existing code is joined) and make it this device's crew.
        Fires with the crew code once the relay has put the device in it.
        """
        try:
            code = messages.normalize_crew_code(crew_code) if crew_code else None
        except ProtocolError as e:
            return fail(e)
        return self._retarget(("create", code, True))

    def join_crew(self, crew_code: str) -> Deferred:
        """
        Join the crew C{crew_code} and make it this device's crew.  Fires
        with the crew code, or fails with L{messages.InvalidCrewCode} when
        the relay knows no such crew (the device stays in its crew).
        """
        try:
            code = messages.normalize_crew_code(crew_code)
        except ProtocolError as e:
            return fail(e)
        return self._retarget(("join", code, True))

    def _stopped(self) -> Deferred | None:
        """
        A failed Deferred (L{DeviceStopped}) when the device stopped for
        good, else C{None}.
        """
        if self.phase == "stopped" and self.stopped_by is not None:
            return fail(DeviceStopped(str(self.stopped_by), self.stopped_by))
        return None

    def _retarget(self, target: tuple) -> Deferred:
        if self.phase == "stopped" and self.stopped_by is not None:
            return fail(DeviceStopped(str(self.stopped_by), self.stopped_by))
        d = Deferred()
        self._entry_waiters.append((target, d))
        self._target = target
        if self.phase == "ready":
            self._enter()
        return d

    def _enter(self) -> None:
        proto = self._proto
        if proto is None:
            return
        self.phase = "entering"
        kind, code, explicit = self._entering = self._target
        self._expected = _REPLIES[kind]
        c = self.state.config
        frame: dict = {}
        if kind == "join":
            frame = {"type": "join_crew", "crew_code": code, "display_name": c.display_name}
        elif kind == "create":
            frame = {"type": "create_crew", "display_name": c.display_name}
            if code:
                frame["crew_code"] = code
        else:
            frame = {"type": "register", "device_name": c.display_name}
        if c.device_id:
            frame["device_id"] = c.device_id
            if self.state.device_key:
                frame["device_key"] = self.state.device_key
        if code and kind != "register" and code in self.state.last_seq:
            frame["last_seq"] = self.state.last_seq[code]
        proto.send_frame(frame)
        self._cancel_entry_timer()
        self._entry_timer = self.reactor.callLater(self.entry_timeout, self._entry_timed_out, proto)

    def _entry_timed_out(self, proto: DeviceProtocol) -> None:
        self._entry_timer = None
        if proto is self._proto and self.phase == "entering":
            _log.warn("the relay did not answer {kind} within {timeout}s; reconnecting",
                      kind=self._entering[0] if self._entering else "entry", timeout=self.entry_timeout)
            proto.sendClose(1000, "no answer")

    def _cancel_entry_timer(self) -> None:
        if self._entry_timer is not None:
            if self._entry_timer.active():
                self._entry_timer.cancel()
            self._entry_timer = None

    def _entered(self, proto: DeviceProtocol, reply: Registered | CrewCreated | CrewJoined) -> None:
        self._cancel_entry_timer()
        target = self._entering
        self._entering = None
        c = self.state.config
        device_id = reply.device_id
        code = None if isinstance(reply, Registered) else reply.crew_code
        changed = False
        if device_id != c.device_id:
            c.device_id, changed = device_id, True
        if code is not None and code != c.crew_code:
            if self.state.multi and c.crew_code:
                # A multi-crew device's join_crew adds a crew: the one it
                # was in stays one of its crews.
                if c.crew_code not in self.state.crews:
                    self.state.crews.insert(0, c.crew_code)
                if code in self.state.crews:
                    self.state.crews.remove(code)
                self.state.save_positions()
            c.crew_code, c.crew_id, changed = code, code, True
        if changed or self.state.config_changed():
            self.state.save_config()
        key = reply.device_key
        if key:
            # Issued to an id with no bound key: keep it, and present it at
            # once so that it binds before anyone else claims this id.
            self.state.save_key(key)
            self._binds += 1
            proto.send_frame({"type": "register", "device_id": c.device_id, "device_key": key})
        self.crew_code = code
        requested = self._target
        if self.crew_code is not None:
            self._target = ("join", self.crew_code, False)
            self._drop_other_crews()
        self.phase = "ready"
        self._unproductive = 0
        for t, d in self._take_waiters(target):
            d.callback(self.crew_code)
        if requested[2] and requested != target:
            # The application asked for another crew meanwhile.
            self._target = requested
            self._enter()
            return
        _log.info("device {device_id} in crew {crew_code}", device_id=c.device_id, crew_code=self.crew_code)
        joined = isinstance(reply, CrewJoined)
        self._emit("connected", {"type": "connected", "device_id": c.device_id, "crew_code": self.crew_code,
                                 "crew_members": reply.crew_members if joined else None,
                                 "member_names": reply.member_names if joined else []})
        self._flush()
        if self.state.multi:
            self._readd_crews()
        self._send_crew_call()
        self._send_pairing()
        self._send_spotify_call()

    def _take_waiters(self, target: tuple | None) -> list:
        taken = [(t, d) for t, d in self._entry_waiters if t == target]
        self._entry_waiters = [(t, d) for t, d in self._entry_waiters if t != target]
        return taken

    def _drop_other_crews(self) -> None:
        kept, dropped = [], []
        held = self.held_crews
        for entry in self.state.outbox:
            if entry.get("crew_code") is None and self.crew_code is not None or entry.get("crew_code") in held:
                entry["crew_code"] = entry.get("crew_code") or self.crew_code
                kept.append(entry)
            else:
                dropped.append(entry)
        if dropped or kept != self.state.outbox:
            self.state.outbox = kept
            self.state.save_outbox()
        for entry in dropped:
            d = self._waiting.pop(entry["client_msg_id"], None)
            if d is not None:
                d.errback(NotInCrew(f"the device left crew {entry.get('crew_code')} before this was sent"))

    def _entry_refused(self, error: ProtocolError) -> None:
        self._cancel_entry_timer()
        kind, code, explicit = self._entering or self._target
        if error.code == "invalid_crew_code":
            if explicit:
                for _, d in self._take_waiters(self._entering):
                    d.errback(error)
                self._target = self._default_target()
            else:
                # The relay lost the saved crew: create it again, as the
                # deployed devices do.
                _log.warn("the relay does not know crew {crew_code}; creating it again", crew_code=code)
                self.state.last_seq.pop(code, None)
                self.state.save_positions()
                self._target = ("create", code, False)
            self._enter()
        elif error.code == "invalid_last_seq":
            _log.warn("the relay does not know position {seq} in crew {crew_code}; entering afresh",
                      seq=self.state.last_seq.get(code), crew_code=code)
            self.state.last_seq.pop(code, None)
            self.state.save_positions()
            self._enter()
        elif error.code == "rate_limited":
            self._later(error.retry_after, self._enter)
        elif error.code == "device_auth_failed":
            self._give_up(error)
        else:
            _log.warn("the relay refused entry to crew {crew_code}: {error}",
                      crew_code=code, error=error.message)
            if self._proto is not None:
                self._proto.sendClose(1000)

    # -------------------------------------------------------------- Spotify

    def pair_spotify(self, scopes: str | None = None, keep_access: bool = False) -> Deferred:
        """
        Ask the relay for a Spotify pairing (C{scopes} space-separated;
        the relay's default without).  With C{keep_access}, the phone's
        page offers its owner the box that lets the relay keep the access
        (for L{share_now_playing}): ticked, the device gets no refresh
        token, and L{refresh_spotify} asks the relay to refresh the one it
        keeps.  Fires with the relay's answer as a
        dict: C{url} to show (as a QR code) and C{user_code} (C{XXXX-XXXX})
        to show beside it, and C{expires_in} seconds.  The tokens come later
        as ever (C{spotify_auth_complete}, saved to C{spotify_tokens.json});
        a pairing that ends without them is a C{spotify_pair_failed} event
        (C{reason}: C{denied}, C{expired}, C{cancelled}, C{refused}).

        Fails with L{PairingUnsupported} against a relay that predates
        pairing (use the legacy authorize URL), with the relay's error
        (C{not_registered}, C{spotify_not_configured}), or with
        L{DeviceStopped}.  Asking again cancels the pairing before.
        """
        if self.phase == "stopped" and self.stopped_by is not None:
            return fail(DeviceStopped(str(self.stopped_by), self.stopped_by))
        frame: dict = {"type": "spotify_pair"}
        if scopes is not None:
            frame["scopes"] = scopes
        if keep_access:
            frame["keep_access"] = True
        try:
            messages.decode(messages.encode(frame))
        except ProtocolError as e:
            return fail(e)
        d = Deferred()
        self._pairing.append(d)
        self._pair_request = frame
        self._pair_sent = False
        self._send_pairing()
        return d

    def _send_pairing(self) -> None:
        if self._pair_request is not None and not self._pair_sent and self.phase == "ready" \
                and self._proto is not None:
            self._pair_sent = True
            self._proto.send_frame(self._pair_request)

    def _paired(self, message: SpotifyPairStarted, frame: dict) -> None:
        self._pair_request = None
        waiting, self._pairing = self._pairing, []
        for d in waiting:
            d.callback(frame)
        self._emit("spotify_pair", frame)

    def _fail_pairing(self, error: Exception) -> None:
        self._pair_request = None
        waiting, self._pairing = self._pairing, []
        for d in waiting:
            d.errback(error)

    def refresh_spotify(self, refresh_token: str | None = None) -> Deferred:
        """
        New Spotify tokens from the relay (which holds the app's secret) for
        C{refresh_token}, by default the one in C{spotify_tokens.json}; when
        that holds none (the relay keeps it: a pairing with C{keep_access}
        and its owner's consent), with the one the relay keeps (answered
        without a refresh token; C{not_paired} when it keeps none).
        Fires with the tokens (C{access_token}, C{expires_in},
        C{refresh_token}), also saved to C{spotify_tokens.json}.

        Fails with the relay's error: C{spotify_refused} (C{spotify_error}
        C{invalid_grant}: pair again), C{spotify_unavailable} (try again),
        C{rate_limited} (C{retry_after}), C{not_registered},
        C{spotify_not_configured}; with L{SpotifyUnsupported} against an
        older relay, or L{DeviceStopped}.
        """
        if refresh_token is None:
            try:
                saved = self.state.load_tokens()
            except StateError as e:
                return fail(e)
            if not isinstance(saved, dict) or not saved.get("access_token"):
                return fail(DeviceError("no Spotify tokens: pair with Spotify first"))
            refresh_token = saved.get("refresh_token")
        frame: dict = {"type": "spotify_refresh"}
        if isinstance(refresh_token, str) and refresh_token:
            frame["refresh_token"] = refresh_token
        d = self._spotify_call(frame)
        d.addCallback(self._refreshed)
        return d

    def _refreshed(self, frame: dict) -> dict:
        tokens = frame["tokens"]
        path = self.state.save_tokens(tokens)
        _log.info("refreshed Spotify tokens saved to {path}", path=str(path))
        return tokens

    def search(self, query: str, limit: int = 5) -> Deferred:
        """
        Search Spotify's tracks through the relay, in natural words
        (C{"mr brightside by the killers"}, C{"songs by radiohead"}).
        Fires with the list of results (C{spotify_uri}, C{track},
        C{artist}, C{album}, C{album_art_url}), empty when nothing matches.
        Fails as L{refresh_spotify} does.
        """
        d = self._spotify_call({"type": "spotify_search", "query": query, "limit": limit})
        d.addCallback(lambda frame: frame["results"])
        return d

    def share_now_playing(self, note: str | None = None, crew_code: str | None = None) -> Deferred:
        """
        Have the relay share what this device's owner plays on Spotify
        with crew C{crew_code} (one of the device's crews) or the main one:
        an ordinary C{song_push} message, with C{note}.  Fires with the
        relay's C{sent} frame; fails with the relay's error:
        C{nothing_playing}, C{not_paired} (pair with C{keep_access} and the
        box ticked), C{not_in_crew}, or as L{refresh_spotify} does.
        """
        frame: dict = {"type": "share_now_playing"}
        if note is not None:
            frame["note"] = note
        if crew_code is not None:
            frame["crew_code"] = crew_code
        return self._spotify_call(frame)

    def forget_spotify(self) -> Deferred:
        """
        Have the relay delete the Spotify access it keeps for this device.
        Fires with the relay's C{spotify_forgotten} frame.
        """
        return self._spotify_call({"type": "spotify_forget"})

    def _spotify_call(self, frame: dict) -> Deferred:
        if self.phase == "stopped" and self.stopped_by is not None:
            return fail(DeviceStopped(str(self.stopped_by), self.stopped_by))
        try:
            messages.decode(messages.encode(frame))
        except ProtocolError as e:
            return fail(e)
        d = Deferred()
        self._spotify_calls.append((frame, d))
        self._send_spotify_call()
        return d

    def _send_spotify_call(self) -> None:
        if self._spotify_calls and not self._spotify_sent and self.phase == "ready" and self._proto is not None:
            self._spotify_sent = True
            self._proto.send_frame(self._spotify_calls[0][0])

    def _spotify_answered(self, frame: dict) -> None:
        if self._spotify_calls and self._spotify_sent \
                and _SPOTIFY_ANSWERS[self._spotify_calls[0][0]["type"]] == frame["type"]:
            _, d = self._spotify_calls.pop(0)
            self._spotify_sent = False
            d.callback(frame)
            self._send_spotify_call()
        self._emit(frame["type"], frame)

    def _spotify_refused(self, error: Exception) -> None:
        frame, d = self._spotify_calls.pop(0)
        self._spotify_sent = False
        if getattr(error, "code", None) == "unknown_type":
            error = SpotifyUnsupported(f"the relay does not know {frame['type']} (an older relay)")
        d.errback(error)
        self._send_spotify_call()

    def _fail_spotify_calls(self, error: Exception) -> None:
        calls, self._spotify_calls = self._spotify_calls, []
        self._spotify_sent = False
        for _, d in calls:
            d.errback(error)

    # ---------------------------------------------------------------- sends

    def send_message(self, msg_type: str, payload: dict | None = None, crew_code: str | None = None) -> Deferred:
        """
        Send a crew C{message}, to crew C{crew_code} (one of the device's
        crews) or its main crew.  Fires with the relay's C{sent} frame (its
        C{seq}) once the message is stored; fails with the relay's error
        (a L{ProtocolError} naming its code: L{messages.NotInCrew} for a
        crew the device is not in), L{OutboxFull} or L{DeviceStopped}.
        Offline, it waits in the outbox.
        """
        return self._send({"type": "message", "msg_type": msg_type,
                           "payload": payload if payload is not None else {}}, crew_code)

    def send_text(self, text: str, crew_code: str | None = None) -> Deferred:
        return self.send_message("text", {"text": text}, crew_code)

    def push_song(self, spotify_uri: str, artist: str = "", track: str = "", album: str = "",
                  album_art_url: str = "", note: str = "", crew_code: str | None = None) -> Deferred:
        return self.send_message("song_push", {
            "artist": artist, "track": track, "album": album, "spotify_uri": spotify_uri,
            "album_art_url": album_art_url, "note": note,
        }, crew_code)

    def react(self, reaction: str = "love", to_device: str | None = None, crew_code: str | None = None) -> Deferred:
        return self.send_message("reaction", {"reaction": reaction, "to_device": to_device}, crew_code)

    def nudge(self, crew_code: str | None = None) -> Deferred:
        return self.send_message("nudge", crew_code=crew_code)

    def propose_hang(self, datetime: str, description: str = "", crew_code: str | None = None) -> Deferred:
        return self.send_message("hang_propose", {"datetime": datetime, "description": description}, crew_code)

    def confirm_hang(self, crew_code: str | None = None) -> Deferred:
        return self.send_message("hang_confirm", crew_code=crew_code)

    def _send(self, message: dict, crew_code: str | None = None) -> Deferred:
        if self.phase == "stopped" and self.stopped_by is not None:
            return fail(DeviceStopped(str(self.stopped_by), self.stopped_by))
        kind, code, _ = self._target
        if crew_code is not None:
            try:
                crew_code = messages.normalize_crew_code(crew_code)
            except ProtocolError as e:
                return fail(e)
            if crew_code not in self.held_crews:
                return fail(NotInCrew(f"this device is not in crew {crew_code}"))
        elif kind == "register" and self.crew_code is None:
            return fail(NotInCrew("join or create a crew before sending crew messages"))
        client_msg_id = secrets.token_hex(8)
        frame = {**message, "client_msg_id": client_msg_id}
        crew = crew_code or (self.crew_code if self.phase == "ready" else code)
        if crew is not None and (crew_code is not None or self.state.multi):
            # Named, the message goes to that crew; a multi-crew device
            # names its main crew too (the relay's primary may differ).
            frame["crew_code"] = crew
        try:
            payload = messages.encode(frame)
            # The relay's own decoder: a message it would refuse fails here,
            # with the code the relay would answer.
            messages.decode(payload)
        except ProtocolError as e:
            return fail(e)
        except (TypeError, ValueError) as e:
            return fail(InvalidMessage(f"the message cannot be sent as JSON: {e}"))
        if len(payload) > self.max_message_size:
            return fail(InvalidMessage(
                f"the message is {len(payload)} bytes; the relay takes at most {self.max_message_size}"))
        if len(self.state.outbox) >= self.outbox_limit:
            return fail(OutboxFull(
                f"{len(self.state.outbox)} messages already wait for the relay (the limit is {self.outbox_limit})"))
        self.state.outbox.append({"client_msg_id": client_msg_id, "crew_code": crew, "message": frame})
        self.state.save_outbox()
        d = Deferred()
        self._waiting[client_msg_id] = d
        if self.phase == "ready" and self._timer is None:
            self._proto.send_frame(frame)
        return d

    def _flush(self) -> None:
        """
        Send every unconfirmed message of this device's crews (the relay
        answers a resend it already stored with C{sent}, without storing it
        again).
        """
        if self.phase != "ready" or self._proto is None:
            return
        held = self.held_crews
        for entry in self.state.outbox:
            if entry.get("crew_code") in held:
                self._proto.send_frame(entry["message"])

    def _confirmed(self, sent: Sent, frame: dict) -> None:
        client_msg_id = sent.client_msg_id
        before = len(self.state.outbox)
        self.state.outbox = [e for e in self.state.outbox if e["client_msg_id"] != client_msg_id]
        if len(self.state.outbox) != before:
            self.state.save_outbox()
        d = self._waiting.pop(client_msg_id, None)
        if d is not None:
            d.callback(frame)
        if d is not None or len(self.state.outbox) != before:
            # A resend the relay had stored already is confirmed again:
            # report each message once.
            self._emit("sent", frame)

    def _later(self, delay: float, call: Callable[[], None]) -> None:
        """
        Run C{call} after C{delay} on this connection; meanwhile nothing is
        sent but acks.
        """
        if self._timer is not None:
            return
        proto = self._proto

        def fire() -> None:
            self._timer = None
            if self._proto is proto and proto is not None:
                call()

        self._timer = self.reactor.callLater(delay, fire)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------ receiving

    def _opened(self, proto: DeviceProtocol) -> None:
        if self.phase == "stopped":
            proto.sendClose(1000)
            return
        self._proto = proto
        self._enter()

    def _received(self, proto: DeviceProtocol, payload: bytes) -> None:
        if proto is not self._proto:
            return
        # Observers get the frame as the relay sent it (a newer relay's
        # fields included); the device decides on the typed message.
        try:
            frame = messages.parse_json(payload)
            if not isinstance(frame, dict):
                raise InvalidMessage("a frame from the relay must be a JSON object")
            message = messages.relay_message_from(frame)
        except ProtocolError as e:
            _log.warn("the relay sent a frame the device cannot read ({error_code}: {why}); ignored",
                      error_code=e.code, why=e.message)
            return
        if isinstance(message, Registered) and self._binds:
            self._binds -= 1  # the answer to presenting a freshly issued key
        elif self.phase == "entering" and type(message) is self._expected and (
                not isinstance(message, CrewJoined) or self._entering is None
                or message.crew_code == self._entering[1]):
            self._entered(proto, message)
        elif isinstance(message, (CrewJoined, CrewLeft, CrewList)):
            self._crew_answered(message, frame)
        elif isinstance(message, (CrewCreated, Registered, Pong)):
            pass
        elif isinstance(message, FANOUTS):
            self._crew_frame(proto, message, frame)
        elif isinstance(message, Sent) and message.client_msg_id is None:
            # Only share_now_playing is answered sent without a client_msg_id.
            self._spotify_answered(frame)
        elif isinstance(message, Sent):
            self._confirmed(message, frame)
        elif isinstance(message, ErrorFrame):
            self._error(message, frame)
        elif isinstance(message, SpotifyAuthComplete):
            self._tokens(message, frame)
        elif isinstance(message, SpotifyPairStarted):
            self._paired(message, frame)
        elif isinstance(message, (SpotifyTokens, SpotifySearchResults, SpotifyForgotten)):
            self._spotify_answered(frame)
        else:
            # member_joined, member_offline, replay_truncated, and whatever
            # a newer relay adds (an UnknownRelayMessage).
            self._emit(message.type, frame)

    def _crew_frame(self, proto: DeviceProtocol, message: RelayMessage, frame: dict) -> None:
        seq = message.seq
        # Its crew, as the relay tags it (an older relay's: the main one).
        crew = message.crew_code or self.crew_code
        if seq is not None and crew is not None and seq <= self.state.last_seq.get(crew, 0):
            _log.debug("crew {crew_code} seq {seq} was handled already", crew_code=crew, seq=seq)
            return
        self._emit(message.type, frame)
        if seq is not None and crew is not None:
            self.state.last_seq[crew] = seq
            self.state.save_positions()
            ack: dict = {"type": "ack", "seq": seq}
            if message.crew_code is not None and (self.state.multi or crew != self.crew_code):
                ack["crew_code"] = crew
            proto.send_frame(ack)

    def _tokens(self, message: SpotifyAuthComplete, frame: dict) -> None:
        tokens = message.tokens
        if tokens.get("access_token"):
            path = self.state.save_tokens(tokens)
            _log.info("Spotify tokens saved to {path}", path=str(path))
        self._emit("spotify_auth_complete", frame)

    def _error(self, message: ErrorFrame, frame: dict) -> None:
        error = message.to_exception()
        self._emit("error", frame)
        if (self._pairing and self._pair_sent and error.code in _PAIRING_ERRORS
                and "client_msg_id" not in error.extra):
            if error.code == "unknown_type":
                error = PairingUnsupported(
                    "the relay does not know spotify_pair (an older relay): pair the legacy way, "
                    "with the authorize URL's state set to the device id")
            self._fail_pairing(error)
            return
        if (self._spotify_calls and self._spotify_sent
                and (error.code in _SPOTIFY_ERRORS
                     or error.code in _SPOTIFY_CALL_ERRORS.get(self._spotify_calls[0][0]["type"], ()))
                and "client_msg_id" not in error.extra):
            self._spotify_refused(error)
            return
        if (self._crew_calls and self._crew_sent and error.code in CREW_ERRORS and self.phase != "entering"
                and "client_msg_id" not in error.extra):
            self._crew_refused(error)
            return
        if self.phase == "entering":
            self._entry_refused(error)
        elif error.code == "rate_limited":
            self._later(error.retry_after, self._flush)
        elif error.code == "store_unavailable":
            self._later(self.resend_delay, self._flush)
        elif error.code == "not_in_crew":
            self._enter()
        elif error.code == "device_auth_failed":
            self._give_up(error)
        else:
            _log.warn("the relay answered {error_code}: {message}",
                      error_code=error.code, message=error.message)

    def _closed(self, proto: DeviceProtocol, code: int | None, reason: str | None) -> None:
        if self._proto is None:
            # Closed before the WebSocket opened (a refused handshake, TLS).
            self._unproductive += 1
            return
        if proto is not self._proto:
            return
        waiters, self._close_waiters = self._close_waiters, []
        for w in waiters:
            w.callback(None)
        was_ready = self.phase == "ready"
        self._proto = None
        self._entering = None
        self._binds = 0
        self.crew_code = None
        self._pair_sent = False
        self._spotify_sent = False
        self._crew_sent = False
        self._cancel_crew_timer()
        self._cancel_timer()
        self._cancel_entry_timer()
        if self.phase != "stopped":
            self.phase = "offline"
        if not was_ready:
            self._unproductive += 1
        self._emit("disconnected", {"type": "disconnected", "code": code, "reason": reason})
        if code == CloseCode.REPLACED:
            self._give_up(DeviceReplaced(
                f"the relay closed this connection (4001): another connection took device id "
                f"{self.device_id}; not reconnecting, or the two would replace each other forever. "
                f"Is a second copy running with the state in {self.state.directory}?"))
        elif code == CloseCode.ABUSE:
            self._next_delay = self.policy.after_abuse() if hasattr(self.policy, "after_abuse") else 60.0
            _log.warn("the relay closed the connection for repeated refusals (4029); "
                      "reconnecting in {delay:.0f}s", delay=self._next_delay)
        else:
            _log.info("device {device_id} disconnected ({close_code}); reconnecting",
                      device_id=self.device_id, close_code=code)
