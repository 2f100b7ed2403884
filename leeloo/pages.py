"""
The HTML the relay shows people: the landing page and the pages a phone sees
after Spotify's consent screen.  Every value put into a page is escaped.
"""

from __future__ import annotations

from html import escape

from twisted.web.http import RESPONSES

# Sent with every HTTP response.  The pages here use one inline <style> and
# nothing else: no script, image, font, frame or form; keep the policy and
# the pages in step.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    b"base-uri 'none'; form-action 'none'"
)
SECURITY_HEADERS = (
    (b"Content-Security-Policy", CONTENT_SECURITY_POLICY),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"X-Frame-Options", b"DENY"),
)


def reason_phrase(status: int) -> bytes:
    """
    The standard reason phrase of HTTP C{status} (twisted.web lacks a few).
    """
    return RESPONSES.get(status) or _MORE_PHRASES.get(status, b"Error")


_MORE_PHRASES = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}

_STYLE = """
:root { color-scheme: light dark; --accent: #ff5c8a; }
* { box-sizing: border-box; }
body { margin: 0; font: 17px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
       background: #101014; color: #f4f4f6; display: flex; min-height: 100vh;
       align-items: center; justify-content: center; padding: 24px; }
main { max-width: 34rem; width: 100%; }
h1 { font-size: 2.2rem; letter-spacing: .12em; margin: 0 0 .2em; color: var(--accent); }
h2 { font-size: 1.3rem; margin: 0 0 .6em; }
p { margin: .6em 0; color: #c9c9d1; }
.card { background: #1b1b22; border-radius: 16px; padding: 24px; box-shadow: 0 8px 30px #0006; }
.badge { display: inline-block; font-size: .8rem; padding: 2px 10px; border-radius: 99px;
         background: #2a2a35; color: #9be39b; }
code { background: #2a2a35; padding: 1px 6px; border-radius: 6px; }
footer { margin-top: 1.4em; font-size: .85rem; color: #7d7d89; }
"""


def _page(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main><div class="card">{body}</div>'
        "<footer>LEELOO relay</footer></main></body></html>\n"
    ).encode("utf-8")


LANDING = _page(
    "LEELOO",
    """
<h1>LEELOO</h1>
<p><span class="badge">relay online</span></p>
<p>LEELOO is a little music-sharing gadget for friends. Form a <em>crew</em>,
and when one of you pushes a song, a reaction, a nudge or a note, every other
LEELOO in the crew shows it at once.</p>
<p>This is the relay they meet at. Devices connect to <code>/ws</code>;
<code>/health</code> says how it is doing.</p>
""",
)


def spotify_connected() -> bytes:
    return _page(
        "Spotify connected",
        "<h2>Spotify is connected</h2>"
        "<p>Your LEELOO has what it needs. You can close this page and look at "
        "your LEELOO.</p>",
    )


def spotify_cancelled() -> bytes:
    return _page(
        "Spotify not connected",
        "<h2>No problem</h2><p>You chose not to connect Spotify. Scan the code on "
        "your LEELOO again whenever you like.</p>",
    )


def spotify_failed(reason: str) -> bytes:
    return _page(
        "Spotify not connected",
        "<h2>That did not work</h2>"
        f"<p>Spotify said: {escape(reason)}.</p>"
        "<p>Scan the code on your LEELOO to try again.</p>",
    )


def bad_request(reason: str) -> bytes:
    return _page(
        "Bad request",
        f"<h2>Something is missing</h2><p>{escape(reason)}</p>"
        "<p>Open this page by scanning the code on your LEELOO.</p>",
    )


def unavailable(reason: str) -> bytes:
    return _page("Unavailable", f"<h2>Not available</h2><p>{escape(reason)}</p>")
