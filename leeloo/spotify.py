"""
Spotify's OAuth token endpoint, called through an injected treq client.

The relay holds the app's client secret; devices never see it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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
    def exchange_code(self, code: str) -> Deferred:
        """
        Exchange an authorization code for tokens.

        @return: a L{Deferred} firing with C{{"access_token", "refresh_token",
            "expires_in"}}, or failing with L{SpotifyError}.
        """
        try:
            response = yield self._http.post(
                self.config.token_url,
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.config.redirect_uri,
                },
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
