"""
The HTML the relay shows people: the landing page, the crew page (the
browser client, filled in by C{static/crew.js}) and the pages a phone sees
after Spotify's consent screen, all in one look (C{static/leeloo.css}).
Every value put into a page is escaped; nothing from the wire is.
"""

from __future__ import annotations

from html import escape

from twisted.web.http import RESPONSES

# Album art comes from Spotify's image hosts; nothing else is fetched from
# another site.
SPOTIFY_IMAGE_HOSTS = b"https://i.scdn.co https://mosaic.scdn.co https://*.spotifycdn.com"

# Sent with every HTTP response.  The pages use the relay's own stylesheet
# and scripts (under /static/, no inline script or style), images from the
# relay and Spotify's image hosts, and talk only to the relay itself
# (``connect-src 'self'`` covers ws: and wss: to the same host); keep the
# policy and the pages in step.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' "
    + SPOTIFY_IMAGE_HOSTS
    + b"; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def pairing_policy(accounts_origin: str) -> bytes:
    """
    The Content-Security-Policy of the pairing pages: the relay's
    stylesheet and icon, a form that posts to the relay, and the redirect
    that follows it to Spotify's accounts service at C{accounts_origin}
    (Chrome applies C{form-action} to that redirect too); nothing else.
    """
    return (b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self' "
            + accounts_origin.encode("ascii")
            + b"; frame-ancestors 'none'; base-uri 'none'")


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


def _page(title: str, body: str, script: str | None = None, cards: bool = True) -> bytes:
    """
    A whole page: C{body} (trusted markup, every value in it already
    escaped) in a card, the shared stylesheet, and C{script} from
    C{/static/} if given.
    """
    script_tag = f'<script src="/static/{script}" defer></script>' if script else ""
    main = f'<div class="card">{body}</div>' if cards else body
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title>"
        '<link rel="stylesheet" href="/static/leeloo.css">'
        '<link rel="icon" href="/static/icon.svg" type="image/svg+xml">'
        f"{script_tag}</head>"
        f"<body><main>{main}"
        '<footer><p>LEELOO relay</p></footer></main></body></html>\n'
    ).encode("utf-8")


def landing(health: dict) -> bytes:
    """
    The landing page, with the relay's figures from C{health} as they are
    now (the page's script keeps them fresh; without it they are still
    there).
    """
    devices = int(health.get("devices", 0))
    crews = int(health.get("crews_online", 0))
    return _page(
        "LEELOO relay",
        f"""
<h1>LEELOO</h1>
<p><span class="badge" id="relay-state">Relay online</span></p>
<p>LEELOO is a little music-sharing gadget for friends. Form a <em>crew</em>,
and when one of you pushes a song, a reaction, a nudge or a note, every other
LEELOO in the crew shows it at once.</p>
<h2>Right now</h2>
<dl class="stats">
<div><dt>Devices online</dt><dd id="devices-online" data-field="devices">{devices}</dd></div>
<div><dt>Crews with someone online</dt><dd id="crews-online" data-field="crews_online">{crews}</dd></div>
</dl>
<p><a class="button" href="/crew">Open your crew in this browser</a></p>
<p class="muted">No LEELOO yet? With a crew code from a friend you can see what
the crew shares, and share songs, texts and reactions, right from this page.</p>
<p class="muted">This is the relay the devices meet at: they connect to
<code>/ws</code>, and <a href="/health">/health</a> says how it is doing.</p>
""",
        script="landing.js",
    )


def crew() -> bytes:
    """
    The browser client for a crew: the markup its script fills in.  Nothing
    from the wire is ever put in here; the script renders it as text.
    """
    return _page(
        "LEELOO crew",
        """
<div class="card">
<h1><a href="/">LEELOO</a></h1>
<p id="status" role="status" data-state="idle">Enter a crew code to join.</p>
<p id="notice" role="alert"></p>
<noscript><p>This page needs JavaScript to talk to your crew. The
<a href="/">relay's home page</a> works without it.</p></noscript>
</div>

<section class="card" id="join-view" aria-labelledby="join-title">
<h2 id="join-title">Join a crew</h2>
<form id="join-form">
<label for="crew-code">Crew code</label>
<input id="crew-code" name="code" required maxlength="32" autocomplete="off"
 autocapitalize="characters" spellcheck="false" placeholder="LEELOO-7X3K">
<label for="display-name">Your name</label>
<input id="display-name" name="name" required maxlength="64" autocomplete="nickname">
<p class="hint">Your crew sees you by this name.</p>
<div class="row"><button type="submit" id="join">Join</button></div>
</form>
</section>

<section class="card" id="crew-view" hidden aria-labelledby="crew-title">
<h2 id="crew-title">Crew <span id="crew-label"></span></h2>
<h3 id="online-title">Online</h3>
<ul class="people" id="online" aria-labelledby="online-title"></ul>

<h3>Send</h3>
<form id="text-form">
<label for="text">Message</label>
<div class="row"><input id="text" maxlength="500" autocomplete="off" required>
<button type="submit">Send</button></div>
</form>
<div class="row" role="group" aria-label="Reactions">
<button type="button" class="secondary" id="react-love" data-reaction="love">Love</button>
<button type="button" class="secondary" id="react-fire" data-reaction="fire">Fire</button>
<button type="button" class="secondary" id="nudge">Nudge</button>
</div>
<form id="song-form">
<label for="song-link">Share a song: Spotify link or URI</label>
<input id="song-link" maxlength="300" autocomplete="off" required
 placeholder="https://open.spotify.com/track/...">
<div class="row">
<input id="song-track" maxlength="200" autocomplete="off" aria-label="Title (optional)" placeholder="Title (optional)">
<input id="song-artist" maxlength="200" autocomplete="off" aria-label="Artist (optional)" placeholder="Artist (optional)">
</div>
<label for="song-note">Note (optional)</label>
<input id="song-note" maxlength="300" autocomplete="off">
<div class="row"><button type="submit">Share song</button></div>
</form>
</section>

<section class="card" id="feed-view" hidden aria-labelledby="feed-title">
<h2 id="feed-title">What the crew shares</h2>
<p class="muted" id="feed-empty">Nothing yet. Songs, texts and reactions appear here as they arrive.</p>
<ol class="feed" id="feed"></ol>
</section>

<section class="card" aria-labelledby="browser-title">
<h2 id="browser-title">This browser</h2>
<p class="hint">This browser keeps its LEELOO id and where you left off, so you
see what you missed next time.</p>
<div class="row">
<button type="button" class="secondary" id="leave" hidden>Leave this crew</button>
<button type="button" class="secondary" id="forget">Forget this browser</button>
</div>
</section>
""",
        script="crew.js",
        cards=False,
    )


_BRAND = '<h1><a href="/">LEELOO</a></h1>'


def spotify_connected() -> bytes:
    return _page(
        "Spotify connected",
        _BRAND + "<h2>Spotify is connected</h2>"
        "<p>Your LEELOO has what it needs. You can close this page and look at "
        "your LEELOO.</p>",
    )


def spotify_cancelled() -> bytes:
    return _page(
        "Spotify not connected",
        _BRAND + "<h2>No problem</h2><p>You chose not to connect Spotify. Scan the code on "
        "your LEELOO again whenever you like.</p>",
    )


def spotify_failed(reason: str) -> bytes:
    return _page(
        "Spotify not connected",
        _BRAND + "<h2>That did not work</h2>"
        f"<p>Spotify said: {escape(reason)}.</p>"
        "<p>Scan the code on your LEELOO to try again.</p>",
    )


def bad_request(reason: str) -> bytes:
    return _page(
        "Bad request",
        _BRAND + f"<h2>Something is missing</h2><p>{escape(reason)}</p>"
        "<p>Open this page by scanning the code on your LEELOO.</p>",
    )


def unavailable(reason: str) -> bytes:
    return _page("Unavailable", _BRAND + f"<h2>Not available</h2><p>{escape(reason)}</p>")


# -------------------------------------------------------------- pairing


# The consent box's words (issue 20), on a page whose device offered it.
KEEP_ACCESS_LABEL = "let the relay keep access so this LEELOO can share what you're playing"


def pair(user_code: str, device_name: str, crew_code: str | None, action: str, keep_offered: bool = False) -> bytes:
    """
    The page a phone sees at C{/pair/CODE}: which LEELOO asks, in which
    crew, the code it shows, and the one button, posting to C{action}.
    With C{keep_offered}, the form holds the consent box, unchecked: the
    form field C{keep} is C{yes} only when the person ticks it.
    """
    box = (f'<p><label class="consent"><input type="checkbox" name="keep" value="yes" id="keep"> '
           f"{escape(KEEP_ACCESS_LABEL)}</label></p>") if keep_offered else ""
    crew = (f"in crew <strong>{escape(crew_code)}</strong>" if crew_code
            else "not in a crew yet")
    return _page(
        "Connect Spotify to your LEELOO",
        _BRAND + "<h2>Connect Spotify</h2>"
        f'<p>The LEELOO called <strong id="device-name">{escape(device_name)}</strong>, {crew}, '
        "asks to use your Spotify account.</p>"
        "<p>Check that your LEELOO shows this code:</p>"
        f'<p class="pair-code" id="user-code">{escape(user_code)}</p>'
        f'<form method="post" action="{escape(action)}">{box}'
        '<button type="submit" id="connect">Continue to Spotify</button></form>'
        '<p class="muted">Not your LEELOO, or a different code? Close this page: nothing '
        "happens until you press the button.</p>",
    )


_PAIR_PROBLEMS = {
    "unknown": ("Code not known", "This pairing code is not known",
                "It may have been used or replaced by a newer one, or it has run out. "
                "Start again on your LEELOO: it shows a new code."),
    "expired": ("Code expired", "This pairing has expired",
                "Pairing codes last ten minutes. Start again on your LEELOO: it shows a new code."),
    "used": ("Code already used", "This code was already used",
             "Someone pressed its button already. If that was not you, start again on your LEELOO "
             "and check the code it shows."),
    "wrong_browser": ("Wrong browser", "Open this on the phone that pressed the button",
                      "This link belongs to the browser that pressed “Continue to Spotify”. Open it "
                      "there, or start again on your LEELOO."),
    "cross_site": ("Not from this page", "Press the button on the pairing page",
                   "Open the link your LEELOO shows and press the button there."),
    "unavailable": ("Try again", "The relay could not keep this pairing",
                    "Wait a moment and press the button again."),
    "not_configured": ("Unavailable", "Spotify is not set up on this relay",
                       "Ask whoever runs this relay to configure its Spotify app."),
    "legacy_off": ("Update your LEELOO", "This kind of link no longer works",
                   "This relay pairs Spotify only through the code your LEELOO shows. Update your "
                   "LEELOO and start again from it."),
    "too_many": ("Slow down", "Too many tries",
                 "Wait a minute, then open the link your LEELOO shows again."),
}


def pair_problem(reason: str) -> bytes:
    """
    The page that says what went wrong with a pairing and what to do.
    """
    title, heading, advice = _PAIR_PROBLEMS.get(reason, _PAIR_PROBLEMS["unknown"])
    return _page(title, _BRAND + f"<h2>{escape(heading)}</h2><p>{escape(advice)}</p>")


def spotify_refused(reason: str) -> bytes:
    """
    A pairing Spotify refused: what it said, and to start on the device.
    """
    return _page(
        "Spotify not connected",
        _BRAND + "<h2>That did not work</h2>"
        f"<p>Spotify said: {escape(reason)}.</p>"
        "<p>Start again on your LEELOO: it shows a new code.</p>",
    )


def spotify_paired() -> bytes:
    return _page(
        "Spotify connected",
        _BRAND + "<h2>Spotify is connected</h2>"
        "<p>Your LEELOO has what it needs. You can close this page and look at "
        "your LEELOO.</p>",
    )


def spotify_pair_cancelled() -> bytes:
    return _page(
        "Spotify not connected",
        _BRAND + "<h2>No problem</h2><p>You chose not to connect Spotify. Start again on "
        "your LEELOO whenever you like.</p>",
    )


def to_spotify(location: str) -> bytes:
    """
    The body of the redirect to Spotify's consent (browsers follow the
    C{Location} at once).
    """
    return _page("Continue to Spotify",
                 _BRAND + f'<p><a href="{escape(location)}">Continue to Spotify</a></p>')
