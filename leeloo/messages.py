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
    ``join_crew``    ``crew_code`` ``device_id``? ``display_name``? (or ``device_name``)
    ``message``      ``msg_type`` (default ``"text"``), ``payload`` (object, default ``{}``)
    ``share_music``  ``spotify_uri`` ``artist`` ``track`` ``album``
    ``reaction``     ``reaction_type``
    ``ping``
    ``ack``          ``seq`` (cumulative: everything up to ``seq`` arrived)

Relay -> client
    ``registered`` ``crew_created`` ``crew_joined`` ``member_joined``
    ``member_offline`` ``message`` ``music_shared`` ``reaction`` ``pong``
    ``spotify_auth_complete`` ``error``
    ``sent``             ``client_msg_id`` ``id`` ``seq``
    ``replay_truncated`` ``from_seq`` ``to_seq``

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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# Generated crew codes: prefix plus characters that cannot be misread.
CREW_CODE_PREFIX = "LEELOO-"
CREW_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
DEVICE_ID_PREFIX = "leeloo_"

# Crew codes: what the original relay accepted (any string, upper-cased),
# within a length a person could type.
MAX_CREW_CODE_LENGTH = 64
MAX_DEVICE_ID_LENGTH = 64
MAX_NAME_LENGTH = 64
MAX_TYPE_LENGTH = 64
MAX_FIELD_LENGTH = 1024

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,%d}" % MAX_DEVICE_ID_LENGTH)


class ProtocolError(Exception):
    """
    A peer's mistake.  C{code} is the stable error code of the contract,
    C{message} a short sentence safe to show to the peer.
    """

    code = "invalid_message"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def as_message(self) -> dict:
        return error(self.code, self.message, **self.extra)


class InvalidJSON(ProtocolError):
    code = "invalid_json"


class InvalidMessage(ProtocolError):
    code = "invalid_message"


class UnknownType(ProtocolError):
    code = "unknown_type"


class NotInCrew(ProtocolError):
    code = "not_in_crew"


class InvalidCrewCode(ProtocolError):
    code = "invalid_crew_code"


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


class CrewLimit(ProtocolError):
    """
    The relay has no unused crew code left to hand out.
    """

    code = "crew_limit"


class RateLimited(ProtocolError):
    """
    Too many messages or crew-entry attempts; C{retry_after} says when to
    try again (whole seconds).
    """

    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after=max(1, math.ceil(retry_after)))
        self.retry_after = self.extra["retry_after"]


class DeviceAuthFailed(ProtocolError):
    code = "device_auth_failed"


# Every error code of the contract, by its class: what a client turns an
# ``error`` frame back into (L{error_from}).
ERRORS: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (InvalidJSON, InvalidMessage, UnknownType, NotInCrew, InvalidCrewCode,
                BinaryNotSupported, InvalidLastSeq, InvalidAck, DuplicateClientMessage,
                StoreUnavailable, RateLimited, DeviceAuthFailed)
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


@dataclass(frozen=True, slots=True)
class ShareMusic:
    spotify_uri: str | None = None
    artist: str | None = None
    track: str | None = None
    album: str | None = None
    client_msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class Reaction:
    reaction_type: str
    client_msg_id: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


# ------------------------------------------------------------- validation


def _string(obj: Mapping, name: str, max_length: int, required: bool = False) -> str | None:
    """
    The string field C{name} of C{obj}, stripped; C{None} when absent, null
    or empty (as the original relay treated them) unless C{required}.
    """
    value = obj.get(name)
    if value is None or value == "":
        if required:
            raise InvalidMessage(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be a string")
    value = value.strip()
    if not value:
        if required:
            raise InvalidMessage(f"{name} is required")
        return None
    if len(value) > max_length:
        raise InvalidMessage(f"{name} must be at most {max_length} characters")
    return value


def normalize_crew_code(value: Any) -> str:
    """
    A crew code as the original relay read it: surrounding whitespace
    dropped, then upper-cased with C{str.upper()} (C{café} is C{CAFÉ}), and
    nothing else.

    @raise InvalidMessage: C{value} is not a string.
    @raise InvalidCrewCode: the code is whitespace only, longer than
        L{MAX_CREW_CODE_LENGTH} code points, or holds a control character
        (Unicode category Cc).
    """
    if not isinstance(value, str):
        raise InvalidMessage("crew_code must be a string")
    code = value.strip()
    if not code:
        raise InvalidCrewCode("crew_code must not be only whitespace")
    code = code.upper()
    if len(code) > MAX_CREW_CODE_LENGTH:
        raise InvalidCrewCode(f"crew_code must be at most {MAX_CREW_CODE_LENGTH} characters")
    if any(unicodedata.category(c) == "Cc" for c in code):
        raise InvalidCrewCode("crew_code must not contain control characters")
    return code


def _crew_code(obj: Mapping, required: bool = False) -> str | None:
    value = obj.get("crew_code")
    if value is None or value == "":
        if required:
            raise InvalidMessage("crew_code is required")
        return None
    return normalize_crew_code(value)


def device_id_of(obj: Mapping) -> str | None:
    """
    The optional C{device_id} field of C{obj}, checked.
    """
    value = _string(obj, "device_id", MAX_DEVICE_ID_LENGTH)
    if value is not None and not _DEVICE_ID_RE.fullmatch(value):
        raise InvalidMessage(
            f"device_id must be 1-{MAX_DEVICE_ID_LENGTH} letters, digits, '_', '.', ':' or '-'"
        )
    return value


def _display_name(obj: Mapping) -> str | None:
    name = _string(obj, "display_name", MAX_NAME_LENGTH)
    if name is None:
        name = _string(obj, "device_name", MAX_NAME_LENGTH)
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
    return _string(obj, "client_msg_id", MAX_TYPE_LENGTH)


def _device_key(obj: Mapping) -> str | None:
    return _string(obj, "device_key", MAX_TYPE_LENGTH)


def _register(obj: Mapping) -> Register:
    return Register(
        device_id=device_id_of(obj),
        crew_code=_crew_code(obj),
        device_name=_string(obj, "device_name", MAX_NAME_LENGTH),
        last_seq=_last_seq(obj),
        device_key=_device_key(obj),
    )


def _create_crew(obj: Mapping) -> CreateCrew:
    return CreateCrew(
        device_id=device_id_of(obj),
        crew_code=_crew_code(obj),
        display_name=_display_name(obj),
        last_seq=_last_seq(obj),
        device_key=_device_key(obj),
    )


def _join_crew(obj: Mapping) -> JoinCrew:
    return JoinCrew(
        crew_code=_crew_code(obj, required=True),
        device_id=device_id_of(obj),
        display_name=_display_name(obj),
        last_seq=_last_seq(obj),
        device_key=_device_key(obj),
    )


def _crew_message(obj: Mapping) -> CrewMessage:
    msg_type = _string(obj, "msg_type", MAX_TYPE_LENGTH) or "text"
    payload = obj.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise InvalidMessage("payload must be an object")
    return CrewMessage(msg_type=msg_type, payload=payload, client_msg_id=_client_msg_id(obj))


def _share_music(obj: Mapping) -> ShareMusic:
    return ShareMusic(
        **{
            name: _string(obj, name, MAX_FIELD_LENGTH)
            for name in ("spotify_uri", "artist", "track", "album")
        },
        client_msg_id=_client_msg_id(obj),
    )


def _reaction(obj: Mapping) -> Reaction:
    return Reaction(
        reaction_type=_string(obj, "reaction_type", MAX_TYPE_LENGTH, required=True),
        client_msg_id=_client_msg_id(obj),
    )


def _ack(obj: Mapping) -> Ack:
    return Ack(seq=_sequence(obj, "seq", InvalidMessage, required=True))


_DECODERS: dict[str, Callable[[Mapping], Any]] = {
    "register": _register,
    "create_crew": _create_crew,
    "join_crew": _join_crew,
    "message": _crew_message,
    "share_music": _share_music,
    "reaction": _reaction,
    "ping": lambda obj: Ping(),
    "ack": _ack,
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


def encode(message: Mapping) -> bytes:
    """
    The text frame payload of an outgoing message (compact UTF-8 JSON).
    """
    try:
        return orjson.dumps(message)
    except TypeError:
        # Text orjson will not write (a lone surrogate from a source that
        # did not come through parse_json): escaped, ASCII JSON instead.
        return json.dumps(message, separators=(",", ":")).encode("ascii")


def _with_key(message: dict, device_key: str | None) -> dict:
    if device_key is not None:
        message["device_key"] = device_key
    return message


def registered(device_id: str, device_key: str | None = None) -> dict:
    return _with_key({"type": "registered", "device_id": device_id}, device_key)


def crew_created(device_id: str, crew_code: str, device_key: str | None = None) -> dict:
    return _with_key({"type": "crew_created", "device_id": device_id, "crew_code": crew_code}, device_key)


def crew_joined(
    device_id: str, crew_code: str, members: int, names: list[str], device_key: str | None = None
) -> dict:
    return _with_key(
        {
            "type": "crew_joined",
            "device_id": device_id,
            "crew_code": crew_code,
            "crew_members": members,
            "member_names": names,
        },
        device_key,
    )


def member_joined(device_id: str, name: str) -> dict:
    return {"type": "member_joined", "device_id": device_id, "display_name": name}


def member_offline(device_id: str, name: str) -> dict:
    return {"type": "member_offline", "device_id": device_id, "display_name": name}


def crew_message(from_device: str, from_name: str, msg_type: str, payload: dict) -> dict:
    """
    A crew ``message`` without its ``timestamp``, ``seq`` and ``id``, which
    the relay adds when it stores it (see L{stamped}).
    """
    return {
        "type": "message",
        "from_device": from_device,
        "from_name": from_name,
        "msg_type": msg_type,
        "payload": payload,
    }


def music_shared(share: ShareMusic, pushed_by: str) -> dict:
    return {
        "type": "music_shared",
        "spotify_uri": share.spotify_uri,
        "artist": share.artist,
        "track": share.track,
        "album": share.album,
        "pushed_by": pushed_by,
    }


def reaction(reaction_type: str, from_name: str) -> dict:
    return {"type": "reaction", "reaction_type": reaction_type, "from": from_name}


def stamped(message: dict, timestamp: int, seq: int, message_id: str) -> dict:
    """
    C{message} as it is stored and fanned out: with the relay's timestamp,
    the crew's sequence number and the message id.
    """
    return {**message, "timestamp": timestamp, "seq": seq, "id": message_id}


# Crew messages a legacy device is only replayed while they are fresh: a
# nudge or a reaction minutes late means nothing.
EPHEMERAL_MSG_TYPES = frozenset({"nudge", "reaction"})


def is_ephemeral(message: Mapping) -> bool:
    """
    Whether C{message} (a crew fan-out) is a nudge or a reaction: the
    top-level C{reaction}, or a C{message} whose C{msg_type} is one.
    """
    kind = message.get("type")
    return kind == "reaction" or (kind == "message" and message.get("msg_type") in EPHEMERAL_MSG_TYPES)


def replayed(payload: bytes) -> bytes:
    """
    The stored frame C{payload} (an encoded object, with its original
    C{timestamp}) as it is replayed: with C{"replayed": true}.
    """
    return payload[:-1] + b',"replayed":true}'


def sent(client_msg_id: str, message_id: str, seq: int) -> dict:
    return {"type": "sent", "client_msg_id": client_msg_id, "id": message_id, "seq": seq}


def replay_truncated(from_seq: int, to_seq: int) -> dict:
    return {"type": "replay_truncated", "from_seq": from_seq, "to_seq": to_seq}


def pong() -> dict:
    return {"type": "pong"}


def spotify_auth_complete(tokens: Mapping) -> dict:
    return {"type": "spotify_auth_complete", "tokens": dict(tokens)}


def error(code: str, message: str, **extra: Any) -> dict:
    return {"type": "error", "error": code, "message": message, **extra}
