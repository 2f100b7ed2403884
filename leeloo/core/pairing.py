"""
Spotify pairing: the relay as the device's pairing broker, in the way RFC
8628's device flow works, so that a consent link cannot deliver someone's
tokens to another device.

A flow is started by a registered device (L{Pairings.start}) and named by
its user code, 8 characters of the crew-code alphabet, shown as
C{XXXX-XXXX} on the device and carried in the URL C{PUBLIC/pair/CODE}.  The
phone that opens it sees the device's name and crew and the code
(L{Pairings.lookup}); its button (L{Pairings.consent}) spends the code: the
flow gets a fresh one-time C{state}, a cookie for that browser and a PKCE
verifier, and the phone goes on to Spotify's consent.  Spotify's redirect
(L{Pairings.complete}) is accepted only with a known, unexpired state and
the cookie of the browser that pressed the button; the code is exchanged
with the verifier and the tokens go to the device that asked (or wait for
it, as L{leeloo.core.tokens} keeps them).

A pairing C{state} starts with C{pair~}, which no device id can hold: a
spent, forged or expired one is refused, never taken for the legacy path
(C{state} = a device id, what deployed devices send), which L{legacy}
serves while the relay allows it.

Flows are kept in the store's L{IPairings} (they survive a restart); the
dicts here are its cache.  Nothing here does I/O but through the store and
the injected Spotify client; time is the clock's.  Log lines name the
device, never a user code, a state, a cookie, a verifier or a token (a
user code is a key to the flow while it lives).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from leeloo.messages import CREW_CODE_ALPHABET, SpotifyPairFailed, SpotifyPairStarted, StoreUnavailable
from leeloo.spotify import SpotifyError, code_challenge, code_verifier, origin
from leeloo.store import IPairings, PairingRecord, Snapshot

if TYPE_CHECKING:
    from leeloo.core.sessions import Session, Sessions
    from leeloo.spotify import SpotifyOAuth

_log = Logger()

PAIRING_TTL = 600.0
USER_CODE_LENGTH = 8
STATE_PREFIX = "pair~"
# The cookie that binds a flow to the browser that pressed its button.
COOKIE_NAME = "leeloo_pair"
CODE_TRIES = 16


@dataclass(frozen=True)
class PairingSettings:
    """
    How the relay pairs.

    @ivar public_url: the relay's public URL, where C{/pair/CODE} is
        reached; C{None}: the origin of the Spotify redirect URI.
    @ivar legacy_state: accept the deployed devices' C{state} = device id.
    @ivar pkce: use PKCE (S256) on top of the client secret.
    @ivar ttl: seconds a user code may wait for its button, and the phone
        then has for Spotify's consent.
    """

    public_url: str | None = None
    legacy_state: bool = True
    pkce: bool = True
    ttl: float = PAIRING_TTL

    def describe(self) -> str:
        return (f"pairings last {self.ttl:g}s, PKCE {'on' if self.pkce else 'off'}, legacy state=device id "
                f"{'accepted' if self.legacy_state else 'refused'}")


def generate_user_code(choice: Callable[[str], str] = secrets.choice) -> str:
    return "".join(choice(CREW_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def normalize_user_code(text: str | None) -> str | None:
    """
    The user code C{text} names (C{XXXX-XXXX} or C{XXXXXXXX}, any case), or
    C{None} when it cannot be one.
    """
    if not isinstance(text, str):
        return None
    code = text.strip().upper()
    if len(code) == USER_CODE_LENGTH + 1 and code[USER_CODE_LENGTH // 2] == "-":
        code = code.replace("-", "", 1)
    if len(code) != USER_CODE_LENGTH or any(c not in CREW_CODE_ALPHABET for c in code):
        return None
    return code


def display_code(code: str) -> str:
    """
    C{code} as people read it: C{XXXX-XXXX}.
    """
    half = USER_CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"


def is_pairing_state(state: str | None) -> bool:
    """
    Whether C{state} (from Spotify's redirect) is a pairing's, by its
    shape: then it is never a device id.
    """
    return state is not None and state.startswith(STATE_PREFIX)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class PairingProblem(Exception):
    """
    Why a phone's pairing request cannot go on; C{reason} says which, for
    the page the phone is shown:

    C{unknown}        no such code or state (never issued, spent, cancelled, or long expired)
    C{expired}        the flow's time ran out
    C{used}           the code's button was already pressed
    C{wrong_browser}  the callback came without the cookie of the browser that pressed it
    C{denied}         the person said no on Spotify's consent screen
    C{refused}        Spotify refused (C{description} says what, C{upstream} whether it was
                      Spotify or the relay's set-up rather than the phone's request)
    C{unavailable}    the relay could not store the flow
    C{not_configured} no Spotify app on this relay
    C{legacy_off}     a device id as C{state}, on a relay that no longer takes one
    """

    def __init__(self, reason: str, description: str = "", upstream: bool = False) -> None:
        super().__init__(reason, description)
        self.reason = reason
        self.description = description
        self.upstream = upstream


@dataclass(frozen=True, slots=True)
class PairingView:
    """
    What the phone's page shows: the code as the device shows it, the
    device's name and crew, and the seconds left.
    """

    user_code: str
    device_name: str
    crew_code: str | None
    expires_in: int
    # Whether the page offers the box "let the relay keep access".
    keep_offered: bool = False


@dataclass(frozen=True, slots=True)
class Consent:
    """
    The button's answer: the cookie value to set, and Spotify's authorize
    URL to send the phone to.
    """

    cookie: str = dataclasses.field(repr=False)
    location: str = dataclasses.field(repr=False)


@dataclass(frozen=True, slots=True)
class Paired:
    """
    A pairing (or a legacy callback) that got tokens for C{device_id};
    C{online} whether they were sent at once (else they wait).
    """

    device_id: str
    online: bool


class Pairings:
    """
    The relay's pairing flows.  Tokens go to a device through C{deliver}
    (device id, tokens, whether the relay keeps the access -> whether it
    was online: the relay's
    L{leeloo.relay.Relay.deliver_tokens}).

    C{flows}: user code -> record; C{by_state}: state hash -> user code;
    C{by_device}: device id -> user code of its one flow.
    """

    def __init__(self, clock: Any, sessions: Sessions, deliver: Callable[..., bool], store: IPairings,
                 spotify: SpotifyOAuth | None = None, settings: PairingSettings = PairingSettings(),
                 user_code: Callable[[], str] = generate_user_code,
                 secret: Callable[[], str] = lambda: secrets.token_urlsafe(32)) -> None:
        self.clock = clock
        self.sessions = sessions
        self.deliver = deliver
        self.store = store
        self.spotify = spotify
        self.settings = settings
        self._new_code = user_code
        self._secret = secret
        self.flows: dict[str, PairingRecord] = {}
        self.by_state: dict[str, str] = {}
        self.by_device: dict[str, str] = {}
        # Expired flows the store still holds (read back, not kept).
        self._stale_in_store = False

    def restore(self, snapshot: Snapshot) -> None:
        now = self.clock.seconds()
        for record in snapshot.pairings:
            if record.expires_at > now:
                self._keep(record)
            else:
                self._stale_in_store = True

    # ------------------------------------------------------------ settings

    @property
    def configured(self) -> bool:
        return self.spotify is not None

    @property
    def public_url(self) -> str | None:
        """
        Where phones reach the relay: C{--public-url}, or the origin of the
        Spotify redirect URI.
        """
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        if self.spotify is not None:
            return origin(self.spotify.config.redirect_uri)
        return None

    @property
    def legacy_state(self) -> bool:
        return self.settings.legacy_state

    # --------------------------------------------------------------- cache

    def _keep(self, record: PairingRecord) -> None:
        previous = self.flows.get(record.user_code)
        if previous is not None and previous.state_hash is not None:
            self.by_state.pop(previous.state_hash, None)
        self.flows[record.user_code] = record
        self.by_device[record.device_id] = record.user_code
        if record.state_hash is not None:
            self.by_state[record.state_hash] = record.user_code

    def _forget(self, record: PairingRecord) -> None:
        if self.flows.get(record.user_code) is not None:
            del self.flows[record.user_code]
        if record.state_hash is not None:
            self.by_state.pop(record.state_hash, None)
        if self.by_device.get(record.device_id) == record.user_code:
            del self.by_device[record.device_id]

    def _expired(self, record: PairingRecord) -> bool:
        return record.expires_at <= self.clock.seconds()

    def _end(self, record: PairingRecord, reason: str) -> Deferred:
        """
        End C{record} without tokens: forget it, and tell its device why if
        it is online.  Fires once the store has forgotten it.
        """
        self._forget(record)
        session = self.sessions.fanout.connection(record.device_id)
        if session is not None and not session.closing:
            session.send(SpotifyPairFailed(reason, display_code(record.user_code)))
        _log.info("Spotify pairing for {device_id} ended: {reason}", device_id=record.device_id, reason=reason)
        d = self.store.delete(record.user_code)
        d.addErrback(self._not_forgotten, record.device_id)
        return d

    def _not_forgotten(self, failure: Any, device_id: str) -> Any:
        # It expires in the store anyway: expire() sweeps it then.
        self._stale_in_store = True
        _log.warn("the store could not forget a Spotify pairing of {device_id}: {error}",
                  device_id=device_id, error=failure.getErrorMessage())
        return failure

    # --------------------------------------------------------- device side

    def start(self, session: Session, scopes: str, keep_offered: bool = False) -> None:
        """
        C{session}'s device (registered, on a relay with Spotify) asks for a
        pairing: a flow of its own replaces its previous one (cancelled),
        and is answered C{spotify_pair} once it is stored.  With
        C{keep_offered}, the phone's page offers the box that lets the relay
        keep the access.
        """
        device_id = session.device_id
        previous = self.by_device.get(device_id)
        if previous is not None:
            self._end(self.flows[previous], "cancelled").addErrback(lambda _: None)
        code = self._unused_code()
        now = self.clock.seconds()
        crew = session.crew
        record = PairingRecord(code, device_id, session.name or device_id, crew.code if crew else None, scopes,
                               now, now + self.settings.ttl, keep_offered=keep_offered)
        self._keep(record)
        _log.info("Spotify pairing started by {device_id} from {client_address}",
                  device_id=device_id, client_address=session.address)
        self.store.put(record).addCallbacks(
            self._started, self._not_started, callbackArgs=(session, record), errbackArgs=(session, record),
        ).addErrback(lambda f: _log.failure("bug while answering spotify_pair", f))

    def _unused_code(self) -> str:
        for _ in range(CODE_TRIES):
            code = self._new_code()
            if code not in self.flows:
                return code
        raise RuntimeError("no unused pairing code found")

    def _started(self, _: Any, session: Session, record: PairingRecord) -> None:
        if (session.closing or self.sessions.fanout.connection(record.device_id) is not session
                or self.flows.get(record.user_code) is not record):
            return
        session.send(SpotifyPairStarted(f"{self.public_url}/pair/{record.user_code}",
                                        display_code(record.user_code), int(self.settings.ttl)))

    def _not_started(self, failure: Any, session: Session, record: PairingRecord) -> None:
        _log.error("a Spotify pairing of {device_id} was not stored: {error}",
                   device_id=record.device_id, error=failure.getErrorMessage())
        if self.flows.get(record.user_code) is record:
            self._forget(record)
        if not session.closing and session in self.sessions.sessions:
            session.send(StoreUnavailable("the pairing could not be stored; try again").as_frame())

    # ---------------------------------------------------------- phone side

    def _waiting(self, text: str | None) -> PairingRecord:
        """
        The flow of user code C{text} whose button was not pressed yet.

        @raise PairingProblem: C{unknown}, C{expired} or C{used}.
        """
        if not self.configured:
            raise PairingProblem("not_configured")
        code = normalize_user_code(text)
        record = self.flows.get(code) if code is not None else None
        if record is None:
            raise PairingProblem("unknown")
        if self._expired(record):
            self._end(record, "expired").addErrback(lambda _: None)
            raise PairingProblem("expired")
        if record.state_hash is not None:
            raise PairingProblem("used")
        return record

    def lookup(self, text: str | None) -> PairingView:
        """
        What the page of user code C{text} shows.

        @raise PairingProblem: no such flow waiting for its button.
        """
        record = self._waiting(text)
        return PairingView(display_code(record.user_code), record.device_name, record.crew_code,
                           max(0, int(record.expires_at - self.clock.seconds())), record.keep_offered)

    def consent(self, text: str | None, keep: bool = False) -> Deferred:
        """
        The button of user code C{text} was pressed (C{keep}: with the box
        that lets the relay keep the access ticked, on a page that offered
        it): spend the code, and
        fire with the L{Consent} (the cookie for this browser and where to
        send it) once the flow is stored; fail with L{PairingProblem}.
        """
        try:
            record = self._waiting(text)
        except PairingProblem as e:
            return fail(e)
        state = STATE_PREFIX + self._secret()
        cookie = self._secret()
        verifier = code_verifier() if self.settings.pkce else None
        spent = dataclasses.replace(record, state_hash=_hash(state), cookie_hash=_hash(cookie),
                                    verifier=verifier, expires_at=self.clock.seconds() + self.settings.ttl,
                                    keep=keep and record.keep_offered)
        self._keep(spent)
        location = self.spotify.config.authorize_url(
            state, record.scopes, code_challenge(verifier) if verifier is not None else None)

        def stored(_: Any) -> Consent:
            _log.info("Spotify pairing for {device_id}: the phone went to Spotify", device_id=record.device_id)
            return Consent(cookie, location)

        def not_stored(failure: Any) -> None:
            _log.error("a Spotify pairing of {device_id} was not stored: {error}",
                       device_id=record.device_id, error=failure.getErrorMessage())
            if self.flows.get(record.user_code) is spent:
                self._keep(record)
            raise PairingProblem("unavailable")

        return self.store.put(spent).addCallbacks(stored, not_stored)

    def complete(self, state: str, cookie: str | None, code: str | None, error: str | None) -> Deferred:
        """
        Spotify sent the phone back with C{state} and C{code} (or C{error});
        C{cookie} is the browser's L{COOKIE_NAME}.  Fires with L{Paired}
        once the tokens went to the device (or wait for it); fails with
        L{PairingProblem}.  A state is accepted once: it is forgotten, for
        good, before its code is exchanged.
        """
        if not self.configured:
            return fail(PairingProblem("not_configured"))
        user_code = self.by_state.get(_hash(state))
        record = self.flows.get(user_code) if user_code is not None else None
        if record is None:
            return fail(PairingProblem("unknown"))
        if self._expired(record):
            self._end(record, "expired").addErrback(lambda _: None)
            return fail(PairingProblem("expired"))
        if cookie is None or not hmac.compare_digest(_hash(cookie), record.cookie_hash or ""):
            _log.warn("Spotify pairing for {device_id}: a callback without its browser's cookie",
                      device_id=record.device_id)
            return fail(PairingProblem("wrong_browser"))
        if error is not None:
            reason = "denied" if error == "access_denied" else "refused"
            self._end(record, reason).addErrback(lambda _: None)
            return fail(PairingProblem(reason, error.replace("_", " ")[:100], upstream=True))
        if code is None:
            return fail(PairingProblem("refused", "the code from Spotify is missing"))
        self._forget(record)

        def forgotten(_: Any) -> Deferred:
            return self.spotify.exchange_code(code, record.verifier)

        def not_forgotten(failure: Any) -> None:
            # Not spent for good: it could be accepted again after a restart.
            self._keep(record)
            _log.error("a Spotify pairing of {device_id} could not be spent: {error}",
                       device_id=record.device_id, error=failure.getErrorMessage())
            raise PairingProblem("unavailable")

        def exchanged(tokens: dict) -> Paired:
            online = self.deliver(record.device_id, tokens, record.keep)
            _log.info("Spotify pairing: tokens for {device_id} {how}{kept}", device_id=record.device_id,
                      how="delivered" if online else "kept until it comes back",
                      kept=" (the relay keeps the refresh token)" if record.keep else "")
            return Paired(record.device_id, online)

        def refused(failure: Any) -> None:
            if failure.check(PairingProblem):
                return failure
            e = failure.check(SpotifyError) and failure.value
            session = self.sessions.fanout.connection(record.device_id)
            if session is not None and not session.closing:
                session.send(SpotifyPairFailed("refused", display_code(record.user_code)))
            if not e:
                _log.failure("Spotify exchange failed", failure)
                raise PairingProblem("refused", "something went wrong", upstream=True)
            _log.warn("Spotify refused the code exchange of a pairing for {device_id}: {error}",
                      device_id=record.device_id, error=e.error)
            raise PairingProblem("refused", e.description, upstream=e.error != "invalid_grant")

        d = self.store.delete(record.user_code).addCallbacks(forgotten, not_forgotten)
        return d.addCallbacks(exchanged, refused)

    def legacy(self, device_id: str, code: str) -> Deferred:
        """
        The deployed devices' callback, C{state} = C{device_id}: exchange
        C{code} and hand the tokens to that device.  Fires with L{Paired};
        fails with L{PairingProblem} (C{legacy_off}, C{not_configured}) or
        L{SpotifyError}.
        """
        if not self.configured:
            return fail(PairingProblem("not_configured"))
        if not self.settings.legacy_state:
            _log.warn("refused a legacy Spotify callback for {device_id}: --no-legacy-spotify-state",
                      device_id=device_id)
            return fail(PairingProblem("legacy_off"))

        def exchanged(tokens: dict) -> Paired:
            online = self.deliver(device_id, tokens)
            _log.info("Spotify tokens for {device_id} {how}", device_id=device_id,
                      how="delivered" if online else "kept until it comes back")
            return Paired(device_id, online)

        return self.spotify.exchange_code(code).addCallback(exchanged)

    # --------------------------------------------------------------- time

    def expire(self) -> int:
        """
        End every flow past its time (its device is told C{expired}), and
        sweep expired ones from the store; return how many ended here.
        """
        stale = [r for r in self.flows.values() if self._expired(r)]
        for record in stale:
            self._forget(record)
            session = self.sessions.fanout.connection(record.device_id)
            if session is not None and not session.closing:
                session.send(SpotifyPairFailed("expired", display_code(record.user_code)))
        if stale or self._stale_in_store:
            self._stale_in_store = False
            self.store.delete_expired(self.clock.seconds()).addErrback(self._not_swept)
        return len(stale)

    def _not_swept(self, failure: Any) -> None:
        self._stale_in_store = True
        _log.warn("the store could not forget expired Spotify pairings: {error}", error=failure.getErrorMessage())
