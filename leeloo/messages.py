"""
The LEELOO wire protocol: typed messages, ``decode()`` / ``encode()``, and the
``ProtocolError`` family.

This module is the specification of what devices and the relay say to each
other over the WebSocket at ``/ws`` (one JSON object per text frame).  Every
message and field below is used by devices already in the field: new features
add messages and fields, they never rename or remove these.

Client -> relay
    ``register``     ``device_id``? ``crew_code``? ``device_name``?
    ``create_crew``  ``device_id``? ``crew_code``? ``display_name``? (or ``device_name``)
                     ``crew_name``? (at most 40 characters)
    ``join_crew``    ``crew_code`` ``device_id``? ``display_name``? (or ``device_name``)
    ``message``      ``msg_type`` (default ``"text"``), ``payload`` (object, default ``{}``)
    ``share_music``  ``spotify_uri`` ``artist`` ``track`` ``album``
    ``reaction``     ``reaction_type``
    ``ping``
    ``ack``          ``seq`` (cumulative: everything up to ``seq`` arrived)
    ``spotify_pair`` ``scopes``? (space-separated; default
                     ``user-read-currently-playing user-read-playback-state``)
                     ``keep_access``? (true: offer the relay keeping the access)
    ``spotify_refresh`` ``refresh_token`` (none when the relay keeps the access)
    ``spotify_forget``
    ``share_now_playing`` ``crew_code``? ``note``? ``client_msg_id``?
    ``spotify_search`` ``query`` ``limit``? (1 to 10, default 5)
    ``crew_add``     ``crew_code`` ``last_seq``?
    ``crew_leave``   ``crew_code``
    ``crews``
    ``crew_primary`` ``crew_code``

Relay -> client
    ``registered`` ``crew_created`` ``crew_joined`` ``member_joined``
    ``member_offline`` ``message`` ``music_shared`` ``reaction`` ``pong``
    ``spotify_auth_complete`` ``error``
    ``sent``             ``client_msg_id`` ``id`` ``seq`` ``crew_code``
    ``replay_truncated`` ``from_seq`` ``to_seq`` ``crew_code``
    ``spotify_pair``     ``url`` ``user_code`` ``expires_in``
    ``spotify_pair_failed`` ``reason`` ``user_code``
    ``spotify_tokens``   ``tokens`` (``access_token`` ``expires_in`` ``refresh_token``)
    ``spotify_search_results`` ``query`` ``results``
    ``spotify_forgotten``
    ``crew_joined``      ``crew_name`` (added, for a crew that has one)
    ``crew_left``        ``crew_code``
    ``crews``            ``primary`` ``crews`` (each ``crew_code``
                         ``crew_name`` ``members_online`` ``member_names``)
    ``crew_primary``     ``crew_code``

Both directions are typed, one frozen dataclass per message type.
L{decode} reads what a client sends (the relay's side); L{decode_from_relay}
reads what the relay sends (the device's side); L{encode} writes either a
dict or a typed message.  The names:

    - client -> relay: the request, in CamelCase (L{Register},
      L{CreateCrew}, L{JoinCrew}, L{CrewMessage} for ``message``,
      L{ShareMusic}, L{Reaction}, L{Ack}, L{Ping}, L{SpotifyPair},
      L{CrewAdd}, L{CrewLeave}, L{Crews}, L{CrewPrimary});
    - relay -> client: the wire type in CamelCase (L{Registered},
      L{CrewCreated}, L{CrewJoined}, L{MemberJoined}, L{MemberOffline},
      L{MusicShared}, L{Sent}, L{ReplayTruncated}, L{Pong},
      L{SpotifyAuthComplete}, L{SpotifyPairFailed}, L{CrewLeft}), except
      where that would collide with a request: the crew fan-outs of
      ``message`` and ``reaction`` are L{RelayedMessage} and
      L{RelayedReaction}, the answer to ``spotify_pair`` is
      L{SpotifyPairStarted}, to ``crews`` L{CrewList} (of L{CrewListing}),
      to ``crew_primary`` L{PrimaryCrew}, and ``error`` is
      L{ErrorFrame} (L{ProtocolError} is the exception, L{ErrorFrame} the
      frame that carries it).  A type this version does not know is read
      as an L{UnknownRelayMessage} keeping the whole dict.

Each outgoing class has C{to_dict()}, exactly the frame on the wire; the
builder functions (L{registered}, L{crew_joined}, ...) return those dicts.
Every error is a L{ProtocolError} subclass carrying its C{code}, the close
code that follows when it repeats (C{close_code}), and the bot API's answer
(C{http_status}, C{http_code}); close codes are L{CloseCode}.  The field
validators (L{string_field}, L{crew_code_field}, L{object_field}) serve
frames and the bot API alike.

Device identity (trust on first use):
    ``registered``, ``crew_created`` and ``crew_joined`` carry
    ``device_key`` when the relay issues one: to a device id that has no
    bound key.  The key binds the first time the device presents it
    (``device_key`` in ``register`` / ``create_crew`` / ``join_crew``); from
    then on that id must always present it, or it is refused with
    ``device_auth_failed``.  Deployed devices, which never send a key, keep
    working as legacy ids unless the relay runs with
    ``--require-device-key``.

Limits:
    Too many frames per second, or too many attempts to enter crews the
    device is not a member of (including failed joins, creating crews and
    registering device ids the relay has never seen), are answered
    ``{"type":"error","error":"rate_limited","message":..,"retry_after":S}``;
    persistent excess is closed with 4029.  A newer connection for the same
    device id closes the older one with 4001.  When no unused crew code can
    be found, ``create_crew`` is answered ``crew_limit``.

Delivery (additions that deployed devices never see unless they ask):
    Every crew fan-out (``message``, ``music_shared``, ``reaction``, bot
    messages) carries ``seq``, a per-crew sequence number, and ``id``, a
    message id.  It is stored before it is delivered.  A device that comes
    back (``register`` with its crew, ``join_crew``, or ``create_crew`` with
    its existing code) first receives what it missed, in order, then live
    traffic.  A client may pass ``last_seq`` in ``register`` /
    ``create_crew`` / ``join_crew`` to resume after that sequence, and send
    ``{"type":"ack","seq":N}``; a device that does either is resumed from
    its own acknowledgements and never gets a message twice.  A resuming
    client that missed more than the replay limit gets the newest and a
    ``replay_truncated`` naming the sequences it lost.  A sender may add
    ``client_msg_id`` to any crew message: it is answered ``sent`` once the
    message is durable, and a resend with the same id is not stored or
    delivered again (a different body under the same id is
    ``duplicate_client_msg_id``).  A message the store refuses is answered
    ``store_unavailable`` carrying its ``client_msg_id``.

Crew codes:
    A crew code is read as the original relay read it: surrounding
    whitespace dropped, then upper-cased with Python's ``str.upper()``
    (``café`` is ``CAFÉ``), nothing else.  A code over 64 code points (after
    that), with a control character (Unicode category Cc), or of whitespace
    only is refused with ``invalid_crew_code``; an absent, null or empty
    code means no crew (``join_crew`` needs one: ``invalid_message``).  The
    bot API applies the same rule (400 ``invalid_crew_code``).  Generated
    codes are ``LEELOO-`` and characters of L{CREW_CODE_ALPHABET}.

Legacy devices (the deployed ones: they never send ``ack`` or ``last_seq``
and take every frame for a new one):
    A returning legacy device is replayed only messages younger than the
    relay's ``--legacy-replay-age`` (a day), and nudges and reactions
    (``msg_type`` ``nudge`` or ``reaction``, and the top-level ``reaction``)
    only when younger than ``--ephemeral-age`` (ten minutes); then
    ``--replay-limit`` cuts.  Its delivered position advances only on proof
    of receipt: its answer to a WebSocket ping sent after the frames (every
    WebSocket library answers pings by itself), or its answer to a close the
    relay started.  On its return it gets what was not proven: at most one
    ping interval's worth may arrive twice, none is lost.  Every replayed
    frame, to any client, carries ``"replayed": true`` and its original
    ``timestamp``.

Connections:
    A connection that binds no device (no successful ``register``,
    ``create_crew`` or ``join_crew``) within the relay's ``--bind-timeout``
    (a minute) is closed with 4008.  Close codes: 1001 the relay stops (come
    back), 1009 a message over the size limit, 1011 a relay bug, 4001
    replaced by a newer connection for the same device id, 4008 no device
    bound in time, 4029 too many refusals.

Spotify pairing (the relay as the device's pairing broker, as in RFC 8628):
    A device with a device id (``register`` without a crew is enough) sends
    ``{"type":"spotify_pair"}``, optionally with ``scopes``; the relay
    answers ``{"type":"spotify_pair","url":"PUBLIC/pair/CODE",
    "user_code":"XXXX-XXXX","expires_in":600}``.  The device shows the URL
    (a QR code) and the code; the phone that opens the URL sees the device's
    name, its crew and the code, and its button goes on to Spotify's
    consent.  The tokens come as ``spotify_auth_complete``, as before (kept
    for the device while it is offline).  The code is single use and lives
    ten minutes; a second ``spotify_pair`` cancels the first.  A flow that
    ends without tokens is told ``{"type":"spotify_pair_failed","reason":R,
    "user_code":CODE}`` with R ``denied`` (the person said no), ``expired``,
    ``cancelled`` (a newer ``spotify_pair``) or ``refused`` (Spotify
    refused the exchange).  Any ``spotify_*`` message from a connection with
    no device id is answered ``not_registered``; on a relay without a
    Spotify app, ``spotify_not_configured``.  A relay older than this
    answers ``unknown_type``: the device then falls back to building the
    authorize URL itself with ``state`` = its device id (the legacy path,
    which the relay's ``--no-legacy-spotify-state`` turns off).

Sharing what is playing (the relay keeps the Spotify access, with consent):
    A device that sends ``{"type":"spotify_pair","keep_access":true}`` has
    its pairing page offer a box, unchecked: "let the relay keep access so
    this LEELOO can share what you're playing".  Checked, the relay is the
    only holder of the refresh token (encrypted at rest): the device's
    ``spotify_auth_complete`` carries ``access_token`` and ``expires_in``
    without ``refresh_token``, and the device refreshes with
    ``{"type":"spotify_refresh"}`` (no token), answered ``spotify_tokens``
    likewise without one.  ``{"type":"spotify_forget"}`` deletes what the
    relay keeps for the device: ``{"type":"spotify_forgotten"}``.
    ``{"type":"share_now_playing","crew_code"?,"note"?,"client_msg_id"?}``
    asks Spotify what is playing and sends the crew (the primary without
    ``crew_code``) an ordinary ``message`` of ``msg_type`` ``song_push``
    (payload ``track`` ``artist`` ``album`` ``spotify_uri``
    ``album_art_url`` ``note``); the sender is answered ``sent`` (with its
    ``client_msg_id`` when it gave one), or ``nothing_playing``,
    ``not_paired`` (no access kept for it), ``spotify_refused`` with
    ``spotify_error`` (``invalid_grant``: pair again), ``spotify_unavailable``
    or ``rate_limited``.

Several crews per device:
    A device bound on the connection (by ``register``, ``create_crew`` or
    ``join_crew``; before that every message below is ``not_registered``)
    may be in several crews at once, at most the relay's
    ``--max-crews-per-device`` (8).  ``crew_add`` joins another existing
    crew and keeps the others: it is answered ``crew_joined`` as
    ``join_crew`` is, the crew hears ``member_joined``, and what the device
    missed there is replayed (after ``last_seq``, per crew, when given).
    An unknown crew is ``invalid_crew_code`` (``crew_add`` never creates),
    one already held is answered ``crew_joined`` again with no
    ``member_joined``, and one past the limit is ``crew_limit``; entering a
    crew counts against the entry rate as ``join_crew`` does.
    ``crew_leave`` ends a membership (answered ``crew_left``; the crew
    hears ``member_offline``; nothing of it is replayed); leaving the
    primary crew makes the earliest-joined remaining crew primary.
    ``crews`` lists them (``members_online`` counts the device,
    ``member_names`` names the others), ``crew_primary`` sets the primary
    crew; a crew not held is ``not_in_crew``.  ``message``,
    ``share_music``, ``reaction`` and ``ack`` take an optional
    ``crew_code`` naming one of the device's crews (``not_in_crew`` if it
    is not one); without it they go to the primary crew (the first joined,
    or the one set).  A device becomes multi-crew with its first
    ``crew_add``: from then on ``join_crew`` (and ``register`` or
    ``create_crew`` with a code) add a crew too; a device that never sent
    ``crew_add`` (every deployed one) is moved by them to that one crew, as
    before.  The message rate is the connection's, across all its crews.
    Every event the relay sends about a crew carries its ``crew_code``,
    to every client: the crew fan-outs (after ``id``; replayed entries
    stored before this field existed get it too), ``member_joined``,
    ``member_offline``, ``sent`` and ``replay_truncated``.  Deployed
    devices ignore it.

    ``create_crew`` may name the crew it creates: ``crew_name``, at most
    40 characters (stripped; longer, or not a string, is
    ``invalid_message``); ``crews`` lists it (``null`` for a crew without)
    and ``crew_joined`` carries it as ``crew_name`` for a crew that has one
    (a crew without one is answered exactly as before).  A crew that
    exists keeps its name.

    Being multi-crew, the crews (in the order joined) and the primary are
    stored, and survive a restart: a multi-crew device entering on a new
    connection (``register`` with its id, ``join_crew``, ``create_crew``)
    re-enters every crew it is in, each replaying what it missed there in
    order (``last_seq`` is for the crew the message names), with its
    primary as it was.  A crew left with ``crew_leave`` stays left.  Member
    rows kept by earlier releases (a deployed device's in crews it moved
    out of included) are never memberships: no device is multi-crew until
    it sends ``crew_add``.

Unknown fields are ignored, so that newer devices keep working against this
relay.  A frame that cannot be understood raises a L{ProtocolError} whose
``code`` is the stable machine-readable error code sent back in an ``error``
frame.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata

import orjson
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Callable, ClassVar, Mapping, Union

# Generated crew codes: prefix plus characters that cannot be misread.
CREW_CODE_PREFIX = "LEELOO-"
CREW_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
DEVICE_ID_PREFIX = "leeloo_"

# Crew codes: what the original relay accepted (any string, upper-cased),
# within a length a person could type.
MAX_CREW_CODE_LENGTH = 64
MAX_DEVICE_ID_LENGTH = 64
MAX_NAME_LENGTH = 64
MAX_CREW_NAME_LENGTH = 40
MAX_TYPE_LENGTH = 64
MAX_FIELD_LENGTH = 1024

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,%d}" % MAX_DEVICE_ID_LENGTH)


class CloseCode(IntEnum):
    """
    Every close code the relay sends, with its meaning.  The protocol codes
    (1000-2999) are WebSocket's own; application reasons use 4000-4999,
    since Autobahn's C{sendClose} takes no others.
    """

    #: The relay stops: come back (reconnect after a pause).
    GOING_AWAY = 1001
    #: A message over the relay's size limit (sent by Autobahn itself).
    MESSAGE_TOO_BIG = 1009
    #: A bug in the relay; the connection cannot go on.
    INTERNAL_ERROR = 1011
    #: A newer connection for the same device id replaced this one.
    REPLACED = 4001
    #: The relay's operator deleted the device's crew or reset its key
    #: (C{leeloo-admin}): reconnect.
    OPERATOR = 4004
    #: No device bound (C{register}, C{create_crew}, C{join_crew}) within
    #: the relay's C{--bind-timeout}.
    BIND_TIMEOUT = 4008
    #: Too many refusals in a row (rate limits, failed device keys).
    ABUSE = 4029


# The names the relay core has used for them.
CLOSE_GOING_AWAY = CloseCode.GOING_AWAY
CLOSE_MESSAGE_TOO_BIG = CloseCode.MESSAGE_TOO_BIG
CLOSE_INTERNAL_ERROR = CloseCode.INTERNAL_ERROR
CLOSE_REPLACED = CloseCode.REPLACED
CLOSE_BIND_TIMEOUT = CloseCode.BIND_TIMEOUT
CLOSE_ABUSE = CloseCode.ABUSE
CLOSE_OPERATOR = CloseCode.OPERATOR


class ProtocolError(Exception):
    """
    A peer's mistake.  C{code} is the stable error code of the contract,
    C{message} a short sentence safe to show to the peer; C{extra} the
    frame's other fields (C{retry_after}, C{client_msg_id}).

    What each error means beyond its C{error} frame is carried here, in one
    place, as class attributes:

    C{close_code}
        the close that ends a connection on which this error keeps
        happening: L{RateLimited} and L{DeviceAuthFailed} count as strikes,
        and the relay's C{--abuse-strikes} of them in a row close with
        L{CloseCode.ABUSE}.  C{None}: the connection always stays open.
    C{http_status}, C{http_code}, C{http_message}, C{http_extra}
        how the bot API answers it: that status with the JSON body
        C{{"error": http_code, "message": http_message, **http_extra}}
        (no C{message} when C{http_message} is C{None}).  By default 400,
        the error's own code and message, and nothing else.
    """

    code: ClassVar[str] = "invalid_message"
    close_code: ClassVar[CloseCode | None] = None
    http_status: ClassVar[int] = 400
    # The fields of C{extra} the bot API answers too.
    http_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    @property
    def http_code(self) -> str:
        return self.code

    @property
    def http_message(self) -> str | None:
        return self.message

    @property
    def http_extra(self) -> dict:
        return {name: self.extra[name] for name in self.http_fields if name in self.extra}

    def as_frame(self) -> "ErrorFrame":
        """
        The C{error} frame that answers this error.
        """
        return ErrorFrame(self.code, self.message, dict(self.extra))

    def as_message(self) -> dict:
        return error(self.code, self.message, **self.extra)


class InvalidJSON(ProtocolError):
    code = "invalid_json"


class InvalidMessage(ProtocolError):
    code = "invalid_message"


class FieldError(InvalidMessage):
    """
    One field of a frame or of a bot API body is missing or of the wrong
    shape: C{invalid_message}, its message naming the field.  C{field} is
    the field, C{problem} what is wrong in the bot API's words: the bot API
    answers 400 C{{"error": "<field> <problem>"}} with no message (the
    original relay's shape, e.g. C{"display_name required"}).
    """

    http_message = None

    def __init__(self, field: str, problem: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.problem = problem

    @property
    def http_code(self) -> str:
        return f"{self.field} {self.problem}"


class UnknownType(ProtocolError):
    code = "unknown_type"


class NotInCrew(ProtocolError):
    code = "not_in_crew"
    http_status = 403


class InvalidCrewCode(ProtocolError):
    """
    A crew code that names no crew.  The bot API answers it 404
    C{crew_not_found}, as the original relay did.
    """

    code = "invalid_crew_code"
    http_status = 404
    http_code = "crew_not_found"


class MalformedCrewCode(InvalidCrewCode):
    """
    A crew code that cannot be one (whitespace only, too long, a control
    character): C{invalid_crew_code} on the wire as for an unknown crew,
    but the bot API answers it 400 C{invalid_crew_code}, not a lookup.
    """

    http_status = 400
    http_code = "invalid_crew_code"


class BinaryNotSupported(ProtocolError):
    code = "binary_not_supported"


class InvalidLastSeq(ProtocolError):
    code = "invalid_last_seq"


class InvalidAck(ProtocolError):
    code = "invalid_ack"


class DuplicateClientMessage(ProtocolError):
    code = "duplicate_client_msg_id"


class StoreUnavailable(ProtocolError):
    code = "store_unavailable"
    http_status = 503


class CrewLimit(ProtocolError):
    """
    The relay has no unused crew code left to hand out.
    """

    code = "crew_limit"
    http_status = 503


class RateLimited(ProtocolError):
    """
    Too many messages or crew-entry attempts; C{retry_after} says when to
    try again (whole seconds).  A strike: repeated, it closes with 4029.
    """

    code = "rate_limited"
    close_code = CloseCode.ABUSE
    http_status = 429
    http_fields = ("retry_after",)

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=max(1, math.ceil(retry_after)))
        self.retry_after = self.extra["retry_after"]


class DeviceAuthFailed(ProtocolError):
    """
    A device id claimed without its device key.  A strike: repeated, it
    closes with 4029.
    """

    code = "device_auth_failed"
    close_code = CloseCode.ABUSE


class NotRegistered(ProtocolError):
    """
    A C{spotify_*} message from a connection that has no device id yet
    (register first: no crew is needed).
    """

    code = "not_registered"


class SpotifyNotConfigured(ProtocolError):
    """
    A C{spotify_*} message to a relay that has no Spotify app configured.
    """

    code = "spotify_not_configured"
    http_status = 503


class SpotifyRefused(ProtocolError):
    """
    Spotify refused a C{spotify_*} request; C{spotify_error} is its error
    code (C{invalid_grant} on a refresh: pair again).
    """

    code = "spotify_refused"
    http_status = 502

    def __init__(self, message: str, spotify_error: str = "unknown", **extra: Any) -> None:
        super().__init__(message, spotify_error=spotify_error, **extra)
        self.spotify_error = spotify_error


class NothingPlaying(ProtocolError):
    """
    C{share_now_playing} while Spotify plays nothing (or an ad, a podcast:
    no track).
    """

    code = "nothing_playing"


class NotPaired(ProtocolError):
    """
    C{share_now_playing} (or a tokenless C{spotify_refresh}) from a device
    the relay keeps no Spotify access for: never paired, or no consent.
    """

    code = "not_paired"


class SpotifyUnavailable(ProtocolError):
    """
    Spotify could not be reached, failed, or was slower than the relay's
    timeout: C{retry} is always true.
    """

    code = "spotify_unavailable"
    http_status = 503

    def __init__(self, message: str, **extra: Any) -> None:
        extra["retry"] = True
        super().__init__(message, **extra)


# Every error code of the contract, by its class: what a client turns an
# ``error`` frame back into (L{error_from}).  (L{FieldError} and
# L{MalformedCrewCode} share their parents' codes.)
ERRORS: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (InvalidJSON, InvalidMessage, UnknownType, NotInCrew, InvalidCrewCode,
                BinaryNotSupported, InvalidLastSeq, InvalidAck, DuplicateClientMessage,
                StoreUnavailable, CrewLimit, RateLimited, DeviceAuthFailed, NotRegistered,
                SpotifyNotConfigured, SpotifyRefused, SpotifyUnavailable, NothingPlaying, NotPaired)
}


def error_from(frame: Mapping) -> ProtocolError:
    """
    The typed error an ``error`` frame carries: the class of its code (a
    plain L{ProtocolError} with that C{code} for a code this version does
    not know), its message and its other fields.  The inverse of
    L{ProtocolError.as_message}.
    """
    code = frame.get("error")
    code = code if isinstance(code, str) and code else "unknown_error"
    text = frame.get("message")
    text = text if isinstance(text, str) and text else code
    extra = {k: v for k, v in frame.items() if k not in ("type", "error", "message")}
    cls = ERRORS.get(code)
    if cls is RateLimited:
        retry_after = extra.get("retry_after")
        if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or not retry_after >= 0:
            retry_after = 1
        return RateLimited(text, min(retry_after, 3600))
    if cls is None:
        e = ProtocolError(text, **extra)
        e.code = code
        return e
    return cls(text, **extra)


# ---------------------------------------------------------------- incoming


@dataclass(frozen=True, slots=True)
class Register:
    device_id: str | None = None
    crew_code: str | None = None
    device_name: str | None = None
    last_seq: int | None = None
    device_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CreateCrew:
    device_id: str | None = None
    crew_code: str | None = None
    display_name: str | None = None
    last_seq: int | None = None
    device_key: str | None = field(default=None, repr=False)
    crew_name: str | None = None


@dataclass(frozen=True, slots=True)
class JoinCrew:
    crew_code: str
    device_id: str | None = None
    display_name: str | None = None
    last_seq: int | None = None
    device_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class CrewMessage:
    msg_type: str = "text"
    payload: dict = field(default_factory=dict)
    client_msg_id: str | None = None
    crew_code: str | None = None


@dataclass(frozen=True, slots=True)
class ShareMusic:
    spotify_uri: str | None = None
    artist: str | None = None
    track: str | None = None
    album: str | None = None
    client_msg_id: str | None = None
    crew_code: str | None = None


@dataclass(frozen=True, slots=True)
class Reaction:
    reaction_type: str
    client_msg_id: str | None = None
    crew_code: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int
    crew_code: str | None = None


@dataclass(frozen=True, slots=True)
class CrewAdd:
    """
    ``crew_add``: join another existing crew and keep the others.
    """

    crew_code: str
    last_seq: int | None = None


@dataclass(frozen=True, slots=True)
class CrewLeave:
    """
    ``crew_leave``: end the membership of one crew.
    """

    crew_code: str


@dataclass(frozen=True, slots=True)
class Crews:
    """
    ``crews``: ask for the crews the device is in.
    """


@dataclass(frozen=True, slots=True)
class CrewPrimary:
    """
    ``crew_primary``: make one of the device's crews its primary crew.
    """

    crew_code: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


# What a pairing asks Spotify for when the device names no scopes.
DEFAULT_SPOTIFY_SCOPES = "user-read-currently-playing user-read-playback-state"
_SCOPE_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
MAX_SCOPES = 32


@dataclass(frozen=True, slots=True)
class SpotifyPair:
    """
    ``spotify_pair``: start a pairing; C{scopes} space-separated.
    """

    scopes: str = DEFAULT_SPOTIFY_SCOPES
    keep_access: bool = False


MAX_REFRESH_TOKEN_LENGTH = 2048
MAX_SEARCH_QUERY_LENGTH = 200
SEARCH_LIMIT_DEFAULT = 5
SEARCH_LIMIT_MAX = 10


@dataclass(frozen=True, slots=True)
class SpotifyRefresh:
    """
    ``spotify_refresh``: new tokens for C{refresh_token} (the relay holds
    the client secret); C{None}: with the refresh token the relay keeps.
    """

    refresh_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class SpotifyForget:
    """
    ``spotify_forget``: delete the Spotify access the relay keeps.
    """


MAX_NOTE_LENGTH = 280


@dataclass(frozen=True, slots=True)
class ShareNowPlaying:
    """
    ``share_now_playing``: send the crew the song playing now.
    """

    crew_code: str | None = None
    note: str | None = None
    client_msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class SpotifySearch:
    """
    ``spotify_search``: tracks for C{query}, in natural words; C{limit} 1
    to 10.
    """

    query: str
    limit: int = SEARCH_LIMIT_DEFAULT


# ------------------------------------------------------------- validation


# These validators read the fields of a device's frame and of a bot API
# body alike: one rule, one error.  A refusal is a L{FieldError} (or a
# L{MalformedCrewCode}), which a frame answers as C{invalid_message} naming
# the field and the bot API as C{"<field> <problem>"}.


def string_field(obj: Mapping, name: str, max_length: int, required: bool = False,
                 default: Any = None) -> str | None:
    """
    The string field C{name} of C{obj}, stripped (C{default} when the key
    is absent).  Null, empty or whitespace only is C{None}, as the original
    relay treated it, or refused when C{required}.

    @raise FieldError: C{"<name> required"} (C{"<name> is required"} in a
        frame), C{"<name> must be a string"}, or C{"<name> too long"}
        (C{"<name> must be at most N characters"}) over C{max_length}.
    """
    value = obj.get(name, default)
    if value is None or value == "":
        if required:
            raise FieldError(name, "required", f"{name} is required")
        return None
    if not isinstance(value, str):
        raise FieldError(name, "must be a string", f"{name} must be a string")
    value = value.strip()
    if not value:
        if required:
            raise FieldError(name, "required", f"{name} is required")
        return None
    if len(value) > max_length:
        raise FieldError(name, "too long", f"{name} must be at most {max_length} characters")
    return value


def object_field(obj: Mapping, name: str) -> dict:
    """
    The object field C{name} of C{obj} (a crew message's C{payload}):
    absent or null is C{{}}.

    @raise FieldError: C{"<name> must be an object"}.
    """
    value = obj.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError(name, "must be an object", f"{name} must be an object")
    return value


def normalize_crew_code(value: Any) -> str:
    """
    A crew code as the original relay read it: surrounding whitespace
    dropped, then upper-cased with C{str.upper()} (C{café} is C{CAFÉ}), and
    nothing else.

    @raise FieldError: C{value} is not a string (C{invalid_message}).
    @raise MalformedCrewCode: the code is whitespace only, longer than
        L{MAX_CREW_CODE_LENGTH} code points, or holds a control character
        (Unicode category Cc): C{invalid_crew_code}.
    """
    if not isinstance(value, str):
        raise FieldError("crew_code", "must be a string", "crew_code must be a string")
    code = value.strip()
    if not code:
        raise MalformedCrewCode("crew_code must not be only whitespace")
    code = code.upper()
    if len(code) > MAX_CREW_CODE_LENGTH:
        raise MalformedCrewCode(f"crew_code must be at most {MAX_CREW_CODE_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in code):
        raise MalformedCrewCode("crew_code must not contain control characters")
    return code


def crew_code_field(obj: Mapping, required: bool = False) -> str | None:
    """
    The C{crew_code} field of C{obj}, by L{normalize_crew_code}; absent,
    null or empty is C{None}, or refused when C{required}
    (L{FieldError} C{"crew_code required"}).
    """
    value = obj.get("crew_code")
    if value is None or value == "":
        if required:
            raise FieldError("crew_code", "required", "crew_code is required")
        return None
    return normalize_crew_code(value)


def device_id_of(obj: Mapping) -> str | None:
    """
    The optional C{device_id} field of C{obj}, checked.
    """
    value = string_field(obj, "device_id", MAX_DEVICE_ID_LENGTH)
    if value is not None and not _DEVICE_ID_RE.fullmatch(value):
        raise InvalidMessage(
            f"device_id must be 1-{MAX_DEVICE_ID_LENGTH} letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _display_name(obj: Mapping) -> str | None:
    name = string_field(obj, "display_name", MAX_NAME_LENGTH)
    if name is None:
        name = string_field(obj, "device_name", MAX_NAME_LENGTH)
    return name


def _sequence(obj: Mapping, name: str, error: type[ProtocolError], required: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name} must be a whole number")
    if value < 0:
        raise error(f"{name} must not be negative")
    return value


def _last_seq(obj: Mapping) -> int | None:
    return _sequence(obj, "last_seq", InvalidLastSeq)


def _client_msg_id(obj: Mapping) -> str | None:
    return string_field(obj, "client_msg_id", MAX_TYPE_LENGTH)


def _device_key(obj: Mapping) -> str | None:
    return string_field(obj, "device_key", MAX_TYPE_LENGTH)


def _register(obj: Mapping) -> Register:
    return Register(
        device_id=device_id_of(obj),
        crew_code=crew_code_field(obj),
        device_name=string_field(obj, "device_name", MAX_NAME_LENGTH),
        last_seq=_last_seq(obj),
        device_key=_device_key(obj),
    )


def _create_crew(obj: Mapping) -> CreateCrew:
    return CreateCrew(
        device_id=device_id_of(obj),
        crew_code=crew_code_field(obj),
        display_name=_display_name(obj),
        last_seq=_last_seq(obj),
        device_key=_device_key(obj),
        crew_name=string_field(obj, "crew_name", MAX_CREW_NAME_LENGTH),
    )


def _join_crew(obj: Mapping) -> JoinCrew:
    return JoinCrew(
        crew_code=crew_code_field(obj, required=True),
        device_id=device_id_of(obj),
        display_name=_display_name(obj),
        last_seq=_last_seq(obj),
        device_key=_device_key(obj),
    )


def _crew_message(obj: Mapping) -> CrewMessage:
    msg_type = string_field(obj, "msg_type", MAX_TYPE_LENGTH) or "text"
    return CrewMessage(msg_type=msg_type, payload=object_field(obj, "payload"), client_msg_id=_client_msg_id(obj),
                       crew_code=crew_code_field(obj))


def _share_music(obj: Mapping) -> ShareMusic:
    return ShareMusic(
        **{
            name: string_field(obj, name, MAX_FIELD_LENGTH)
            for name in ("spotify_uri", "artist", "track", "album")
        },
        client_msg_id=_client_msg_id(obj),
        crew_code=crew_code_field(obj),
    )


def _reaction(obj: Mapping) -> Reaction:
    return Reaction(
        reaction_type=string_field(obj, "reaction_type", MAX_TYPE_LENGTH, required=True),
        client_msg_id=_client_msg_id(obj),
        crew_code=crew_code_field(obj),
    )


def _ack(obj: Mapping) -> Ack:
    return Ack(seq=_sequence(obj, "seq", InvalidMessage, required=True), crew_code=crew_code_field(obj))


def _crew_add(obj: Mapping) -> CrewAdd:
    return CrewAdd(crew_code=crew_code_field(obj, required=True), last_seq=_last_seq(obj))


def _crew_leave(obj: Mapping) -> CrewLeave:
    return CrewLeave(crew_code=crew_code_field(obj, required=True))


def _crew_primary(obj: Mapping) -> CrewPrimary:
    return CrewPrimary(crew_code=crew_code_field(obj, required=True))


def _spotify_pair(obj: Mapping) -> SpotifyPair:
    scopes = string_field(obj, "scopes", MAX_FIELD_LENGTH)
    if scopes is None:
        return _spotify_pair_default(obj)
    names = scopes.split()
    if len(names) > MAX_SCOPES or not all(_SCOPE_RE.fullmatch(n) for n in names):
        raise FieldError("scopes", "must be Spotify scope names",
                         f"scopes must be at most {MAX_SCOPES} Spotify scope names separated by spaces")
    return SpotifyPair(" ".join(dict.fromkeys(names)), _keep_access(obj))


def _keep_access(obj: Mapping) -> bool:
    keep = obj.get("keep_access", False)
    if keep is None:
        return False
    if not isinstance(keep, bool):
        raise FieldError("keep_access", "must be true or false", "keep_access must be true or false")
    return keep


def _spotify_pair_default(obj: Mapping) -> SpotifyPair:
    return SpotifyPair(keep_access=_keep_access(obj))


def _spotify_refresh(obj: Mapping) -> SpotifyRefresh:
    return SpotifyRefresh(string_field(obj, "refresh_token", MAX_REFRESH_TOKEN_LENGTH))


def _share_now_playing(obj: Mapping) -> ShareNowPlaying:
    return ShareNowPlaying(crew_code=crew_code_field(obj), note=string_field(obj, "note", MAX_NOTE_LENGTH),
                           client_msg_id=_client_msg_id(obj))


def _spotify_search(obj: Mapping) -> SpotifySearch:
    query = string_field(obj, "query", MAX_SEARCH_QUERY_LENGTH, required=True)
    if any(unicodedata.category(c) == "Cc" for c in query):
        raise FieldError("query", "must hold no control characters", "query must hold no control characters")
    limit = obj.get("limit", SEARCH_LIMIT_DEFAULT)
    if limit is None:
        limit = SEARCH_LIMIT_DEFAULT
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= SEARCH_LIMIT_MAX:
        raise FieldError("limit", f"must be an integer from 1 to {SEARCH_LIMIT_MAX}",
                         f"limit must be an integer from 1 to {SEARCH_LIMIT_MAX}")
    return SpotifySearch(query, limit)


_DECODERS: dict[str, Callable[[Mapping], Any]] = {
    "register": _register,
    "create_crew": _create_crew,
    "join_crew": _join_crew,
    "message": _crew_message,
    "share_music": _share_music,
    "reaction": _reaction,
    "ping": lambda obj: Ping(),
    "ack": _ack,
    "spotify_pair": _spotify_pair,
    "spotify_refresh": _spotify_refresh,
    "spotify_search": _spotify_search,
    "spotify_forget": lambda obj: SpotifyForget(),
    "share_now_playing": _share_now_playing,
    "crew_add": _crew_add,
    "crew_leave": _crew_leave,
    "crews": lambda obj: Crews(),
    "crew_primary": _crew_primary,
}


def parse_json(data: bytes | str) -> Any:
    """
    Parse strict JSON (no NaN or Infinity); raise L{InvalidJSON} otherwise.
    """
    try:
        # orjson is strict already: no NaN or Infinity, no lone surrogates,
        # integers within 64 bits, nesting at most 1024 deep.
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise InvalidJSON("the frame is not valid JSON") from None


def decode(data: bytes | str) -> Any:
    """
    Decode one text frame into a typed message.

    @raise ProtocolError: a subclass naming what is wrong with the frame.
    """
    obj = parse_json(data)
    if not isinstance(obj, dict):
        raise InvalidMessage("a message must be a JSON object")
    kind = obj.get("type")
    if kind is None:
        raise InvalidMessage("type is required")
    if not isinstance(kind, str):
        raise InvalidMessage("type must be a string")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise UnknownType(f"unknown message type {kind[:MAX_TYPE_LENGTH]!r}")
    return decoder(obj)


# ---------------------------------------------------------------- outgoing
#
# What the relay sends, one class per message type.  Each is built by the
# relay and read by the device client (L{decode_from_relay}); C{to_dict()}
# is exactly the frame on the wire: its keys in that order, optional ones
# left out when absent (C{device_key} only when issued; a fan-out's
# C{timestamp}, C{seq} and C{id} once stored; C{replayed} only when true).


def _stamps(d: dict, m: Any) -> dict:
    if m.timestamp is not None:
        d["timestamp"] = m.timestamp
    if m.seq is not None:
        d["seq"] = m.seq
    if m.id is not None:
        d["id"] = m.id
    if m.crew_code is not None:
        d["crew_code"] = m.crew_code
    if m.replayed:
        d["replayed"] = True
    return d


def _with_crew(d: dict, crew_code: str | None) -> dict:
    if crew_code is not None:
        d["crew_code"] = crew_code
    return d


def _with_key(d: dict, device_key: str | None) -> dict:
    if device_key is not None:
        d["device_key"] = device_key
    return d


@dataclass(frozen=True, slots=True)
class Registered:
    """
    ``registered``: the answer to C{register}.
    """

    type: ClassVar[str] = "registered"
    device_id: str
    device_key: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return _with_key({"type": self.type, "device_id": self.device_id}, self.device_key)


@dataclass(frozen=True, slots=True)
class CrewCreated:
    """
    ``crew_created``: the answer to C{create_crew}.
    """

    type: ClassVar[str] = "crew_created"
    device_id: str
    crew_code: str
    device_key: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return _with_key({"type": self.type, "device_id": self.device_id, "crew_code": self.crew_code},
                         self.device_key)


@dataclass(frozen=True, slots=True)
class CrewJoined:
    """
    ``crew_joined``: the answer to C{join_crew}.  C{crew_members} counts
    the online members with the joiner; C{member_names} names the others;
    C{crew_name} is written only for a crew that has one.
    """

    type: ClassVar[str] = "crew_joined"
    device_id: str
    crew_code: str
    crew_members: int
    member_names: list[str]
    device_key: str | None = field(default=None, repr=False)
    crew_name: str | None = None

    def to_dict(self) -> dict:
        d = {
            "type": self.type,
            "device_id": self.device_id,
            "crew_code": self.crew_code,
            "crew_members": self.crew_members,
            "member_names": self.member_names,
        }
        if self.crew_name is not None:
            d["crew_name"] = self.crew_name
        return _with_key(d, self.device_key)


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """
    ``member_joined``: another device entered the crew.
    """

    type: ClassVar[str] = "member_joined"
    device_id: str
    display_name: str
    crew_code: str | None = None

    def to_dict(self) -> dict:
        return _with_crew({"type": self.type, "device_id": self.device_id, "display_name": self.display_name},
                          self.crew_code)


@dataclass(frozen=True, slots=True)
class MemberOffline:
    """
    ``member_offline``: another device of the crew went away.
    """

    type: ClassVar[str] = "member_offline"
    device_id: str
    display_name: str
    crew_code: str | None = None

    def to_dict(self) -> dict:
        return _with_crew({"type": self.type, "device_id": self.device_id, "display_name": self.display_name},
                          self.crew_code)


class _Stamped:
    """
    What the crew fan-outs share: they are stored stamped.
    """

    __slots__ = ()

    def stamped(self, timestamp: int, seq: int, id: str) -> Any:
        """
        This fan-out as it is stored: with the relay's timestamp (ms), the
        crew's sequence number and the message id.
        """
        return replace(self, timestamp=timestamp, seq=seq, id=id)


@dataclass(frozen=True, slots=True)
class RelayedMessage(_Stamped):
    """
    ``message`` as the crew receives it (what a device sent as
    L{CrewMessage}, or the bot): from whom, and once stored its
    C{timestamp} (ms), C{seq} and C{id}; C{replayed} when it comes from
    the log.
    """

    type: ClassVar[str] = "message"
    from_device: str
    from_name: str
    msg_type: str
    payload: dict
    timestamp: int | None = None
    seq: int | None = None
    id: str | None = None
    replayed: bool = False
    crew_code: str | None = None

    def to_dict(self) -> dict:
        return _stamps({
            "type": self.type,
            "from_device": self.from_device,
            "from_name": self.from_name,
            "msg_type": self.msg_type,
            "payload": self.payload,
        }, self)


@dataclass(frozen=True, slots=True)
class MusicShared(_Stamped):
    """
    ``music_shared`` as the crew receives a L{ShareMusic}.
    """

    type: ClassVar[str] = "music_shared"
    spotify_uri: str | None
    artist: str | None
    track: str | None
    album: str | None
    pushed_by: str
    timestamp: int | None = None
    seq: int | None = None
    id: str | None = None
    replayed: bool = False
    crew_code: str | None = None

    def to_dict(self) -> dict:
        return _stamps({
            "type": self.type,
            "spotify_uri": self.spotify_uri,
            "artist": self.artist,
            "track": self.track,
            "album": self.album,
            "pushed_by": self.pushed_by,
        }, self)


@dataclass(frozen=True, slots=True)
class RelayedReaction(_Stamped):
    """
    ``reaction`` as the crew receives a L{Reaction}; C{from_name} is the
    wire's C{from} (a Python keyword).
    """

    type: ClassVar[str] = "reaction"
    reaction_type: str
    from_name: str
    timestamp: int | None = None
    seq: int | None = None
    id: str | None = None
    replayed: bool = False
    crew_code: str | None = None

    def to_dict(self) -> dict:
        return _stamps({"type": self.type, "reaction_type": self.reaction_type, "from": self.from_name}, self)


@dataclass(frozen=True, slots=True)
class Sent:
    """
    ``sent``: the crew message with C{client_msg_id} is stored as C{id},
    C{seq}.
    """

    type: ClassVar[str] = "sent"
    client_msg_id: str | None
    id: str
    seq: int
    crew_code: str | None = None

    def to_dict(self) -> dict:
        # Only share_now_playing is answered sent without a client_msg_id.
        d = {"type": self.type, "client_msg_id": self.client_msg_id} if self.client_msg_id is not None \
            else {"type": self.type}
        d["id"] = self.id
        d["seq"] = self.seq
        return _with_crew(d, self.crew_code)


@dataclass(frozen=True, slots=True)
class ReplayTruncated:
    """
    ``replay_truncated``: the crew messages C{from_seq} to C{to_seq} were
    missed and are not replayed.
    """

    type: ClassVar[str] = "replay_truncated"
    from_seq: int
    to_seq: int
    crew_code: str | None = None

    def to_dict(self) -> dict:
        return _with_crew({"type": self.type, "from_seq": self.from_seq, "to_seq": self.to_seq}, self.crew_code)


@dataclass(frozen=True, slots=True)
class CrewLeft:
    """
    ``crew_left``: the answer to C{crew_leave}.
    """

    type: ClassVar[str] = "crew_left"
    crew_code: str

    def to_dict(self) -> dict:
        return {"type": self.type, "crew_code": self.crew_code}


@dataclass(frozen=True, slots=True)
class CrewRenamed:
    """
    ``crew_renamed``: the relay's operator gave the device's crew
    C{old_crew_code} the code C{crew_code}.
    """

    type: ClassVar[str] = "crew_renamed"
    crew_code: str
    old_crew_code: str

    def to_dict(self) -> dict:
        return {"type": self.type, "crew_code": self.crew_code, "old_crew_code": self.old_crew_code}


@dataclass(frozen=True, slots=True)
class CrewDeleted:
    """
    ``crew_deleted``: the relay's operator deleted the device's crew.
    """

    type: ClassVar[str] = "crew_deleted"
    crew_code: str

    def to_dict(self) -> dict:
        return {"type": self.type, "crew_code": self.crew_code}


@dataclass(frozen=True, slots=True)
class CrewListing:
    """
    One crew in a L{CrewList}: its code, name, the members online (the
    device included) and the others' names.
    """

    crew_code: str
    crew_name: str | None
    members_online: int
    member_names: list[str]

    def to_dict(self) -> dict:
        return {"crew_code": self.crew_code, "crew_name": self.crew_name,
                "members_online": self.members_online, "member_names": self.member_names}


@dataclass(frozen=True, slots=True)
class CrewList:
    """
    ``crews``: the answer to C{crews}: the primary crew's code (C{None}
    when in none) and every crew the device is in, in the order joined.
    """

    type: ClassVar[str] = "crews"
    primary: str | None
    crews: list[CrewListing]

    def to_dict(self) -> dict:
        return {"type": self.type, "primary": self.primary, "crews": [c.to_dict() for c in self.crews]}


@dataclass(frozen=True, slots=True)
class PrimaryCrew:
    """
    ``crew_primary``: the answer to C{crew_primary}: crew messages without
    a C{crew_code} now go to C{crew_code}.
    """

    type: ClassVar[str] = "crew_primary"
    crew_code: str

    def to_dict(self) -> dict:
        return {"type": self.type, "crew_code": self.crew_code}


@dataclass(frozen=True, slots=True)
class Pong:
    """
    ``pong``: the answer to L{Ping}.
    """

    type: ClassVar[str] = "pong"

    def to_dict(self) -> dict:
        return {"type": self.type}


@dataclass(frozen=True, slots=True)
class SpotifyAuthComplete:
    """
    ``spotify_auth_complete``: the device's Spotify tokens (kept out of
    C{repr}).
    """

    type: ClassVar[str] = "spotify_auth_complete"
    tokens: dict = field(repr=False)

    def to_dict(self) -> dict:
        return {"type": self.type, "tokens": self.tokens}


@dataclass(frozen=True, slots=True)
class SpotifyPairStarted:
    """
    ``spotify_pair`` from the relay: the answer to L{SpotifyPair}.  The
    device shows C{url} (as a QR code) and C{user_code} (C{XXXX-XXXX}); the
    pairing lasts C{expires_in} seconds.
    """

    type: ClassVar[str] = "spotify_pair"
    url: str
    user_code: str
    expires_in: int

    def to_dict(self) -> dict:
        return {"type": self.type, "url": self.url, "user_code": self.user_code, "expires_in": self.expires_in}


# Why a pairing ended without tokens.
PAIR_FAILURE_REASONS = ("denied", "expired", "cancelled", "refused")


@dataclass(frozen=True, slots=True)
class SpotifyPairFailed:
    """
    ``spotify_pair_failed``: the pairing with C{user_code} ended without
    tokens; C{reason} is one of L{PAIR_FAILURE_REASONS}.
    """

    type: ClassVar[str] = "spotify_pair_failed"
    reason: str
    user_code: str | None = None

    def to_dict(self) -> dict:
        d = {"type": self.type, "reason": self.reason}
        if self.user_code is not None:
            d["user_code"] = self.user_code
        return d


@dataclass(frozen=True, slots=True)
class SpotifyTokens:
    """
    ``spotify_tokens``: the answer to L{SpotifyRefresh}; C{tokens} holds
    C{access_token}, C{expires_in} and C{refresh_token} (Spotify's new one,
    or the one sent).
    """

    type: ClassVar[str] = "spotify_tokens"
    tokens: dict = field(repr=False)

    def to_dict(self) -> dict:
        return {"type": self.type, "tokens": self.tokens}


@dataclass(frozen=True, slots=True)
class SpotifyForgotten:
    """
    ``spotify_forgotten``: the answer to L{SpotifyForget}.
    """

    type: ClassVar[str] = "spotify_forgotten"

    def to_dict(self) -> dict:
        return {"type": self.type}


@dataclass(frozen=True, slots=True)
class SpotifySearchResults:
    """
    ``spotify_search_results``: the answer to L{SpotifySearch}; each of
    C{results} has C{spotify_uri}, C{track}, C{artist}, C{album},
    C{album_art_url}.
    """

    type: ClassVar[str] = "spotify_search_results"
    query: str
    results: list

    def to_dict(self) -> dict:
        return {"type": self.type, "query": self.query, "results": self.results}


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """
    ``error``: C{error} is the stable code, C{message} the sentence for
    people, C{extra} the other fields (C{retry_after}, C{client_msg_id}).
    The frame of a L{ProtocolError} (L{ProtocolError.as_frame}); back into
    one with L{to_exception}.
    """

    type: ClassVar[str] = "error"
    error: str
    message: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"type": self.type, "error": self.error, "message": self.message, **self.extra}

    def to_exception(self) -> ProtocolError:
        return error_from(self.to_dict())


@dataclass(frozen=True, slots=True)
class UnknownRelayMessage:
    """
    A frame of a C{type} this version does not know (a newer relay's):
    kept whole in C{data}, so that nothing of it is lost.
    """

    type: str
    data: dict

    def to_dict(self) -> dict:
        return dict(self.data)


RelayMessage = Union[Registered, CrewCreated, CrewJoined, MemberJoined, MemberOffline, RelayedMessage,
                     MusicShared, RelayedReaction, Sent, ReplayTruncated, Pong, SpotifyAuthComplete,
                     SpotifyPairStarted, SpotifyPairFailed, SpotifyTokens, SpotifySearchResults, SpotifyForgotten, CrewLeft,
                     CrewList, PrimaryCrew, CrewRenamed, CrewDeleted, ErrorFrame,
                     UnknownRelayMessage]

# The crew fan-outs: stored, sequenced, acknowledged.
FANOUTS: tuple[type, ...] = (RelayedMessage, MusicShared, RelayedReaction)


def encode(message: Mapping | Any) -> bytes:
    """
    The text frame payload of an outgoing message, a dict or a typed
    message (compact UTF-8 JSON).
    """
    if not isinstance(message, dict):
        message = message.to_dict()
    try:
        return orjson.dumps(message)
    except TypeError:
        # Text orjson will not write (a lone surrogate from a source that
        # did not come through parse_json): escaped, ASCII JSON instead.
        return json.dumps(message, separators=(",", ":")).encode("ascii")


# ---------------------------------------------------------------- builders
#
# The dicts the relay core sends today, made by the typed messages.


def registered(device_id: str, device_key: str | None = None) -> dict:
    return Registered(device_id, device_key).to_dict()


def crew_created(device_id: str, crew_code: str, device_key: str | None = None) -> dict:
    return CrewCreated(device_id, crew_code, device_key).to_dict()


def crew_joined(
    device_id: str, crew_code: str, members: int, names: list[str], device_key: str | None = None
) -> dict:
    return CrewJoined(device_id, crew_code, members, names, device_key).to_dict()


def member_joined(device_id: str, name: str) -> dict:
    return MemberJoined(device_id, name).to_dict()


def member_offline(device_id: str, name: str) -> dict:
    return MemberOffline(device_id, name).to_dict()


def crew_message(from_device: str, from_name: str, msg_type: str, payload: dict) -> dict:
    """
    A crew ``message`` without its ``timestamp``, ``seq`` and ``id``, which
    the relay adds when it stores it (see L{stamped}).
    """
    return RelayedMessage(from_device, from_name, msg_type, payload).to_dict()


def music_shared(share: ShareMusic, pushed_by: str) -> dict:
    return MusicShared(share.spotify_uri, share.artist, share.track, share.album, pushed_by).to_dict()


def reaction(reaction_type: str, from_name: str) -> dict:
    return RelayedReaction(reaction_type, from_name).to_dict()


def stamped(message: dict, timestamp: int, seq: int, message_id: str, crew_code: str | None = None) -> dict:
    """
    C{message} (a crew fan-out's dict) as it is stored and fanned out: with
    the relay's timestamp, the crew's sequence number, the message id and
    its crew's code (last), after its fields.  The typed form is the fan-out's own C{stamped()};
    this one stays a dict merge, since it runs on every crew message (a
    round trip through the typed class costs ten times as much).
    """
    if crew_code is None:
        return {**message, "timestamp": timestamp, "seq": seq, "id": message_id}
    return {**message, "timestamp": timestamp, "seq": seq, "id": message_id, "crew_code": crew_code}


# Crew messages a legacy device is only replayed while they are fresh: a
# nudge or a reaction minutes late means nothing.
EPHEMERAL_MSG_TYPES = frozenset({"nudge", "reaction"})

# The msg_types deployed devices send (protocol.md); the relay forwards any
# other too, but counts those together as "other" (a label per new name
# would let anyone grow the metrics without bound).
KNOWN_MSG_TYPES = ("text", "reaction", "song_push", "nudge", "hang_propose", "hang_confirm")


def is_ephemeral(message: Mapping) -> bool:
    """
    Whether C{message} (a crew fan-out) is a nudge or a reaction: the
    top-level C{reaction}, or a C{message} whose C{msg_type} is one.
    """
    kind = message.get("type")
    return kind == "reaction" or (kind == "message" and message.get("msg_type") in EPHEMERAL_MSG_TYPES)


def replayed(payload: bytes, crew_code: str | None = None) -> bytes:
    """
    The stored frame C{payload} (an encoded fan-out, with its original
    C{timestamp}) as it is replayed: with C{"replayed": true}, spliced into
    the bytes rather than encoded again (what C{replayed=True} on the
    typed fan-out gives).  An entry stored before fan-outs carried their
    C{crew_code} (L{stamped} puts it last) gets C{crew_code} too.
    """
    if crew_code is not None:
        tag = b',"crew_code":' + orjson.dumps(crew_code) + b"}"
        if not payload.endswith(tag):
            return payload[:-1] + tag[:-1] + b',"replayed":true}'
    return payload[:-1] + b',"replayed":true}'


def sent(client_msg_id: str, message_id: str, seq: int) -> dict:
    return Sent(client_msg_id, message_id, seq).to_dict()


def replay_truncated(from_seq: int, to_seq: int) -> dict:
    return ReplayTruncated(from_seq, to_seq).to_dict()


def pong() -> dict:
    return Pong().to_dict()


def spotify_auth_complete(tokens: Mapping) -> dict:
    return SpotifyAuthComplete(dict(tokens)).to_dict()


def error(code: str, message: str, **extra: Any) -> dict:
    return ErrorFrame(code, message, extra).to_dict()


# ------------------------------------------------------ relay -> client


def _relay_field(obj: Mapping, name: str, kind: type | tuple, required: bool = True) -> Any:
    value = obj.get(name)
    if value is None:
        if not required:
            return None
        raise InvalidMessage(f"{obj.get('type')} {name} is required")
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        what = {str: "a string", int: "a whole number", dict: "an object", list: "a list",
                bool: "true or false"}.get(kind, "of another type")
        raise InvalidMessage(f"{obj.get('type')} {name} must be {what}")
    return value


def _names(obj: Mapping, name: str) -> list:
    names = _relay_field(obj, name, list)
    if not all(isinstance(n, str) for n in names):
        raise InvalidMessage(f"{obj.get('type')} {name} must be a list of strings")
    return names


def _stamp_fields(obj: Mapping) -> dict:
    return {
        "timestamp": _relay_field(obj, "timestamp", int, required=False),
        "seq": _relay_field(obj, "seq", int, required=False),
        "id": _relay_field(obj, "id", str, required=False),
        "replayed": _relay_field(obj, "replayed", bool, required=False) or False,
        "crew_code": _relay_field(obj, "crew_code", str, required=False),
    }


def _crew_listing(obj: Any) -> CrewListing:
    if not isinstance(obj, dict):
        raise InvalidMessage("each of crews must be an object")
    # Named as the crews frame's own fields are ("crews crew_code is
    # required"): a listing has no type of its own.
    obj = {**obj, "type": "crews"}
    return CrewListing(_relay_field(obj, "crew_code", str), _relay_field(obj, "crew_name", str, required=False),
                       _relay_field(obj, "members_online", int), _names(obj, "member_names"))


def _error_frame(obj: Mapping) -> ErrorFrame:
    return ErrorFrame(_relay_field(obj, "error", str), _relay_field(obj, "message", str),
                      {k: v for k, v in obj.items() if k not in ("type", "error", "message")})


_RELAY_DECODERS: dict[str, Callable[[Mapping], Any]] = {
    "registered": lambda o: Registered(
        _relay_field(o, "device_id", str), _relay_field(o, "device_key", str, required=False)),
    "crew_created": lambda o: CrewCreated(
        _relay_field(o, "device_id", str), _relay_field(o, "crew_code", str),
        _relay_field(o, "device_key", str, required=False)),
    "crew_joined": lambda o: CrewJoined(
        _relay_field(o, "device_id", str), _relay_field(o, "crew_code", str),
        _relay_field(o, "crew_members", int), _names(o, "member_names"),
        _relay_field(o, "device_key", str, required=False), _relay_field(o, "crew_name", str, required=False)),
    "member_joined": lambda o: MemberJoined(
        _relay_field(o, "device_id", str), _relay_field(o, "display_name", str),
        _relay_field(o, "crew_code", str, required=False)),
    "member_offline": lambda o: MemberOffline(
        _relay_field(o, "device_id", str), _relay_field(o, "display_name", str),
        _relay_field(o, "crew_code", str, required=False)),
    "message": lambda o: RelayedMessage(
        _relay_field(o, "from_device", str), _relay_field(o, "from_name", str),
        _relay_field(o, "msg_type", str), _relay_field(o, "payload", dict), **_stamp_fields(o)),
    "music_shared": lambda o: MusicShared(
        *(_relay_field(o, name, str, required=False) for name in ("spotify_uri", "artist", "track", "album")),
        _relay_field(o, "pushed_by", str), **_stamp_fields(o)),
    "reaction": lambda o: RelayedReaction(
        _relay_field(o, "reaction_type", str), _relay_field(o, "from", str), **_stamp_fields(o)),
    "sent": lambda o: Sent(
        _relay_field(o, "client_msg_id", str, required=False), _relay_field(o, "id", str), _relay_field(o, "seq", int),
        _relay_field(o, "crew_code", str, required=False)),
    "crew_left": lambda o: CrewLeft(_relay_field(o, "crew_code", str)),
    "crew_renamed": lambda o: CrewRenamed(_relay_field(o, "crew_code", str), _relay_field(o, "old_crew_code", str)),
    "crew_deleted": lambda o: CrewDeleted(_relay_field(o, "crew_code", str)),
    "crews": lambda o: CrewList(_relay_field(o, "primary", str, required=False),
                                [_crew_listing(c) for c in _relay_field(o, "crews", list)]),
    "crew_primary": lambda o: PrimaryCrew(_relay_field(o, "crew_code", str)),
    "replay_truncated": lambda o: ReplayTruncated(
        _relay_field(o, "from_seq", int), _relay_field(o, "to_seq", int),
        _relay_field(o, "crew_code", str, required=False)),
    "pong": lambda o: Pong(),
    "spotify_auth_complete": lambda o: SpotifyAuthComplete(_relay_field(o, "tokens", dict)),
    "spotify_pair": lambda o: SpotifyPairStarted(
        _relay_field(o, "url", str), _relay_field(o, "user_code", str), _relay_field(o, "expires_in", int)),
    "spotify_pair_failed": lambda o: SpotifyPairFailed(
        _relay_field(o, "reason", str), _relay_field(o, "user_code", str, required=False)),
    "spotify_tokens": lambda o: SpotifyTokens(_relay_field(o, "tokens", dict)),
    "spotify_search_results": lambda o: SpotifySearchResults(
        _relay_field(o, "query", str), _relay_field(o, "results", list)),
    "spotify_forgotten": lambda o: SpotifyForgotten(),
    "error": _error_frame,
}


def relay_message_from(obj: Mapping) -> RelayMessage:
    """
    The typed message of C{obj}, a frame the relay sent, already parsed
    (a dict with a string C{type}).  Fields this version does not know are
    ignored; a C{type} it does not know is an L{UnknownRelayMessage}
    keeping the whole dict.

    @raise InvalidMessage: C{obj} has no string C{type}, or a field of a
        known type is missing or of the wrong type.
    """
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise InvalidMessage("a frame from the relay needs a string type")
    decoder = _RELAY_DECODERS.get(kind)
    if decoder is None:
        return UnknownRelayMessage(kind, dict(obj))
    return decoder(obj)


def decode_from_relay(data: bytes | str) -> RelayMessage:
    """
    Decode one text frame the relay sent into its typed message: what the
    device client reads, as L{decode} is what the relay reads.  A type this
    version does not know comes back as an L{UnknownRelayMessage} (its dict
    kept whole), never an error: a newer relay may add messages.

    @raise InvalidJSON: the frame is not JSON.
    @raise InvalidMessage: not a JSON object, no string C{type}, or a field
        of a known type missing or of the wrong type.
    """
    obj = parse_json(data)
    if not isinstance(obj, dict):
        raise InvalidMessage("a frame from the relay must be a JSON object")
    return relay_message_from(obj)
