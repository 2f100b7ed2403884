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
