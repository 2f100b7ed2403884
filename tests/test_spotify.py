"""
Tests for L{leeloo.spotify}: the code exchange at Spotify's token endpoint,
driven through L{treq.testing.StubTreq} against
L{leeloo.testing.FakeSpotifyAccounts}, and for that fake itself.
"""

from __future__ import annotations

import base64
import json

from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from leeloo.spotify import SpotifyConfig, SpotifyError, SpotifyOAuth
from leeloo.testing import FakeSpotifyAccounts

CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret"
REDIRECT_URI = "https://relay.test/spotify/callback"
ACCOUNTS_URL = "http://accounts.test"
TOKEN_URL = ACCOUNTS_URL + "/api/token"

CODE = "test-code-from-spotify"
ACCESS_TOKEN = "test-access-token"
REFRESH_TOKEN = "test-refresh-token"


def config(**overrides: str) -> SpotifyConfig:
    values = dict(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=REDIRECT_URI,
        accounts_url=ACCOUNTS_URL,
    )
    values.update(overrides)
    return SpotifyConfig(**values)


def basic(client_id: str, client_secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()


class Silent(Resource):
    """
    An endpoint that accepts the request and never answers.
    """

    isLeaf = True

    def render_POST(self, request):
        return NOT_DONE_YET


class RefusingHTTP:
    """
    A treq-like client whose every connection is refused.
    """

    def post(self, *args, **kwargs):
        return fail(ConnectionRefusedError())


class SpotifyConfigTests(SynchronousTestCase):
    def test_token_url(self) -> None:
        """
        The token endpoint is C{/api/token} under the accounts URL, with or
        without a trailing slash on it.
        """
        self.assertEqual(config().token_url, TOKEN_URL)
        self.assertEqual(config(accounts_url=ACCOUNTS_URL + "/").token_url, TOKEN_URL)

    def test_default_accounts_url(self) -> None:
        """
        Without an accounts URL the config points at Spotify's real token
        endpoint.
        """
        self.assertEqual(
            SpotifyConfig(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI).token_url,
            "https://accounts.spotify.com/api/token",
        )

    def test_repr_hides_secret(self) -> None:
        """
        The client secret never appears in the config's repr (which is
        what ends up in logs and tracebacks).
        """
        self.assertNotIn(CLIENT_SECRET, repr(config()))
        self.assertIn(CLIENT_ID, repr(config()))


class ExchangeCodeTests(SynchronousTestCase):
    """
    L{SpotifyOAuth.exchange_code} against the fake accounts service.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.accounts = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.http = StubTreq(self.accounts)
        self.oauth = SpotifyOAuth(config(), http=self.http, clock=self.clock)

    def exchange(self, code: str = CODE):
        d = self.oauth.exchange_code(code)
        self.http.flush()
        return d

    def refusal(self, code: str = CODE) -> SpotifyError:
        return self.failureResultOf(self.exchange(code), SpotifyError).value

    def test_tokens(self) -> None:
        """
        An accepted code gives exactly the access token, the refresh token
        and their lifetime; Spotify's other fields (token_type, scope) are
        dropped.
        """
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN, expires_in=3600)
        self.assertEqual(
            self.successResultOf(self.exchange()),
            {"access_token": ACCESS_TOKEN, "refresh_token": REFRESH_TOKEN, "expires_in": 3600},
        )

    def test_form_fields(self) -> None:
        """
        The request's form body holds exactly grant_type=authorization_code,
        the code and the configured redirect_uri.
        """
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN)
        self.successResultOf(self.exchange())
        self.assertEqual(
            self.accounts.requests,
            [{"grant_type": "authorization_code", "code": CODE, "redirect_uri": REDIRECT_URI}],
        )

    def test_form_content_type(self) -> None:
        """
        The body is sent as C{application/x-www-form-urlencoded}.
        """
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN)
        self.successResultOf(self.exchange())
        [received] = self.accounts.received
        self.assertEqual(
            received["content_type"].split(";")[0].strip(), "application/x-www-form-urlencoded"
        )

    def test_basic_auth(self) -> None:
        """
        The app authenticates with HTTP Basic auth over its client id and
        secret; neither travels in the form.
        """
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN)
        self.successResultOf(self.exchange())
        [received] = self.accounts.received
        self.assertEqual(received["authorization"], basic(CLIENT_ID, CLIENT_SECRET))
        self.assertNotIn(CLIENT_SECRET, json.dumps(received["form"]))

    def test_no_timer_left(self) -> None:
        """
        A finished exchange leaves no timeout pending on the clock.
        """
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN)
        self.successResultOf(self.exchange())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_invalid_grant(self) -> None:
        """
        A code Spotify refuses fails with Spotify's error code and its
        description.
        """
        e = self.refusal("not-a-code-spotify-issued")
        self.assertEqual((e.error, e.description), ("invalid_grant", "Invalid authorization code"))

    def test_wrong_client_secret(self) -> None:
        """
        Spotify's refusal of the app's credentials is reported as
        C{invalid_client}.
        """
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN)
        oauth = SpotifyOAuth(
            config(client_secret="other-test-secret"), http=self.http, clock=self.clock
        )
        d = oauth.exchange_code(CODE)
        self.http.flush()
        self.assertEqual(self.failureResultOf(d, SpotifyError).value.error, "invalid_client")

    def test_error_without_description(self) -> None:
        """
        A JSON error with no description is described by its code in words.
        """
        self.accounts.fail_with = 400
        self.accounts.fail_body = {"error": "invalid_request"}
        e = self.refusal()
        self.assertEqual((e.error, e.description), ("invalid_request", "invalid request"))

    def test_server_error_page(self) -> None:
        """
        A 5xx answer that is not JSON is a C{server_error} naming the HTTP
        status.
        """
        self.accounts.fail_with = 500
        e = self.refusal()
        self.assertEqual(e.error, "server_error")
        self.assertIn("500", e.description)

    def test_json_error_on_server_failure(self) -> None:
        """
        A 5xx answer carrying an OAuth JSON error keeps Spotify's code and
        description.
        """
        self.accounts.fail_with = 503
        self.accounts.fail_body = {
            "error": "temporarily_unavailable",
            "error_description": "Try again later",
        }
        e = self.refusal()
        self.assertEqual((e.error, e.description), ("temporarily_unavailable", "Try again later"))

    def test_success_not_json(self) -> None:
        """
        A 200 answer that is not JSON is an C{invalid_response}.
        """
        self.accounts.fail_with = 200
        self.assertEqual(self.refusal().error, "invalid_response")

    def test_success_without_access_token(self) -> None:
        """
        A 200 answer without an access token is an C{invalid_response}.
        """
        self.accounts.codes[CODE] = {"refresh_token": REFRESH_TOKEN, "expires_in": 3600}
        self.assertEqual(self.refusal().error, "invalid_response")

    def test_success_with_bad_lifetime(self) -> None:
        """
        A 200 answer whose C{expires_in} is not an integer is an
        C{invalid_response}.
        """
        self.accounts.codes[CODE] = {
            "access_token": ACCESS_TOKEN,
            "refresh_token": REFRESH_TOKEN,
            "expires_in": "soon",
        }
        self.assertEqual(self.refusal().error, "invalid_response")

    def test_unreachable(self) -> None:
        """
        A connection failure is an C{unreachable} error.
        """
        oauth = SpotifyOAuth(config(), http=RefusingHTTP(), clock=self.clock)
        e = self.failureResultOf(oauth.exchange_code(CODE), SpotifyError).value
        self.assertEqual(e.error, "unreachable")

    def test_timeout(self) -> None:
        """
        A token endpoint that never answers fails the exchange as
        C{unreachable} once the timeout has passed on the clock, and not
        before.
        """
        http = StubTreq(Silent())
        oauth = SpotifyOAuth(config(), http=http, clock=self.clock, timeout=15)
        d = oauth.exchange_code(CODE)
        http.flush()
        self.clock.advance(14.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.failureResultOf(d, SpotifyError).value.error, "unreachable")

    def test_errors_never_hold_the_code(self) -> None:
        """
        No refusal mentions the code in its error or description.
        """
        self.accounts.fail_with = 400
        self.accounts.fail_body = {"error": "invalid_grant", "error_description": "Invalid code"}
        refusals = [self.refusal()]
        self.accounts.fail_with = 500
        self.accounts.fail_body = None
        refusals.append(self.refusal())
        self.accounts.fail_with = 200
        refusals.append(self.refusal())
        for e in refusals:
            self.assertNotIn(CODE, str(e))
            self.assertNotIn(CODE, e.description)


class FakeSpotifyAccountsTests(SynchronousTestCase):
    """
    L{FakeSpotifyAccounts} keeps Spotify's published token-endpoint
    contract, so that passing against it means something.
    """

    def setUp(self) -> None:
        self.accounts = FakeSpotifyAccounts(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        self.accounts.issue(CODE, ACCESS_TOKEN, REFRESH_TOKEN)
        self.http = StubTreq(self.accounts)

    def post(self, data=None, auth=(CLIENT_ID, CLIENT_SECRET), url=TOKEN_URL, **kwargs):
        if data is None:
            data = {"grant_type": "authorization_code", "code": CODE, "redirect_uri": REDIRECT_URI}
        d = self.http.post(url, data=data, auth=auth, **kwargs)
        self.http.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response, body

    def assertRefused(self, response, body, error: str) -> None:
        self.assertEqual(response.code, 400)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        answer = json.loads(body)
        self.assertEqual(set(answer), {"error", "error_description"})
        self.assertEqual(answer["error"], error)

    def test_tokens(self) -> None:
        """
        A correct request is answered 200 with JSON holding the Bearer
        access token, the refresh token, the lifetime and the scope.
        """
        response, body = self.post()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(
            json.loads(body),
            {
                "token_type": "Bearer",
                "scope": "user-read-playback-state",
                "access_token": ACCESS_TOKEN,
                "refresh_token": REFRESH_TOKEN,
                "expires_in": 3600,
            },
        )

    def test_code_used_once(self) -> None:
        """
        A code is accepted once; the second exchange is C{invalid_grant}.
        """
        self.post()
        self.assertRefused(*self.post(), "invalid_grant")

    def test_wrong_secret(self) -> None:
        """
        Basic auth with the wrong client secret is C{invalid_client}.
        """
        self.assertRefused(*self.post(auth=(CLIENT_ID, "other-test-secret")), "invalid_client")

    def test_no_basic_auth(self) -> None:
        """
        Client credentials in the form instead of Basic auth are
        C{invalid_client}: the relay must use Basic auth.
        """
        data = {
            "grant_type": "authorization_code",
            "code": CODE,
            "redirect_uri": REDIRECT_URI,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        }
        self.assertRefused(*self.post(data=data, auth=None), "invalid_client")

    def test_json_body(self) -> None:
        """
        A JSON body instead of a form is C{invalid_request}.
        """
        d = self.http.post(
            TOKEN_URL,
            json={"grant_type": "authorization_code", "code": CODE, "redirect_uri": REDIRECT_URI},
            auth=(CLIENT_ID, CLIENT_SECRET),
        )
        self.http.flush()
        response = self.successResultOf(d)
        self.assertRefused(response, self.successResultOf(response.content()), "invalid_request")
        self.assertIn(CODE, self.accounts.codes)

    def test_form_in_query_string(self) -> None:
        """
        Fields sent in the query string rather than the form body do not
        count.
        """
        response, body = self.post(
            data={"grant_type": "authorization_code"},
            params={"code": CODE, "redirect_uri": REDIRECT_URI},
        )
        self.assertRefused(response, body, "invalid_request")
        self.assertIn(CODE, self.accounts.codes)

    def test_wrong_grant_type(self) -> None:
        """
        A grant type other than C{authorization_code}, C{refresh_token} and
        C{client_credentials} is C{unsupported_grant_type}.
        """
        data = {"grant_type": "password", "code": CODE, "redirect_uri": REDIRECT_URI}
        self.assertRefused(*self.post(data=data), "unsupported_grant_type")

    def test_wrong_redirect_uri(self) -> None:
        """
        A redirect_uri other than the registered one is C{invalid_grant}
        and does not spend the code.
        """
        data = {"grant_type": "authorization_code", "code": CODE, "redirect_uri": "https://x.test/"}
        self.assertRefused(*self.post(data=data), "invalid_grant")
        self.assertIn(CODE, self.accounts.codes)

    def test_records_requests(self) -> None:
        """
        Every request's form and its Authorization and Content-Type headers
        are recorded.
        """
        self.post()
        self.assertEqual(
            self.accounts.received,
            [
                {
                    "authorization": basic(CLIENT_ID, CLIENT_SECRET),
                    "content_type": "application/x-www-form-urlencoded",
                    "form": {
                        "grant_type": "authorization_code",
                        "code": CODE,
                        "redirect_uri": REDIRECT_URI,
                    },
                }
            ],
        )

    def test_other_path(self) -> None:
        """
        Only C{/api/token} exists.
        """
        response, _ = self.post(url=ACCOUNTS_URL + "/api/other")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.accounts.requests, [])

    def test_get_not_allowed(self) -> None:
        """
        The token endpoint takes only POST.
        """
        d = self.http.get(TOKEN_URL)
        self.http.flush()
        self.assertEqual(self.successResultOf(d).code, 405)
