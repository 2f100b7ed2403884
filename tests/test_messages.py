"""
The wire protocol: decoding every client message, refusing bad frames with
the right error code, and encoding.
"""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from leeloo import messages
from leeloo.messages import (
    CreateCrew,
    CrewMessage,
    InvalidCrewCode,
    InvalidJSON,
    InvalidMessage,
    JoinCrew,
    Ping,
    ProtocolError,
    Reaction,
    Register,
    ShareMusic,
    UnknownType,
    decode,
    encode,
)


def frame(**fields):
    return json.dumps(fields).encode("utf-8")


class DecodeTests(SynchronousTestCase):
    def test_register_all_fields(self):
        """
        register carries device_id, crew_code (upper-cased) and device_name.
        """
        self.assertEqual(
            decode(frame(type="register", device_id="leeloo_abc", crew_code="alpha", device_name="Kitchen")),
            Register(device_id="leeloo_abc", crew_code="ALPHA", device_name="Kitchen"),
        )

    def test_register_no_fields(self):
        """
        Every register field is optional.
        """
        self.assertEqual(decode(frame(type="register")), Register())

    def test_empty_strings_are_absent(self):
        """
        An empty optional field counts as absent, as the original relay
        treated it.
        """
        self.assertEqual(decode(frame(type="register", device_id="", crew_code="")), Register())

    def test_create_crew_device_name_fallback(self):
        """
        create_crew takes display_name, or device_name when that is missing.
        """
        self.assertEqual(
            decode(frame(type="create_crew", device_name="Den")),
            CreateCrew(display_name="Den"),
        )
        self.assertEqual(
            decode(frame(type="create_crew", display_name="A", device_name="B")).display_name, "A"
        )

    def test_join_crew_requires_code(self):
        """
        join_crew without crew_code is invalid_message.
        """
        with self.assertRaises(InvalidMessage) as raised:
            decode(frame(type="join_crew"))
        self.assertEqual(raised.exception.message, "crew_code is required")

    def test_join_crew(self):
        """
        join_crew upper-cases its crew code.
        """
        self.assertEqual(
            decode(frame(type="join_crew", crew_code="leeloo-7x3k", display_name="Ann")),
            JoinCrew(crew_code="LEELOO-7X3K", display_name="Ann"),
        )

    def test_message_defaults(self):
        """
        message defaults msg_type to "text" and payload to {}.
        """
        self.assertEqual(decode(frame(type="message")), CrewMessage("text", {}))

    def test_message_any_msg_type(self):
        """
        A msg_type the relay has never heard of passes through unchanged.
        """
        decoded = decode(frame(type="message", msg_type="future_thing", payload={"x": [1, 2]}))
        self.assertEqual(decoded, CrewMessage("future_thing", {"x": [1, 2]}))

    def test_share_music(self):
        """
        share_music carries the four track fields.
        """
        self.assertEqual(
            decode(frame(type="share_music", spotify_uri="spotify:track:1", artist="A", track="T", album="B")),
            ShareMusic("spotify:track:1", "A", "T", "B"),
        )

    def test_reaction(self):
        """
        reaction carries reaction_type, which is required.
        """
        self.assertEqual(decode(frame(type="reaction", reaction_type="fire")), Reaction("fire"))
        self.assertRaises(InvalidMessage, decode, frame(type="reaction"))

    def test_ping(self):
        """
        ping has no fields.
        """
        self.assertEqual(decode(frame(type="ping")), Ping())

    def test_unknown_fields_ignored(self):
        """
        Fields the relay does not know are ignored.
        """
        self.assertEqual(decode(frame(type="ping", extra={"a": 1})), Ping())


class RefusalTests(SynchronousTestCase):
    def assertRefused(self, data, error, code):
        with self.assertRaises(error) as raised:
            decode(data)
        self.assertEqual(raised.exception.code, code)
        return raised.exception

    def test_not_json(self):
        """
        Text that is not JSON is invalid_json.
        """
        self.assertRefused(b"hello", InvalidJSON, "invalid_json")

    def test_nan_is_not_json(self):
        """
        NaN and Infinity are not JSON and are refused.
        """
        self.assertRefused(b'{"type":"message","payload":{"x":NaN}}', InvalidJSON, "invalid_json")

    def test_lone_surrogate_refused(self):
        """
        A frame whose text escapes a lone surrogate is not valid JSON text
        and is refused.
        """
        self.assertRefused(b'{"type":"message","payload":{"t":"\\ud800"}}', InvalidJSON, "invalid_json")

    def test_deep_nesting(self):
        """
        Absurdly deep nesting is refused as invalid_json, not a crash.
        """
        self.assertRefused(b"[" * 100000 + b"]" * 100000, InvalidJSON, "invalid_json")

    def test_not_an_object(self):
        """
        JSON that is not an object is invalid_message.
        """
        for data in (b"[]", b"1", b'"register"', b"null"):
            self.assertRefused(data, InvalidMessage, "invalid_message")

    def test_missing_type(self):
        """
        A message without type is invalid_message.
        """
        self.assertRefused(frame(device_id="x"), InvalidMessage, "invalid_message")

    def test_type_not_a_string(self):
        """
        A type that is not a string is invalid_message.
        """
        self.assertRefused(frame(type=["register"]), InvalidMessage, "invalid_message")

    def test_unknown_type(self):
        """
        A type the relay does not know is unknown_type, naming it.
        """
        error = self.assertRefused(frame(type="teleport"), UnknownType, "unknown_type")
        self.assertIn("teleport", error.message)

    def test_wrong_field_types(self):
        """
        A field of the wrong type is invalid_message naming the field.
        """
        cases = [
            (frame(type="register", device_id=["x"]), "device_id"),
            (frame(type="register", crew_code=7), "crew_code"),
            (frame(type="register", device_name={"a": 1}), "device_name"),
            (frame(type="message", payload="hi"), "payload"),
            (frame(type="message", msg_type=3), "msg_type"),
            (frame(type="share_music", artist=["A"]), "artist"),
            (frame(type="reaction", reaction_type=True), "reaction_type"),
        ]
        for data, name in cases:
            error = self.assertRefused(data, InvalidMessage, "invalid_message")
            self.assertIn(name, error.message)

    def test_crew_code_as_the_original_read_it(self):
        """
        A crew code with inner spaces, punctuation or non-ASCII letters is
        accepted as the original relay read it: stripped, then upper-cased
        by str.upper() and nothing else.
        """
        cases = {" a b ": "A B", "home.crew": "HOME.CREW", "café": "CAFÉ", "straße": "STRASSE",
                 "b827eb12ab34": "B827EB12AB34", "\tx\n": "X", "ﬁ": "FI"}
        for sent, code in cases.items():
            self.assertEqual(decode(frame(type="join_crew", crew_code=sent)).crew_code, code, sent)
            self.assertEqual(decode(frame(type="create_crew", crew_code=sent)).crew_code, code, sent)

    def test_crew_code_refused(self):
        """
        A whitespace-only crew code, one over 64 code points once
        upper-cased, or one with a control character is refused with
        invalid_crew_code, naming the rule.
        """
        cases = [("   ", "whitespace"), ("\u3000", "whitespace"), ("X" * 65, "64"),
                 ("ß" * 33, "64"), ("a\x00b", "control"), ("a\nb", "control"), ("\x7f", "control")]
        for kind in ("join_crew", "create_crew", "register"):
            for sent, rule in cases:
                error = self.assertRefused(frame(type=kind, crew_code=sent), InvalidCrewCode, "invalid_crew_code")
                self.assertIn(rule, error.message, (kind, sent))

    def test_crew_code_longest(self):
        """
        A crew code of exactly 64 code points is accepted.
        """
        self.assertEqual(decode(frame(type="join_crew", crew_code="é" * 64)).crew_code, "É" * 64)

    def test_no_crew_code(self):
        """
        An absent, null or empty crew code means no crew on register and
        create_crew, and is invalid_message on join_crew.
        """
        for missing in ({}, {"crew_code": None}, {"crew_code": ""}):
            self.assertIsNone(decode(frame(type="register", **missing)).crew_code)
            self.assertIsNone(decode(frame(type="create_crew", **missing)).crew_code)
            self.assertRefused(frame(type="join_crew", **missing), InvalidMessage, "invalid_message")

    def test_too_long(self):
        """
        Overlong identifiers and names are refused.
        """
        self.assertRefused(frame(type="register", device_id="x" * 65), InvalidMessage, "invalid_message")
        self.assertRefused(frame(type="register", device_name="x" * 65), InvalidMessage, "invalid_message")
        self.assertRefused(frame(type="join_crew", crew_code="X" * 65), InvalidCrewCode, "invalid_crew_code")

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                lambda children: st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=10), children, max_size=4),
                max_leaves=20,
            ).map(lambda v: json.dumps(v).encode()),
            st.fixed_dictionaries(
                {"type": st.sampled_from(sorted(messages._DECODERS) + ["x"])},
                optional={
                    k: st.none() | st.integers() | st.text(max_size=70) | st.lists(st.integers(), max_size=2)
                    | st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)
                    for k in ("device_id", "crew_code", "device_name", "display_name", "msg_type",
                              "payload", "reaction_type", "artist", "track", "album", "spotify_uri")
                },
            ).map(lambda v: json.dumps(v).encode()),
        )
    )
    def test_decode_only_raises_protocol_errors(self, data):
        """
        Whatever the bytes, decode returns a message or raises a
        ProtocolError with a stable code; nothing else escapes.
        """
        try:
            decode(data)
        except ProtocolError as e:
            self.assertIn(e.code, {"invalid_json", "invalid_message", "unknown_type", "invalid_crew_code"})
            self.assertIsInstance(e.message, str)


class EncodeTests(SynchronousTestCase):
    def test_compact_json(self):
        """
        encode gives compact JSON bytes that decode to the same object.
        """
        message = messages.crew_joined("leeloo_1", "ALPHA", 2, ["Ann"])
        payload = encode(message)
        self.assertNotIn(b" ", payload)
        self.assertEqual(json.loads(payload), message)

    def test_non_ascii_survives(self):
        """
        Text beyond ASCII (emoji included) comes out as valid JSON.
        """
        message = {"type": "message", "payload": {"text": "caf\u00e9 \U0001f3b5"}}
        self.assertEqual(json.loads(encode(message)), message)

    def test_lone_surrogate_escaped(self):
        """
        Text with a lone surrogate (which orjson will not write) still
        encodes, as escaped ASCII JSON.
        """
        self.assertEqual(json.loads(encode({"text": "a\ud800b"})), {"text": "a\ud800b"})

    def test_error_shape(self):
        """
        An error message is {"type":"error","error":CODE,"message":TEXT}.
        """
        self.assertEqual(
            InvalidJSON("nope").as_message(),
            {"type": "error", "error": "invalid_json", "message": "nope"},
        )


class ErrorFromTests(SynchronousTestCase):
    """
    L{messages.error_from}: an error frame back into its typed error (what
    the device client raises).
    """

    def test_every_code_comes_back_as_its_class(self):
        """
        Every error the relay sends turns back into the class that made it,
        with its code and message.
        """
        for code, cls in messages.ERRORS.items():
            if cls is messages.RateLimited:
                original = cls("slow down", 3)
            else:
                original = cls(f"about {code}")
            back = messages.error_from(original.as_message())
            self.assertIs(type(back), cls)
            self.assertEqual(back.as_message(), original.as_message())

    def test_rate_limited_keeps_retry_after(self):
        """
        retry_after survives the round trip; a missing or nonsense one
        becomes 1 second, a huge one at most an hour.
        """
        frame = {"type": "error", "error": "rate_limited", "message": "m"}
        self.assertEqual(messages.error_from({**frame, "retry_after": 7}).retry_after, 7)
        self.assertEqual(messages.error_from(frame).retry_after, 1)
        self.assertEqual(messages.error_from({**frame, "retry_after": "soon"}).retry_after, 1)
        self.assertEqual(messages.error_from({**frame, "retry_after": 1e9}).retry_after, 3600)

    def test_unknown_code_keeps_its_code(self):
        """
        A code this version does not know (a newer relay's) is a plain
        ProtocolError carrying that code and the frame's other fields.
        """
        e = messages.error_from({"type": "error", "error": "brand_new", "message": "m", "hint": 2})
        self.assertEqual((type(e), e.code, e.message, e.extra), (ProtocolError, "brand_new", "m", {"hint": 2}))
        self.assertEqual(messages.error_from({"type": "error"}).code, "unknown_error")


# ------------------------------------------------------------ relay -> client

from leeloo.messages import (  # noqa: E402
    CloseCode,
    CrewCreated,
    CrewJoined,
    CrewLimit,
    DeviceAuthFailed,
    ErrorFrame,
    FieldError,
    MalformedCrewCode,
    MemberJoined,
    MemberOffline,
    MusicShared,
    NotInCrew,
    Pong,
    RateLimited,
    Registered,
    RelayedMessage,
    RelayedReaction,
    ReplayTruncated,
    Sent,
    SpotifyAuthComplete,
    SpotifyPairFailed,
    SpotifyPairStarted,
    SpotifySearchResults,
    SpotifyTokens,
    SpotifyForgotten,
    StoreUnavailable,
    UnknownRelayMessage,
    decode_from_relay,
)

# One row per message the relay sends: the typed message and its exact wire
# dict, key order included.
OUTGOING = [
    (Registered("leeloo_1"), {"type": "registered", "device_id": "leeloo_1"}),
    (Registered("leeloo_1", "k3y"), {"type": "registered", "device_id": "leeloo_1", "device_key": "k3y"}),
    (CrewCreated("leeloo_1", "ALPHA"), {"type": "crew_created", "device_id": "leeloo_1", "crew_code": "ALPHA"}),
    (CrewCreated("leeloo_1", "ALPHA", "k3y"),
     {"type": "crew_created", "device_id": "leeloo_1", "crew_code": "ALPHA", "device_key": "k3y"}),
    (CrewJoined("leeloo_1", "ALPHA", 2, ["Bob"]),
     {"type": "crew_joined", "device_id": "leeloo_1", "crew_code": "ALPHA", "crew_members": 2,
      "member_names": ["Bob"]}),
    (CrewJoined("leeloo_1", "ALPHA", 1, [], "k3y"),
     {"type": "crew_joined", "device_id": "leeloo_1", "crew_code": "ALPHA", "crew_members": 1,
      "member_names": [], "device_key": "k3y"}),
    (MemberJoined("leeloo_2", "Bob"), {"type": "member_joined", "device_id": "leeloo_2", "display_name": "Bob"}),
    (MemberOffline("leeloo_2", "Bob"), {"type": "member_offline", "device_id": "leeloo_2", "display_name": "Bob"}),
    (RelayedMessage("leeloo_2", "Bob", "text", {"text": "hi"}),
     {"type": "message", "from_device": "leeloo_2", "from_name": "Bob", "msg_type": "text",
      "payload": {"text": "hi"}}),
    (RelayedMessage("telegram", "Ann", "nudge", {}, 1700000000000, 7, "m7"),
     {"type": "message", "from_device": "telegram", "from_name": "Ann", "msg_type": "nudge", "payload": {},
      "timestamp": 1700000000000, "seq": 7, "id": "m7"}),
    (RelayedMessage("leeloo_2", "Bob", "text", {}, 5, 1, "m1", replayed=True),
     {"type": "message", "from_device": "leeloo_2", "from_name": "Bob", "msg_type": "text", "payload": {},
      "timestamp": 5, "seq": 1, "id": "m1", "replayed": True}),
    (MusicShared("spotify:track:1", "A", "T", "L", "Bob"),
     {"type": "music_shared", "spotify_uri": "spotify:track:1", "artist": "A", "track": "T", "album": "L",
      "pushed_by": "Bob"}),
    (MusicShared(None, None, "T", None, "Bob", 5, 2, "m2"),
     {"type": "music_shared", "spotify_uri": None, "artist": None, "track": "T", "album": None,
      "pushed_by": "Bob", "timestamp": 5, "seq": 2, "id": "m2"}),
    (RelayedReaction("fire", "Bob"), {"type": "reaction", "reaction_type": "fire", "from": "Bob"}),
    (RelayedReaction("love", "Bob", 5, 3, "m3", True),
     {"type": "reaction", "reaction_type": "love", "from": "Bob", "timestamp": 5, "seq": 3, "id": "m3",
      "replayed": True}),
    (Sent("c1", "m4", 4), {"type": "sent", "client_msg_id": "c1", "id": "m4", "seq": 4}),
    (ReplayTruncated(1, 40), {"type": "replay_truncated", "from_seq": 1, "to_seq": 40}),
    (ReplayTruncated(1, 40, "B"), {"type": "replay_truncated", "from_seq": 1, "to_seq": 40, "crew_code": "B"}),
    (Sent("c1", "m4", 4, "B"), {"type": "sent", "client_msg_id": "c1", "id": "m4", "seq": 4, "crew_code": "B"}),
    (MemberJoined("leeloo_2", "Bob", "B"),
     {"type": "member_joined", "device_id": "leeloo_2", "display_name": "Bob", "crew_code": "B"}),
    (MemberOffline("leeloo_2", "Bob", "B"),
     {"type": "member_offline", "device_id": "leeloo_2", "display_name": "Bob", "crew_code": "B"}),
    (RelayedReaction("love", "Bob", 5, 3, "m3", True, "B"),
     {"type": "reaction", "reaction_type": "love", "from": "Bob", "timestamp": 5, "seq": 3, "id": "m3",
      "crew_code": "B", "replayed": True}),
    (messages.CrewLeft("B"), {"type": "crew_left", "crew_code": "B"}),
    (messages.CrewRenamed("C", "B"), {"type": "crew_renamed", "crew_code": "C", "old_crew_code": "B"}),
    (messages.CrewDeleted("B"), {"type": "crew_deleted", "crew_code": "B"}),
    (messages.PrimaryCrew("B"), {"type": "crew_primary", "crew_code": "B"}),
    (messages.CrewList(None, []), {"type": "crews", "primary": None, "crews": []}),
    (messages.CrewList("B", [messages.CrewListing("B", None, 2, ["Bob"])]),
     {"type": "crews", "primary": "B", "crews": [{"crew_code": "B", "crew_name": None, "members_online": 2,
                                                  "member_names": ["Bob"]}]}),
    (Pong(), {"type": "pong"}),
    (SpotifyAuthComplete({"access_token": "at", "refresh_token": "rt", "expires_in": 3600}),
     {"type": "spotify_auth_complete", "tokens": {"access_token": "at", "refresh_token": "rt", "expires_in": 3600}}),
    (SpotifyPairStarted("https://relay.example/pair/ABCDEFGH", "ABCD-EFGH", 600),
     {"type": "spotify_pair", "url": "https://relay.example/pair/ABCDEFGH", "user_code": "ABCD-EFGH",
      "expires_in": 600}),
    (SpotifyPairFailed("expired", "ABCD-EFGH"),
     {"type": "spotify_pair_failed", "reason": "expired", "user_code": "ABCD-EFGH"}),
    (SpotifyPairFailed("denied"), {"type": "spotify_pair_failed", "reason": "denied"}),
    (SpotifyTokens({"access_token": "at", "expires_in": 3600, "refresh_token": "rt"}),
     {"type": "spotify_tokens", "tokens": {"access_token": "at", "expires_in": 3600, "refresh_token": "rt"}}),
    (SpotifySearchResults("hurt by johnny cash", [{"spotify_uri": "spotify:track:1", "track": "Hurt",
                                                   "artist": "Johnny Cash", "album": "American IV",
                                                   "album_art_url": None}]),
     {"type": "spotify_search_results", "query": "hurt by johnny cash",
      "results": [{"spotify_uri": "spotify:track:1", "track": "Hurt", "artist": "Johnny Cash",
                   "album": "American IV", "album_art_url": None}]}),
    (SpotifySearchResults("zzz", []), {"type": "spotify_search_results", "query": "zzz", "results": []}),
    (SpotifyForgotten(), {"type": "spotify_forgotten"}),
    (Sent(None, "m2", 8, "ALPHA"), {"type": "sent", "id": "m2", "seq": 8, "crew_code": "ALPHA"}),
    (ErrorFrame("spotify_refused", "Spotify refused", {"spotify_error": "invalid_grant"}),
     {"type": "error", "error": "spotify_refused", "message": "Spotify refused", "spotify_error": "invalid_grant"}),
    (ErrorFrame("spotify_unavailable", "try again", {"retry": True}),
     {"type": "error", "error": "spotify_unavailable", "message": "try again", "retry": True}),
    (ErrorFrame("invalid_json", "the frame is not valid JSON"),
     {"type": "error", "error": "invalid_json", "message": "the frame is not valid JSON"}),
    (ErrorFrame("rate_limited", "slow down", {"retry_after": 3}),
     {"type": "error", "error": "rate_limited", "message": "slow down", "retry_after": 3}),
    (UnknownRelayMessage("teleported", {"type": "teleported", "where": "moon"}),
     {"type": "teleported", "where": "moon"}),
]


class OutgoingTests(SynchronousTestCase):
    """
    The typed messages the relay sends: their wire dicts, and back.
    """

    def test_wire_dicts(self):
        """
        Each typed message's to_dict() is its exact wire dict: the same
        keys in the same order, optional ones only when present.
        """
        for message, wire in OUTGOING:
            self.assertEqual(list(message.to_dict().items()), list(wire.items()), message)

    def test_round_trip(self):
        """
        to_dict -> encode -> decode_from_relay gives back an equal message,
        for every row.
        """
        for message, _ in OUTGOING:
            self.assertEqual(decode_from_relay(encode(message.to_dict())), message)

    def test_encode_takes_typed_messages(self):
        """
        encode() of a typed message is the encoding of its wire dict.
        """
        for message, wire in OUTGOING:
            self.assertEqual(encode(message), encode(wire))
            self.assertEqual(json.loads(encode(message)), wire)

    def test_type_is_the_wire_type(self):
        """
        Each class's type is its frame's type, and no two share one.
        """
        types = [m.type for m, _ in OUTGOING if not isinstance(m, UnknownRelayMessage)]
        for message, wire in OUTGOING:
            self.assertEqual(message.type, wire["type"])
        self.assertEqual(len(set(types)), len(messages._RELAY_DECODERS))

    def test_secrets_stay_out_of_repr(self):
        """
        A device key or Spotify tokens never show in a message's repr (and
        so never in a log line).
        """
        self.assertNotIn("k3y", repr(Registered("leeloo_1", "k3y")))
        self.assertNotIn("k3y", repr(CrewCreated("leeloo_1", "A", "k3y")))
        self.assertNotIn("k3y", repr(CrewJoined("leeloo_1", "A", 1, [], "k3y")))
        self.assertNotIn("secret", repr(SpotifyAuthComplete({"access_token": "secret"})))

    def test_frozen(self):
        """
        Typed messages are immutable and have no per-instance dict.
        """
        message = Sent("c1", "m1", 1)
        with self.assertRaises(AttributeError):
            message.seq = 2
        self.assertFalse(hasattr(message, "__dict__"))


class BuilderTests(SynchronousTestCase):
    """
    The builders the relay core calls return exactly the dicts they always
    did (now made by the typed messages).
    """

    def assertExactly(self, got, expected):
        self.assertIsInstance(got, dict)
        self.assertEqual(list(got.items()), list(expected.items()))

    def test_registered(self):
        self.assertExactly(messages.registered("leeloo_1"), {"type": "registered", "device_id": "leeloo_1"})
        self.assertExactly(messages.registered("leeloo_1", "k"),
                           {"type": "registered", "device_id": "leeloo_1", "device_key": "k"})

    def test_crew_created(self):
        self.assertExactly(messages.crew_created("leeloo_1", "A"),
                           {"type": "crew_created", "device_id": "leeloo_1", "crew_code": "A"})
        self.assertExactly(messages.crew_created("leeloo_1", "A", device_key="k"),
                           {"type": "crew_created", "device_id": "leeloo_1", "crew_code": "A", "device_key": "k"})

    def test_crew_joined(self):
        names = ["Bob", "Cy"]
        self.assertExactly(messages.crew_joined("leeloo_1", "A", 3, names),
                           {"type": "crew_joined", "device_id": "leeloo_1", "crew_code": "A", "crew_members": 3,
                            "member_names": ["Bob", "Cy"]})
        self.assertExactly(messages.crew_joined("leeloo_1", "A", 1, [], "k"),
                           {"type": "crew_joined", "device_id": "leeloo_1", "crew_code": "A", "crew_members": 1,
                            "member_names": [], "device_key": "k"})

    def test_members(self):
        self.assertExactly(messages.member_joined("leeloo_2", "Bob"),
                           {"type": "member_joined", "device_id": "leeloo_2", "display_name": "Bob"})
        self.assertExactly(messages.member_offline("leeloo_2", "Bob"),
                           {"type": "member_offline", "device_id": "leeloo_2", "display_name": "Bob"})

    def test_crew_message(self):
        payload = {"text": "hi"}
        got = messages.crew_message("leeloo_2", "Bob", "text", payload)
        self.assertExactly(got, {"type": "message", "from_device": "leeloo_2", "from_name": "Bob",
                                 "msg_type": "text", "payload": {"text": "hi"}})
        self.assertIs(got["payload"], payload)

    def test_music_shared(self):
        share = ShareMusic(spotify_uri="spotify:track:1", artist="A", track=None, album="L")
        self.assertExactly(messages.music_shared(share, "Bob"),
                           {"type": "music_shared", "spotify_uri": "spotify:track:1", "artist": "A",
                            "track": None, "album": "L", "pushed_by": "Bob"})

    def test_reaction(self):
        self.assertExactly(messages.reaction("love", "Bob"), {"type": "reaction", "reaction_type": "love",
                                                               "from": "Bob"})

    def test_stamped(self):
        """
        stamped() adds timestamp, seq and id, in that order, after the
        fields (of any dict it is given).
        """
        self.assertExactly(messages.stamped(messages.reaction("love", "Bob"), 5, 2, "m2"),
                           {"type": "reaction", "reaction_type": "love", "from": "Bob", "timestamp": 5,
                            "seq": 2, "id": "m2"})
        self.assertExactly(messages.stamped(messages.crew_message("telegram", "Ann", "text", {}), 5, 3, "m3"),
                           {"type": "message", "from_device": "telegram", "from_name": "Ann", "msg_type": "text",
                            "payload": {}, "timestamp": 5, "seq": 3, "id": "m3"})
        self.assertExactly(messages.stamped({"type": "message", "x": 1}, 5, 4, "m4"),
                           {"type": "message", "x": 1, "timestamp": 5, "seq": 4, "id": "m4"})

    def test_stamped_is_the_typed_stamp(self):
        """
        stamped() of a fan-out's dict is the dict of the typed fan-out's
        stamped().
        """
        for fanout in (RelayedMessage("leeloo_2", "Bob", "text", {"text": "hi"}),
                       MusicShared("spotify:track:1", None, "T", "L", "Bob"), RelayedReaction("love", "Bob")):
            typed = fanout.stamped(5, 2, "m2")
            self.assertEqual((typed.timestamp, typed.seq, typed.id), (5, 2, "m2"))
            self.assertExactly(messages.stamped(fanout.to_dict(), 5, 2, "m2"), typed.to_dict())

    def test_replayed(self):
        """
        replayed() splices "replayed": true into the stored bytes: the frame
        of the typed fan-out with replayed=True.
        """
        stored = encode(messages.stamped(messages.reaction("love", "Bob"), 5, 2, "m2"))
        self.assertEqual(messages.replayed(stored),
                         b'{"type":"reaction","reaction_type":"love","from":"Bob","timestamp":5,"seq":2,'
                         b'"id":"m2","replayed":true}')
        self.assertEqual(messages.replayed(stored), encode(RelayedReaction("love", "Bob", 5, 2, "m2", True)))

    def test_sent_and_truncated(self):
        self.assertExactly(messages.sent("c1", "m1", 1), {"type": "sent", "client_msg_id": "c1", "id": "m1", "seq": 1})
        self.assertExactly(messages.replay_truncated(2, 9), {"type": "replay_truncated", "from_seq": 2, "to_seq": 9})

    def test_pong(self):
        self.assertExactly(messages.pong(), {"type": "pong"})

    def test_spotify_auth_complete(self):
        """
        The tokens are copied into a plain dict.
        """
        tokens = {"access_token": "at", "expires_in": 3600}
        got = messages.spotify_auth_complete(tokens)
        self.assertExactly(got, {"type": "spotify_auth_complete", "tokens": {"access_token": "at",
                                                                             "expires_in": 3600}})
        self.assertIsNot(got["tokens"], tokens)

    def test_error(self):
        self.assertExactly(messages.error("rate_limited", "slow", retry_after=2),
                           {"type": "error", "error": "rate_limited", "message": "slow", "retry_after": 2})
        self.assertExactly(messages.error("invalid_json", "no"), {"type": "error", "error": "invalid_json",
                                                                  "message": "no"})


class DecodeFromRelayTests(SynchronousTestCase):
    """
    L{decode_from_relay}: what the device client reads.
    """

    def test_unknown_type_keeps_the_dict(self):
        """
        A type this version does not know is an UnknownRelayMessage holding
        the whole frame, not an error.
        """
        message = decode_from_relay(b'{"type":"weather","sky":"blue","n":[1]}')
        self.assertEqual(message, UnknownRelayMessage("weather", {"type": "weather", "sky": "blue", "n": [1]}))
        self.assertEqual(message.to_dict(), {"type": "weather", "sky": "blue", "n": [1]})

    def test_unknown_fields_ignored(self):
        """
        Fields this version does not know are ignored on a known type.
        """
        self.assertEqual(decode_from_relay(b'{"type":"pong","extra":1}'), Pong())
        self.assertEqual(decode_from_relay(b'{"type":"registered","device_id":"d","new":true}'), Registered("d"))

    def test_not_json(self):
        """
        A frame that is not JSON is InvalidJSON.
        """
        for data in (b"not json", b'{"type":', b"\xff"):
            with self.assertRaises(InvalidJSON):
                decode_from_relay(data)

    def test_not_an_object_or_no_type(self):
        """
        JSON that is not an object, or has no string type, is
        InvalidMessage.
        """
        for data in (b"[1]", b'"pong"', b"{}", b'{"type":7}', b'{"type":null}'):
            with self.assertRaises(InvalidMessage, msg=data):
                decode_from_relay(data)

    def test_wrong_fields(self):
        """
        A known type with a required field missing or of the wrong type is
        InvalidMessage naming the field.
        """
        cases = [
            ({"type": "registered"}, "device_id"),
            ({"type": "crew_joined", "device_id": "d", "crew_code": "A", "crew_members": "2",
              "member_names": []}, "crew_members"),
            ({"type": "crew_joined", "device_id": "d", "crew_code": "A", "crew_members": 2,
              "member_names": [1]}, "member_names"),
            ({"type": "message", "from_device": "d", "from_name": "n", "msg_type": "text", "payload": []},
             "payload"),
            ({"type": "message", "from_device": "d", "from_name": "n", "msg_type": "text", "payload": {},
              "seq": True}, "seq"),
            ({"type": "reaction", "reaction_type": "love"}, "from"),
            ({"type": "sent", "client_msg_id": "c", "id": "m", "seq": 1.5}, "seq"),
            ({"type": "spotify_auth_complete", "tokens": "t"}, "tokens"),
            ({"type": "error", "error": "x"}, "message"),
        ]
        for obj, name in cases:
            with self.assertRaises(InvalidMessage, msg=obj) as raised:
                decode_from_relay(json.dumps(obj))
            self.assertIn(name, raised.exception.message, obj)

    def test_error_frame_back_to_its_exception(self):
        """
        An error frame's to_exception() is the typed error that sent it,
        and ProtocolError.as_frame() is the frame of as_message().
        """
        original = RateLimited("slow down", 2.2)
        self.assertEqual(original.as_frame().to_dict(), original.as_message())
        back = decode_from_relay(encode(original.as_frame())).to_exception()
        self.assertEqual((type(back), back.retry_after, back.message), (RateLimited, 3, "slow down"))

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=100),
            st.fixed_dictionaries(
                {"type": st.sampled_from(sorted(messages._RELAY_DECODERS) + ["x"])},
                optional={
                    k: st.none() | st.booleans() | st.integers() | st.text(max_size=5)
                    | st.lists(st.text(max_size=3), max_size=2)
                    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
                    for k in ("device_id", "crew_code", "crew_members", "member_names", "display_name",
                              "from_device", "from_name", "msg_type", "payload", "timestamp", "seq", "id",
                              "replayed", "pushed_by", "track", "reaction_type", "from", "client_msg_id",
                              "from_seq", "to_seq", "tokens", "error", "message", "device_key")
                },
            ).map(lambda v: json.dumps(v).encode()),
        )
    )
    def test_only_protocol_errors(self, data):
        """
        Whatever the relay's bytes, decode_from_relay gives a message that
        encodes back to an equal one, or raises invalid_json or
        invalid_message; nothing else escapes.
        """
        try:
            message = decode_from_relay(data)
        except ProtocolError as e:
            self.assertIn(e.code, {"invalid_json", "invalid_message"})
            return
        self.assertEqual(decode_from_relay(encode(message)), message)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


class ErrorAttributeTests(SynchronousTestCase):
    """
    Each error carries its code, the close that follows it and how the bot
    API answers it, in one place.
    """

    def test_every_code_is_in_errors(self):
        """
        Every ProtocolError class's code is in ERRORS, mapped to that class
        or the parent it shares the code with; crew_limit among them.
        """
        for cls in _subclasses(ProtocolError):
            self.assertIn(cls.code, messages.ERRORS, cls)
            self.assertTrue(issubclass(cls, messages.ERRORS[cls.code]), cls)
        self.assertIs(messages.ERRORS["crew_limit"], CrewLimit)
        self.assertIs(type(messages.error_from(CrewLimit("full").as_message())), CrewLimit)

    def test_close_codes(self):
        """
        Rate limits and failed device keys are strikes that end in 4029;
        no other error closes.
        """
        closing = {cls: cls.close_code for cls in _subclasses(ProtocolError) if cls.close_code is not None}
        self.assertEqual(closing, {RateLimited: 4029, DeviceAuthFailed: 4029})
        self.assertIsNone(ProtocolError.close_code)

    def test_http_answers(self):
        """
        The bot API's status, error and body fields for each error: 429
        with retry_after, 503 for store_unavailable and crew_limit, 404
        crew_not_found for an unknown crew (400 invalid_crew_code for a
        malformed one), 403 not_in_crew, 400 and its own code otherwise.
        """
        rows = [
            (RateLimited("slow", 2), 429, "rate_limited", "slow", {"retry_after": 2}),
            (StoreUnavailable("down", client_msg_id="c"), 503, "store_unavailable", "down", {}),
            (CrewLimit("full"), 503, "crew_limit", "full", {}),
            (InvalidCrewCode("Crew X not found"), 404, "crew_not_found", "Crew X not found", {}),
            (MalformedCrewCode("bad"), 400, "invalid_crew_code", "bad", {}),
            (NotInCrew("join"), 403, "not_in_crew", "join", {}),
            (DeviceAuthFailed("key"), 400, "device_auth_failed", "key", {}),
            (InvalidMessage("odd"), 400, "invalid_message", "odd", {}),
            (FieldError("display_name", "required", "display_name is required"), 400, "display_name required",
             None, {}),
        ]
        for e, status, code, message, extra in rows:
            self.assertEqual((e.http_status, e.http_code, e.http_message, e.http_extra),
                             (status, code, message, extra), e)

    def test_close_code_table(self):
        """
        The close codes the relay documents, each under one name (also as
        CLOSE_<NAME>); in a log line each reads as its number.
        """
        self.assertEqual([(c.name, int(c)) for c in CloseCode],
                         [("GOING_AWAY", 1001), ("MESSAGE_TOO_BIG", 1009), ("INTERNAL_ERROR", 1011),
                          ("REPLACED", 4001), ("OPERATOR", 4004), ("BIND_TIMEOUT", 4008), ("ABUSE", 4029)])
        for c in CloseCode:
            self.assertIs(getattr(messages, "CLOSE_" + c.name), c)
        self.assertEqual((str(CloseCode.ABUSE), f"{CloseCode.ABUSE}"), ("4029", "4029"))


class ValidatorTests(SynchronousTestCase):
    """
    The public field validators frames and the bot API share.
    """

    def assertFieldError(self, call, field, problem, message):
        with self.assertRaises(FieldError) as raised:
            call()
        e = raised.exception
        self.assertEqual((e.code, e.field, e.problem, e.message, e.http_code),
                         ("invalid_message", field, problem, message, f"{field} {problem}"))

    def test_string_field(self):
        """
        A string field is stripped; absent, null, empty or blank is None,
        or "required"; not a string, or over the limit, is refused.
        """
        self.assertEqual(messages.string_field({"n": "  Ann "}, "n", 5), "Ann")
        for obj in ({}, {"n": None}, {"n": ""}, {"n": "  "}):
            self.assertIsNone(messages.string_field(obj, "n", 5))
            self.assertFieldError(lambda: messages.string_field(obj, "n", 5, required=True),
                                  "n", "required", "n is required")
        self.assertFieldError(lambda: messages.string_field({"n": 7}, "n", 5), "n", "must be a string",
                              "n must be a string")
        self.assertFieldError(lambda: messages.string_field({"n": "x" * 6}, "n", 5), "n", "too long",
                              "n must be at most 5 characters")

    def test_string_field_default(self):
        """
        The default stands in for an absent key only, not a null one.
        """
        self.assertEqual(messages.string_field({}, "t", 5, default="text"), "text")
        self.assertIsNone(messages.string_field({"t": None}, "t", 5, default="text"))

    def test_object_field(self):
        self.assertEqual(messages.object_field({}, "payload"), {})
        self.assertEqual(messages.object_field({"payload": None}, "payload"), {})
        self.assertEqual(messages.object_field({"payload": {"a": 1}}, "payload"), {"a": 1})
        self.assertFieldError(lambda: messages.object_field({"payload": []}, "payload"), "payload",
                              "must be an object", "payload must be an object")

    def test_crew_code_field(self):
        """
        A crew code is normalized; missing is None or "required"; not a
        string is a FieldError; a malformed one is MalformedCrewCode
        (invalid_crew_code).
        """
        self.assertEqual(messages.crew_code_field({"crew_code": " alpha "}), "ALPHA")
        self.assertIsNone(messages.crew_code_field({"crew_code": ""}))
        self.assertFieldError(lambda: messages.crew_code_field({}, required=True), "crew_code", "required",
                              "crew_code is required")
        self.assertFieldError(lambda: messages.crew_code_field({"crew_code": 7}), "crew_code",
                              "must be a string", "crew_code must be a string")
        with self.assertRaises(MalformedCrewCode) as raised:
            messages.crew_code_field({"crew_code": "a\x00"})
        self.assertEqual(raised.exception.code, "invalid_crew_code")
