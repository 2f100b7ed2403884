"""
Spotify's OAuth: the authorize URL the relay sends phones to, and the token
endpoint, called through an injected treq client.

The relay holds the app's client secret; devices never see it.  Pairings
use PKCE (RFC 7636, S256) on top of the client secret, as RFC 9700
recommends for confidential clients too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet.defer import Deferred, inlineCallbacks

DEFAULT_ACCOUNTS_URL = "https://accounts.spotify.com"
DEFAULT_API_URL = "https://api.spotify.com"
TOKEN_FIELDS = ("access_token", "refresh_token", "expires_in")


@dataclass(frozen=True)
class SpotifyConfig:
    client_id: str
    client_secret: str = field(repr=False)
    redirect_uri: str
    accounts_url: str = DEFAULT_ACCOUNTS_URL
    api_url: str = DEFAULT_API_URL

    @property
    def token_url(self) -> str:
        return self.accounts_url.rstrip("/") + "/api/token"

    @property
    def authorize_endpoint(self) -> str:
        return self.accounts_url.rstrip("/") + "/authorize"

    @property
    def accounts_origin(self) -> str:
        """
        The scheme, host and port of the accounts service (what the pairing
        pages' C{form-action} allows).
        """
        return origin(self.accounts_url)

    def authorize_url(self, state: str, scopes: str, code_challenge: str | None = None) -> str:
        """
        Where a phone goes to give its consent: Spotify's authorize
        endpoint for this app, with C{state} and, with PKCE, the S256
        C{code_challenge}.
        """
        query = {
            "client_id": self.client_id,
            "response_type": "code",
            "redirect_uri": self.redirect_uri,
            "scope": scopes,
            "state": state,
            "show_dialog": "true",
        }
        if code_challenge is not None:
            query["code_challenge_method"] = "S256"
            query["code_challenge"] = code_challenge
        return self.authorize_endpoint + "?" + urlencode(query, quote_via=quote)


def origin(url: str) -> str:
    """
    The origin of C{url}: C{scheme://host[:port]}, lower case.
    """
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def code_verifier() -> str:
    """
    A fresh PKCE code verifier: 86 characters of C{[A-Za-z0-9_-]} (RFC 7636
    allows 43 to 128).
    """
    return secrets.token_urlsafe(64)


def code_challenge(verifier: str) -> str:
    """
    The S256 challenge of C{verifier}: unpadded base64url of its SHA-256.
    """
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class SpotifyError(Exception):
    """
    Spotify refused or failed an exchange.  C{error} is Spotify's error code
    (or ours when it gave none), C{description} words fit for a person.
    Neither ever holds a token or the code.  C{status}: Spotify's HTTP
    status when it answered one worth telling (5xx, a search's 4xx), else 0.
    """

    status = 0

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error, description)
        self.error = error
        self.description = description


# Error codes of ours that mean Spotify could not be asked, or failed: worth
# trying again, unlike a refusal.
UNAVAILABLE_ERRORS = frozenset({"unreachable", "server_error", "invalid_response"})
# The longest Retry-After the relay honours (seconds).
MAX_RETRY_AFTER = 3600


class SpotifyRateLimited(SpotifyError):
    """
    Spotify answered 429; C{retry_after} is its C{Retry-After}, in seconds.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__("rate_limited", "Spotify asks the relay to slow down")
        self.retry_after = retry_after


def retry_after_of(response: Any) -> float:
    """
    The seconds of a response's C{Retry-After} (delta-seconds), 1 when it
    has none or one that cannot be read, at most L{MAX_RETRY_AFTER}.
    """
    values = response.headers.getRawHeaders(b"retry-after") or []
    try:
        seconds = float(values[0])
    except (IndexError, ValueError, TypeError):
        return 1.0
    if not seconds >= 0:
        return 1.0
    return min(max(seconds, 1.0), MAX_RETRY_AFTER)


def is_unavailable(error: SpotifyError) -> bool:
    """
    Whether C{error} says Spotify could not answer (try again), rather
    than that it refused.
    """
    return error.error in UNAVAILABLE_ERRORS or getattr(error, "status", 0) >= 500


def track_result(item: Any) -> dict | None:
    """
    One C{/v1/search} track item as the relay answers it:
    C{spotify_uri}, C{track}, C{artist} (the artists' names joined with
    C{", "}), C{album}, C{album_art_url} (the largest image, or C{None}).
    C{None} for an item without a URI or a name.
    """
    if not isinstance(item, dict) or not isinstance(item.get("uri"), str) or not isinstance(item.get("name"), str):
        return None
    artists = item.get("artists")
    names = [a["name"] for a in artists if isinstance(a, dict) and isinstance(a.get("name"), str)] \
        if isinstance(artists, list) else []
    album = item.get("album") if isinstance(item.get("album"), dict) else {}
    images = album.get("images") if isinstance(album.get("images"), list) else []
    art = None
    for image in images:
        if isinstance(image, dict) and isinstance(image.get("url"), str):
            art = image["url"]
            break
    return {
        "spotify_uri": item["uri"],
        "track": item["name"],
        "artist": ", ".join(names),
        "album": album.get("name") if isinstance(album.get("name"), str) else None,
        "album_art_url": art,
    }


class SpotifyOAuth:
    """
    @param http: a treq-like client (L{treq.client.HTTPClient}, or
        L{treq.testing.StubTreq} in tests).
    @param clock: the reactor that times requests out.
    """

    def __init__(self, config: SpotifyConfig, http: Any, clock: Any, timeout: float = 15.0) -> None:
        self.config = config
        self._http = http
        self._clock = clock
        self._timeout = timeout

    def exchange_code(self, code: str, verifier: str | None = None) -> Deferred:
        """
        Exchange an authorization code for tokens, proving with C{verifier}
        (the PKCE code verifier) when the authorize URL carried its
        challenge.

        @return: a L{Deferred} firing with C{{"access_token", "refresh_token",
            "expires_in"}}, or failing with L{SpotifyError}.
        """
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.config.redirect_uri,
        }
        if verifier is not None:
            form["code_verifier"] = verifier
        return self._token_request(form)

    @inlineCallbacks
    def refresh(self, refresh_token: str) -> Deferred:
        """
        Refresh a user's tokens.

        @return: a L{Deferred} firing with C{{"access_token", "refresh_token",
            "expires_in"}} (C{refresh_token} the one given when Spotify sends
            no new one), or failing with L{SpotifyError}
            (L{SpotifyRateLimited} on a 429).
        """
        tokens = yield self._token_request({"grant_type": "refresh_token", "refresh_token": refresh_token})
        if not isinstance(tokens.get("refresh_token"), str) or not tokens["refresh_token"]:
            tokens["refresh_token"] = refresh_token
        return tokens

    def client_token(self) -> Deferred:
        """
        An app token (the client-credentials grant).

        @return: a L{Deferred} firing with C{{"access_token", "expires_in",
            ...}}, or failing with L{SpotifyError}.
        """
        return self._token_request({"grant_type": "client_credentials"})

    @inlineCallbacks
    def search(self, q: str, limit: int, app_token: str) -> Deferred:
        """
        Search tracks with Spotify's query C{q}.

        @return: a L{Deferred} firing with a list of L{track_result}s, or
            failing with L{SpotifyError} (C{"invalid_token"} with status 401
            when the app token is no longer good, L{SpotifyRateLimited}).
        """
        url = self.config.api_url.rstrip("/") + "/v1/search"
        response, body = yield self._fetch(
            self._http.get, url,
            params={"q": q, "type": "track", "limit": str(limit)},
            headers={"Authorization": "Bearer " + app_token, "Accept": "application/json"},
        )
        if response.code == 429:
            raise SpotifyRateLimited(retry_after_of(response))
        if response.code != 200:
            error = SpotifyError("invalid_token" if response.code == 401 else
                                 "server_error" if response.code >= 500 else "bad_request",
                                 f"Spotify's search answered HTTP {response.code}")
            error.status = response.code
            raise error
        try:
            answer = json.loads(body)
            items = answer["tracks"]["items"]
            if not isinstance(items, list):
                raise TypeError(items)
        except (ValueError, KeyError, TypeError):
            raise SpotifyError("invalid_response", "Spotify's search answer could not be read") from None
        return [r for r in (track_result(item) for item in items) if r is not None]

    @inlineCallbacks
    def currently_playing(self, access_token: str) -> Deferred:
        """
        What the user of C{access_token} is playing: Spotify's
        C{/v1/me/player/currently-playing}.

        @return: a L{Deferred} firing with a L{track_result}, or C{None}
            when nothing plays (Spotify's 204, or an C{item} of null: an ad,
            a podcast episode); or failing with L{SpotifyError}
            (C{"invalid_token"} with status 401 when the access token is no
            longer good, L{SpotifyRateLimited}).
        """
        url = self.config.api_url.rstrip("/") + "/v1/me/player/currently-playing"
        response, body = yield self._fetch(
            self._http.get, url,
            headers={"Authorization": "Bearer " + access_token, "Accept": "application/json"},
        )
        if response.code == 204:
            return None
        if response.code == 429:
            raise SpotifyRateLimited(retry_after_of(response))
        if response.code != 200:
            error = SpotifyError("invalid_token" if response.code == 401 else
                                 "server_error" if response.code >= 500 else
                                 "insufficient_scope" if response.code == 403 else "bad_request",
                                 f"Spotify's player answered HTTP {response.code}")
            error.status = response.code
            raise error
        try:
            answer = json.loads(body) if body.strip() else {}
            if not isinstance(answer, dict):
                raise TypeError(answer)
        except (ValueError, TypeError):
            raise SpotifyError("invalid_response", "Spotify's player answer could not be read") from None
        item = answer.get("item")
        if item is None or answer.get("currently_playing_type", "track") != "track":
            return None
        return track_result(item)

    @inlineCallbacks
    def _fetch(self, method: Any, url: str, **kwargs: Any) -> Deferred:
        """
        C{method} (treq's get or post) of C{url}: fires with the response and
        its body, or fails with L{SpotifyError} C{"unreachable"} (naming the
        kind of failure only: an error's text may hold the request).
        """
        try:
            response = yield method(url, reactor=self._clock, timeout=self._timeout, **kwargs)
            body = yield response.content()
        except Exception as e:
            raise SpotifyError(
                "unreachable", f"Spotify could not be reached ({type(e).__name__})"
            ) from None
        return response, body

    @inlineCallbacks
    def _token_request(self, form: dict) -> Deferred:
        response, body = yield self._fetch(
            self._http.post, self.config.token_url,
            data=form,
            auth=(self.config.client_id, self.config.client_secret),
            headers={"Accept": "application/json"},
        )
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if response.code == 429:
            raise SpotifyRateLimited(retry_after_of(response))
        if response.code != 200:
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                description = answer.get("error_description")
                if not isinstance(description, str):
                    description = answer["error"].replace("_", " ")
                error = SpotifyError(answer["error"], description)
            else:
                error = SpotifyError("server_error", f"Spotify answered HTTP {response.code}")
            if response.code >= 500:
                error.status = response.code
            raise error
        if not (
            isinstance(answer, dict)
            and isinstance(answer.get("access_token"), str)
            and isinstance(answer.get("expires_in"), int)
        ):
            raise SpotifyError("invalid_response", "Spotify's answer held no usable token")
        if form["grant_type"] == "client_credentials":
            return {"access_token": answer["access_token"], "expires_in": answer["expires_in"]}
        return {name: answer.get(name) for name in TOKEN_FIELDS}
