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
    Neither ever holds a token or the code.
    """

    def __init__(self, error: str, description: str) -> None:
        super().__init__(error, description)
        self.error = error
        self.description = description


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

    @inlineCallbacks
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
        try:
            response = yield self._http.post(
                self.config.token_url,
                data=form,
                auth=(self.config.client_id, self.config.client_secret),
                headers={"Accept": "application/json"},
                reactor=self._clock,
                timeout=self._timeout,
            )
            body = yield response.content()
        except Exception as e:
            raise SpotifyError(
                "unreachable", f"Spotify could not be reached ({type(e).__name__})"
            ) from None
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if response.code != 200:
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                description = answer.get("error_description")
                if not isinstance(description, str):
                    description = answer["error"].replace("_", " ")
                raise SpotifyError(answer["error"], description)
            raise SpotifyError("server_error", f"Spotify answered HTTP {response.code}")
        if not (
            isinstance(answer, dict)
            and isinstance(answer.get("access_token"), str)
            and isinstance(answer.get("expires_in"), int)
        ):
            raise SpotifyError("invalid_response", "Spotify's answer held no usable token")
        return {name: answer.get(name) for name in TOKEN_FIELDS}
