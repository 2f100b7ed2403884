"""
Spotify through the relay: a device's token refresh and track search, with
the app's client secret and app token held here, never on the device.

L{SpotifyBroker} answers C{spotify_refresh} (L{SpotifyTokens}) and
C{spotify_search} (L{SpotifySearchResults}); Spotify's refusal is
C{spotify_refused} with its error code, Spotify unreachable, failing or
slower than the client's timeout C{spotify_unavailable} (C{retry: true}).
Each device may ask in bursts (L{DEVICE_RATE}); beyond, C{rate_limited}.  A
429 from Spotify is shared: until its C{Retry-After} has passed, no device's
request goes to Spotify, and each is answered C{rate_limited} with the time
left (the relay has one app for all devices).

With the owner's consent the relay keeps the device's Spotify access
(L{leeloo.core.grants}): C{spotify_refresh} without a token refreshes the
refresh token the relay holds (a rotated one replaces it), answered without
it; C{spotify_forget} deletes it; C{share_now_playing} asks Spotify's
currently-playing (refreshing an expired access token on the way) and hands
the track to the crew through the caller's C{publish}.

L{search_query} turns natural words into Spotify's search syntax.  Log
lines name the device, never a token, a secret or the query's words.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from leeloo.limits import Limiter, Rate
from leeloo.messages import (
    NothingPlaying,
    NotPaired,
    ProtocolError,
    RateLimited,
    ShareNowPlaying,
    SpotifyForgotten,
    SpotifyRefresh,
    SpotifyRefused,
    SpotifySearch,
    SpotifySearchResults,
    SpotifyTokens,
    SpotifyUnavailable,
    StoreUnavailable,
)
from leeloo.sealing import SealError
from leeloo.store import StoreError
from leeloo.spotify import SpotifyError, SpotifyRateLimited, is_unavailable

if TYPE_CHECKING:
    from leeloo.core.grants import Grants
    from leeloo.core.sessions import Session
    from leeloo.spotify import SpotifyOAuth

_log = Logger()

# A device's Spotify requests: bursts of 6, then one every 10 seconds.
DEVICE_RATE = Rate.per_window(6, 60)
# An app token is renewed this many seconds before Spotify says it expires.
APP_TOKEN_MARGIN = 60.0
# A kept access token is refreshed when it has less than this many seconds left.
ACCESS_TOKEN_MARGIN = 60.0

# ------------------------------------------------------------------ query

_TOKEN = re.compile(r'"([^"]*)"|([^\s"]+)')
_LEADING_FILLER = (("please",), ("play",), ("the", "song"), ("the", "track"), ("a", "song"), ("song",),
                   ("track",))
_TRAILING_FILLER = (("please",),)
_ANY_TRACK = frozenset({"something", "anything", "songs", "tracks", "music", "stuff", "some songs",
                        "a song", "some music", "some tracks"})
_SONGS = frozenset({"songs", "tracks", "music"})


def _words(text: str) -> list[str]:
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    out = []
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            phrase = " ".join(m.group(1).split())
            if phrase:
                out.append(f'"{phrase}"')
        else:
            out.append(m.group(2))
    return out


def _plain(word: str) -> str | None:
    """
    C{word} lower-cased, or C{None} for a quoted phrase (never filler, never
    C{by}).
    """
    return None if word.startswith('"') else word.lower()


def _strip(words: list[str], fillers: tuple, leading: bool) -> list[str]:
    changed = True
    while changed and words:
        changed = False
        for filler in fillers:
            n = len(filler)
            part = words[:n] if leading else words[-n:]
            if len(part) == n and tuple(_plain(w) for w in part) == filler and len(words) > n:
                words = words[n:] if leading else words[:-n]
                changed = True
                break
    return words


def search_query(text: str) -> str:
    """
    Spotify's search C{q} for C{text}, a person's words:

      - C{"X by Y"} is C{track:X artist:Y} (split at the last C{by});
      - C{"something by Y"}, C{"songs by Y"}, C{"Y songs"} are C{artist:Y};
      - a quoted phrase is kept whole (quotes and all; a C{by} inside is no
        split);
      - filler is dropped: C{play}, C{the song}, C{please} leading,
        C{please} trailing;
      - anything else is the words as typed.
    """
    words = _strip(_strip(_words(text), _LEADING_FILLER, True), _TRAILING_FILLER, False)
    if not words:
        return " ".join(text.split())
    plain = [_plain(w) for w in words]
    if len(words) >= 2 and plain[-1] in _SONGS:
        return "artist:" + " ".join(words[:-1])
    by = [i for i, w in enumerate(plain) if w == "by" and 0 < i < len(words) - 1]
    if by:
        i = by[-1]
        track, artist = words[:i], " ".join(words[i + 1:])
        if " ".join(w or "" for w in plain[:i]) in _ANY_TRACK:
            return "artist:" + artist
        return "track:" + " ".join(track) + " artist:" + artist
    return " ".join(words)


# ----------------------------------------------------------------- broker


class SpotifyBroker:
    """
    @param clock: the relay's clock.
    @param spotify: a callable giving the relay's L{SpotifyOAuth} (or
        C{None} when it has none).
    @param sessions: the relay's open connections (a set of sessions):
        an answer for one that has gone is dropped.
    """

    def __init__(self, clock: Any, spotify: Callable[[], SpotifyOAuth | None], sessions: Any = None,
                 rate: Rate = DEVICE_RATE, grants: Grants | None = None) -> None:
        self.clock = clock
        self.grants = grants
        self._sessions = sessions
        self._spotify = spotify
        self.limiter = Limiter(clock, rate)
        # Refilled buckets are swept once there are more than this many.
        self.sweep_at = 1024
        # Spotify said 429: nothing goes to it before this time.
        self.blocked_until = 0.0
        self._app_token: str | None = None
        self._app_expires = 0.0
        self._app_waiting: list[Deferred] | None = None

    def _send(self, session: Session, message: Any) -> None:
        # An answer for a connection that has closed meanwhile goes nowhere.
        if not session.closing and (self._sessions is None or session in self._sessions):
            session.send(message)

    # ------------------------------------------------------------ checks

    def _admit(self, session: Session) -> bool:
        """
        Whether C{session}'s request may go to Spotify.  While Spotify asks
        the relay to wait, it is answered C{rate_limited} here (no strike
        against the device: the wait is not of its making).

        @raise RateLimited: the device asked too often (a strike).
        """
        if len(self.limiter.buckets) >= self.sweep_at:
            self.limiter.sweep()
            self.sweep_at = max(1024, 2 * len(self.limiter.buckets))
        wait = self.limiter.take(session.device_id)
        if wait > 0:
            raise RateLimited("too many Spotify requests from this device", wait)
        try:
            self._check_blocked()
        except RateLimited as e:
            session.send(e.as_frame())
            return False
        return True

    def _check_blocked(self) -> None:
        left = self.blocked_until - self.clock.seconds()
        if left > 0:
            raise RateLimited("Spotify asks the relay to slow down", left)

    def _answer_failure(self, failure: Any, session: Session, what: str) -> None:
        e = failure.value
        if isinstance(e, RateLimited):
            error: Any = e
        elif isinstance(e, SpotifyRateLimited):
            self.blocked_until = max(self.blocked_until, self.clock.seconds() + e.retry_after)
            _log.warn("Spotify answered 429 to a {what} for {device_id}: waiting {seconds}s",
                      what=what, device_id=session.device_id, seconds=math.ceil(e.retry_after))
            error = RateLimited("Spotify asks the relay to slow down", e.retry_after)
        elif isinstance(e, SpotifyError) and is_unavailable(e):
            _log.warn("Spotify was unavailable for a {what} for {device_id}: {error}",
                      what=what, device_id=session.device_id, error=e.error)
            error = SpotifyUnavailable(f"Spotify is unavailable ({e.description}); try again")
        elif isinstance(e, ProtocolError):
            error = e
        elif isinstance(e, StoreError):
            _log.error("the store failed during a Spotify {what} for {device_id}: {error}",
                       what=what, device_id=session.device_id, error=str(e))
            error = StoreUnavailable("the relay could not store the Spotify access; try again")
        elif isinstance(e, SealError):
            _log.error("the Spotify access kept for {device_id} does not open with the secrets key",
                       device_id=session.device_id)
            error = NotPaired("the relay cannot read the Spotify access it kept; pair again")
        elif isinstance(e, SpotifyError):
            _log.info("Spotify refused a {what} for {device_id}: {error}",
                      what=what, device_id=session.device_id, error=e.error)
            hint = "; pair again" if e.error == "invalid_grant" else ""
            error = SpotifyRefused(f"Spotify refused: {e.description}{hint}", spotify_error=e.error)
        else:
            _log.failure("bug while answering a Spotify {what}", failure, what=what)
            error = SpotifyUnavailable("the relay could not ask Spotify; try again")
        self._send(session, error.as_frame())

    # ----------------------------------------------------------- refresh

    def refresh(self, session: Session, message: SpotifyRefresh) -> None:
        if not self._admit(session):
            return
        if message.refresh_token is None:
            self._refresh_kept(session)
            return
        spotify = self._spotify()
        d = spotify.refresh(message.refresh_token)
        d.addCallback(lambda tokens: self._refreshed(session, tokens))
        d.addErrback(self._answer_failure, session, "token refresh")

    def _refreshed(self, session: Session, tokens: dict) -> None:
        _log.info("Spotify tokens refreshed for {device_id}", device_id=session.device_id)
        self._send(session, SpotifyTokens({"access_token": tokens["access_token"], "expires_in": tokens["expires_in"],
                                    "refresh_token": tokens["refresh_token"]}))

    # ------------------------------------------------- the access kept

    def _refresh_kept(self, session: Session) -> None:
        device_id = session.device_id

        def operation() -> Deferred:
            return self._grant(device_id).addCallback(lambda grant: self._renew(device_id, grant))

        def renewed(grant: dict) -> None:
            _log.info("kept Spotify tokens refreshed for {device_id}", device_id=device_id)
            self._send(session, SpotifyTokens(self._device_tokens(grant)))

        d = self.grants.serially(device_id, operation)
        d.addCallback(renewed)
        d.addErrback(self._answer_failure, session, "token refresh")

    def _device_tokens(self, grant: dict) -> dict:
        return {"access_token": grant["access_token"],
                "expires_in": max(0, round(grant["expires_at"] - self.clock.seconds()))}

    def _grant(self, device_id: str) -> Deferred:
        """
        Fire with C{device_id}'s kept grant; fail with L{NotPaired} when
        there is none.
        """
        def found(grant: dict | None) -> dict:
            if grant is None:
                raise NotPaired("the relay keeps no Spotify access for this LEELOO: pair with Spotify, "
                                "ticking the box that lets the relay keep access")
            return grant

        return self.grants.find(device_id).addCallback(found)

    def _renew(self, device_id: str, grant: dict) -> Deferred:
        """
        Refresh C{grant}; fire with the new one once it is stored (Spotify's
        rotated refresh token replacing the one spent).  A refresh token
        Spotify no longer takes (C{invalid_grant}) is forgotten.
        """
        d = self._spotify().refresh(grant["refresh_token"])

        def refreshed(tokens: dict) -> Deferred:
            kept = self.grants.keep(device_id, tokens)
            grant = self.grants.held[device_id]
            return kept.addCallback(lambda _: grant)

        def refused(failure: Any) -> Any:
            if failure.check(SpotifyError) and failure.value.error == "invalid_grant":
                _log.info("Spotify no longer takes the refresh token kept for {device_id}: forgotten",
                          device_id=device_id)
                self.grants.forget(device_id)
            return failure

        return d.addCallbacks(refreshed, refused)

    def forget(self, session: Session) -> None:
        """
        Delete what the relay keeps of C{session}'s device's Spotify access;
        answered C{spotify_forgotten} once that is durable.
        """
        device_id = session.device_id

        def forgotten(_: Any) -> None:
            _log.info("Spotify access kept for {device_id} forgotten at its request", device_id=device_id)
            self._send(session, SpotifyForgotten())

        d = self.grants.serially(device_id, lambda: self.grants.forget(device_id))
        d.addCallback(forgotten)
        d.addErrback(self._answer_failure, session, "forget")

    def share_now_playing(self, session: Session, message: ShareNowPlaying,
                          publish: Callable[[dict], Deferred | None]) -> None:
        """
        Ask Spotify what C{session}'s device's owner is playing, and hand
        the track (L{leeloo.spotify.track_result}) to C{publish}.  Nothing
        playing is C{nothing_playing}; no access kept, C{not_paired}.
        """
        if not self._admit(session):
            return
        device_id = session.device_id

        def operation() -> Deferred:
            return self._grant(device_id).addCallback(lambda grant: self._playing(device_id, grant, False))

        def got(track: dict | None) -> Deferred | None:
            if track is None:
                raise NothingPlaying("Spotify is playing no song right now (nothing, an ad or a podcast)")
            _log.info("now playing on Spotify shared by {device_id}", device_id=device_id)
            return publish(track)

        d = self.grants.serially(device_id, operation)
        d.addCallback(got)
        d.addErrback(self._answer_failure, session, "now playing")

    def _playing(self, device_id: str, grant: dict, renewed: bool) -> Deferred:
        if not renewed and grant["expires_at"] - ACCESS_TOKEN_MARGIN <= self.clock.seconds():
            return self._renew(device_id, grant).addCallback(lambda g: self._playing(device_id, g, True))
        d = self._spotify().currently_playing(grant["access_token"])

        def expired(failure: Any) -> Any:
            failure.trap(SpotifyError)
            if not renewed and failure.value.error == "invalid_token":
                self._check_blocked()
                return self._renew(device_id, grant).addCallback(lambda g: self._playing(device_id, g, True))
            return failure

        return d.addErrback(expired)

    # ------------------------------------------------------------ search

    def search(self, session: Session, message: SpotifySearch) -> None:
        if not self._admit(session):
            return
        q = search_query(message.query)
        d = self._searched(q, message.limit, retry=True)
        d.addCallback(lambda results: self._send(session, SpotifySearchResults(message.query, results)))
        d.addErrback(self._answer_failure, session, "search")

    def _searched(self, q: str, limit: int, retry: bool) -> Deferred:
        d = self.app_token()
        d.addCallback(lambda token: self._spotify().search(q, limit, token))

        def expired(failure: Any) -> Any:
            failure.trap(SpotifyError)
            if retry and failure.value.error == "invalid_token":
                self._app_token = None
                self._check_blocked()
                return self._searched(q, limit, retry=False)
            return failure

        return d.addErrback(expired)

    def app_token(self) -> Deferred:
        """
        The app token of the client-credentials grant, cached until shortly
        before it expires; one request to Spotify however many ask at once.
        """
        if self._app_token is not None and self.clock.seconds() < self._app_expires:
            return succeed(self._app_token)
        d: Deferred = Deferred()
        if self._app_waiting is not None:
            self._app_waiting.append(d)
            return d
        self._app_waiting = [d]
        started = self.clock.seconds()

        def got(answer: dict) -> None:
            self._app_token = answer["access_token"]
            self._app_expires = started + max(0.0, answer["expires_in"] - APP_TOKEN_MARGIN)
            waiting, self._app_waiting = self._app_waiting or [], None
            for w in waiting:
                w.callback(self._app_token)

        def failed(failure: Any) -> None:
            waiting, self._app_waiting = self._app_waiting or [], None
            for w in waiting:
                w.errback(failure)

        self._spotify().client_token().addCallbacks(got, failed)
        return d
