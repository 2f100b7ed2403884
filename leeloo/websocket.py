"""
The WebSocket adapter: Autobahn frames in, L{leeloo.relay.Relay} calls out.

The protocol implements L{IPeer} for its session; it holds no crew logic.
It also guards the transport: who may open a WebSocket (the browser origin,
the connection caps per client address and in total) and how much a reader
that does not keep up may make the relay hold for it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from types import FunctionType
from typing import Any

import autobahn.twisted.websocket
import autobahn.util
import autobahn.websocket.protocol
import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PERMESSAGE_COMPRESSION_EXTENSION
from autobahn.twisted.util import create_transport_details, peer2str
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol, parseHttpHeader
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.logger import Logger
from zope.interface import implementer

from leeloo.access import TOO_MANY_CONNECTIONS, TOO_MANY_FROM_ADDRESS, ConnectionCaps, OriginPolicy, TrustedProxies
from leeloo.pages import SECURITY_HEADERS, reason_phrase
from leeloo.core.peer import IPeer, Outgoing
from leeloo.core.sessions import Session
from leeloo.messages import CLOSE_INTERNAL_ERROR, ErrorFrame
from leeloo.relay import Relay
from leeloo.timers import TimerWheel, cancel_close_timer

# Module-level: Autobahn's classes use their own ``log`` (a txaio logger that
# drops debug events cheaply); overriding it would emit every frame's debug.
_log = Logger()

# Autobahn formats the arguments of its debug lines before the logger drops
# them, and names code in them with hltype(), which looks the code up with
# inspect and colours each part with click.style: twelve calls per
# connection, a tenth of a handshake's CPU.  Here colours are off and code
# is named by its qualified name alone.  (A private flag of autobahn.util,
# and the hltype its two modules imported: test_websocket's
# AutobahnColourTests fail if either changes.)
autobahn.util._HAS_CLICK = False


def _code_name(obj: Any) -> str:
    return f"<{getattr(obj, '__qualname__', 'unknown')}>"


autobahn.websocket.protocol.hltype = autobahn.twisted.websocket.hltype = _code_name

MiB = 1024 * 1024

REFUSED_ORIGIN = "origin"

# What Autobahn keeps of the opening handshake once it is done with it.
_HANDSHAKE_LEFTOVERS = (
    "http_request_data", "http_response_data", "http_headers", "http_status_line",
    "http_request_uri", "http_request_path", "http_request_params", "http_request_host",
    "websocket_origin", "websocket_protocols", "websocket_extensions", "_wskey",
    # (The server's list is only ever written: compression is refused.)
    "websocket_extensions_in_use",
)


# Attributes Autobahn sets on every connection that, once a device is
# registered and idle, hold these values (immutable ones only): the
# protocol class holds them instead, so an idle connection's __dict__ holds
# only what is its own (a third of its size).  Autobahn setting one again
# puts it back.  (Names of Autobahn's, pinned by test_websocket's
# CompactTests.)
_IDLE_DEFAULTS = {
    **dict.fromkeys((
        "wasNotCleanReason", "localCloseCode", "localCloseReason", "remoteCloseCode", "remoteCloseReason",
        "openHandshakeTimeoutCall", "closeHandshakeTimeoutCall", "autoPingTimeoutCall", "autoPingPending",
        "autoPingPendingSent", "websocket_protocol_in_use", "current_frame", "message_data", "frame_data",
        "_perMessageCompress", "trackedTimings", "handshake_guard", *_HANDSHAKE_LEFTOVERS), None),
    **dict.fromkeys((
        "triggered", "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded", "closedByMe",
        "failedByMe", "droppedByMe", "wasClean", "wasServerConnectionDropTimeout", "wasOpenHandshakeTimeout",
        "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile", "inside_message",
        "_isMessageCompressed", "message_is_binary"), False),
    "utf8validateIncomingCurrentMessage": True,
    "autoPingPendingSeq": 0,
    "send_state": 0,
    "websocket_version": 13,
    "data": b"",
}


# Set when a message or frame begins, stale once it has ended.
_OPEN = WebSocketServerProtocol.STATE_OPEN

_BETWEEN_MESSAGES = ("current_frame_masker", "frame_length", "message_data_total_length", "utf8validateLast",
                     "_fragments")


# A Sec-WebSocket-Key as Autobahn accepts it: 16 bytes in base64.
_WEBSOCKET_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")
# Characters of a request URI that Autobahn's urlparse would split off
# (query, fragment, path parameters): such a URI takes Autobahn's path.
_URI_SPLITS = frozenset("?#;")
def peer_string(transport: Any, address: Any = None) -> str:
    """
    Autobahn's peer descriptor of C{transport} (its peer2str:
    C{tcp4:HOST:PORT}, C{tcp6:HOST:PORT}, ...), from C{address}, the
    transport's getPeer() already asked for, when it is a TCP address.
    Pinned by test_websocket's PeerStringTests.
    """
    kind = type(address)
    if kind is IPv4Address:
        return f"tcp4:{address.host}:{address.port}"
    if kind is IPv6Address:
        return f"tcp6:{address.host}:{address.port}"
    return peer2str(transport)


# A request head as devices send it, in one regular expression: a GET
# request line, then header lines each a token, a colon and a value of the
# characters Autobahn's strict parseHttpHeader allows (RFC 9110: VCHAR,
# obs-text, SP, HTAB), each line ended by CRLF alone.  A head this matches
# parses as parseHttpHeader parses it (pinned by test_websocket's
# DeviceHeadTests); any other is given to parseHttpHeader.
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELD_VALUE = r"[^\x00-\x08\x0a-\x1f\x7f]"
_DEVICE_HEAD = re.compile(rf"(GET [^\x00-\x20\x7f]+ HTTP/1\.1)\r\n((?:{_TOKEN}:{_FIELD_VALUE}*\r\n)*)\r\n")
# One header line of such a head: its name and its value.
_HEADER_LINE = re.compile(rf"({_TOKEN}):({_FIELD_VALUE}*)\r\n")


def device_head(head: bytes) -> tuple[str, dict[str, str]] | None:
    """
    The request line and headers (names in lower case) of C{head}, a
    request head up to and including its blank line, as parseHttpHeader
    gives them, if it is a GET request with each header once and nothing
    parseHttpHeader would refuse; None for any other (parseHttpHeader's to
    parse, or refuse).  For the handshake devices send, in a third of its
    time.
    """
    match = _DEVICE_HEAD.fullmatch(head.decode("iso-8859-1"))
    if match is None:
        return None
    lines = _HEADER_LINE.findall(match.group(2))
    # (Without the spaces and tabs around a value, as parseHttpHeader.)
    headers = {name.lower(): value.strip(" \t") for name, value in lines}
    if len(headers) != len(lines):
        return None
    return match.group(1), headers


class _LazyValidator:
    """
    A connection's UTF-8 validator, made the first time Autobahn's frame
    parser asks for it (a text message in several frames; devices send
    whole ones): a validator per idle connection would cost its allocation
    and its memory.
    """

    def __get__(self, protocol: Any, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        validator = protocol.__dict__["utf8validator"] = Utf8Validator()
        return validator


class _LazyFuture:
    """
    Autobahn's C{is_open} or C{is_closed} future (its
    WebSocketProtocol.__init__ makes both for every connection), made the
    first time it is asked for: Autobahn asks for C{is_closed} when the
    connection closes, and nothing of the relay's asks for either, so an
    idle connection holds neither (two Deferreds and their lists, a
    sixth of what the collector tracks per device).  C{is_open} asked for
    once the short handshake opened the connection (C{_was_opened}) is one
    that has fired, as Autobahn's would have.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, protocol: Any, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        future = txaio.create_future()
        if self.name == "is_open" and protocol._was_opened:
            txaio.resolve(future, None)
        protocol.__dict__[self.name] = future
        return future


class _LazyTransportDetails:
    """
    Autobahn's description of the transport (C{create_transport_details},
    which its connectionMade makes for every connection), made the first
    time it is asked for: it reads the process and thread ids (two system
    calls) and the TLS state, and nothing of the relay's reads it, so a
    reconnect storm makes none.  Asked for again after
    L{RelayServerProtocol._compact} let go of it, it is made again from the
    transport; with no transport it is C{None}, as Autobahn's placeholder
    holds none.  Pinned by test_websocket's ConnectionMadeTests.
    """

    def __get__(self, protocol: Any, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        transport = protocol.transport
        if transport is None:
            return None
        details = protocol.__dict__["_transport_details"] = create_transport_details(transport, protocol.is_server)
        return details


class _SendQueue(list):
    """
    Autobahn's queue of chopped or synchronous sends (it uses C{append},
    C{popleft} and C{len}), as a list: an empty deque costs 760 bytes per
    connection, an empty list 56, and the relay never queues there.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


@dataclass(frozen=True)
class WebSocketLimits:
    """
    Every limit Autobahn applies, set explicitly (its defaults are open),
    and the relay's own on connections and unsent bytes.
    """

    max_message_size: int = 64 * 1024
    open_handshake_timeout: float = 10.0
    close_handshake_timeout: float = 5.0
    auto_ping_interval: float = 25.0
    auto_ping_timeout: float = 20.0
    max_connections: int = 20000
    max_connections_per_address: int = 256
    max_unsent: int = 1 * MiB
    max_fragments: int = 64

    def describe(self) -> str:
        return (
            f"max message {self.max_message_size} bytes in at most {self.max_fragments} frames, "
            f"open handshake {self.open_handshake_timeout:g}s, "
            f"close handshake {self.close_handshake_timeout:g}s, "
            f"ping every {self.auto_ping_interval:g}s (timeout {self.auto_ping_timeout:g}s), "
            f"at most {self.max_connections} connections and "
            f"{self.max_connections_per_address} per client address, "
            f"a reader that falls {self.max_unsent} bytes behind is disconnected"
        )


def _class_attribute(value: Any) -> Any:
    """
    C{value} as a class attribute that reads back as C{value} from an
    instance (a function would become a method).
    """
    return staticmethod(value) if isinstance(value, FunctionType) else value


@implementer(IPeer, IPushProducer)
class RelayServerProtocol(WebSocketServerProtocol):
    """
    One device's WebSocket: translates frames to and from its L{Session}.

    Once upgraded it is its transport's producer, in place of twisted.web's
    channel: while the transport says its buffer is full (L{pauseProducing})
    it counts what is sent, and a reader that falls C{max_unsent} bytes
    behind is disconnected rather than buffered for.

    It also tells the relay what the device proved it received: each ping
    it sends (Autobahn's keepalive sends them through L{sendPing}) notes
    what had been sent before it, and the pong that answers it proves that
    much; so does the device's answer to a close the relay started.
    """

    session: Session | None = None
    # The client address, counted against the caps once admitted.
    address: str | None = None
    _admitted = False
    # Its ticket in the cluster's counts, for a client a trusted proxy
    # forwards (leeloo.sharedlimits; the gate counts the others).
    _ticket: Any = None
    # Bytes sent since the transport paused us; None while it is not paused.
    _unsent: float | None = None
    # The socket of a plain TCP transport, which frames go straight to.
    _socket = None
    # Frames of the message being received so far.
    _fragments = 0
    # The site's connection gate and the address it counted this
    # connection against, handed over by the HTTP channel at the upgrade:
    # released when the connection ends.
    gate_slot: tuple | None = None
    # An upgrade the HTTP channel routed past twisted.web: its request
    # deadline and head limits (leeloo.web.HandshakeGuard), until the
    # handshake is done.
    handshake_guard: Any = None
    _head_refused = False
    # The client's address, as the HTTP channel that handed the connection
    # over had it from the transport (None: ask the transport).
    peer_address: Any = None

    # The payload of the last ping sent, and the relay's delivery mark then.
    _ping_payload: bytes | None = None
    _ping_mark: Any = None
    # False until the first message; None once it is handled and the
    # connection's attributes are to be compacted (L{_compact}); then True.
    _compacted: bool | None = False
    # What Autobahn keeps between messages: the last frame's masker, length
    # and UTF-8 state, the last message's length; and its description of
    # the transport (made when asked for).
    current_frame_masker = None
    frame_length = 0
    message_data_total_length = 0
    utf8validateLast = (True, True, 0, 0)
    _transport_details = _LazyTransportDetails()
    is_open = _LazyFuture()
    is_closed = _LazyFuture()
    # True once the short handshake opened the connection (L{is_open}).
    _was_opened = False
    # The relay's delivery mark when it sent its close.
    _close_mark: Any = None

    utf8validator = _LazyValidator()
    # True while L{take_over} makes the connection.
    _taking_over = False
    # Set by Autobahn's _connectionMade, and once open (L{_connectionMade}).
    autoPingPendingCall = None

    def __init__(self) -> None:
        """
        Autobahn's WebSocketProtocol.__init__ without its two futures
        (L{_LazyFuture}) and its placeholder transport description (the
        class's C{None} until L{connectionMade} describes the transport).
        Pinned by test_websocket's LazyFutureTests.
        """
        self.set_valid_events(["message"])

    def connectionMade(self) -> None:
        # Autobahn's (autobahn.twisted.websocket), without its debug line.
        transport = self.transport
        # (The rest of Autobahn's transport description is made when asked
        # for: _LazyTransportDetails.)
        self.peer = peer_string(transport, self.peer_address)
        # twisted.web's channel, which hands the connection over, has set
        # TCP_NODELAY on a TCP transport already (one system call less a
        # connection; pinned by ConnectionMadeTests).
        if not (self._taking_over and self.tcpNoDelay and ITCPTransport.providedBy(transport)):
            try:
                transport.setTcpNoDelay(self.tcpNoDelay)
            except Exception:
                # As Autobahn: not every transport has it (a Unix socket).
                pass
        self._connectionMade()
        if isinstance(self.transport, tcp.Connection):
            self._socket = self.transport.socket
        # twisted.web's HTTPChannel registered itself as the transport's
        # producer and stays registered after the upgrade (with it, the
        # request it parsed).  The WebSocket is the producer now.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self, True)

    def _connectionMade(self) -> None:
        """
        Autobahn's WebSocketServerProtocol._connectionMade and
        WebSocketProtocol._connectionMade, for what the relay's connections
        are (a server's, every option on the class): the state that is not
        the class's already (L{_IDLE_DEFAULTS}), with no debug line (whose
        arguments Autobahn formats for every connection), no copy of the
        options, a list for the send queue and the UTF-8 validator made
        when first used.  Pinned by test_websocket's ConnectionMadeTests,
        which compare it with Autobahn's.
        """
        for name in self.CONFIG_ATTRS:
            if not hasattr(self, name):
                setattr(self, name, getattr(self.factory, name))
        # (Autobahn's setTrackTimings makes no Timings for the option the
        # class has already: trackedTimings stays the class's None.)
        self.trafficStats = TrafficStats()
        self.state = WebSocketProtocol.STATE_CONNECTING
        self.send_queue = _SendQueue()
        if self.openHandshakeTimeout > 0 and not self._taking_over:
            self._start_open_timer()
        self.factory.countConnections += 1

    def _start_open_timer(self) -> None:
        self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
            self.openHandshakeTimeout, self.onOpenHandshakeTimeout)

    def take_over(self, transport: Any, data: bytes) -> None:
        """
        Take the connection on C{transport} over from the HTTP channel
        that read C{data}, its first bytes: L{makeConnection}, then
        L{dataReceived}.  Autobahn's opening handshake timeout is set once
        those are read, and only if they did not open the connection (a
        device's whole handshake comes at once: the timer would be set and
        cancelled in one call), from the same moment.
        """
        self._taking_over = True
        try:
            self.makeConnection(transport)
        finally:
            del self._taking_over
        self.dataReceived(data)
        if self.state != _OPEN and self.openHandshakeTimeout > 0 and self.openHandshakeTimeoutCall is None:
            self._start_open_timer()

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own dataReceived formats a debug line's arguments (with
        # terminal colours) for every read before the logger drops it: about
        # 6% of the relay's CPU under load.  Go straight to the protocol.
        if self.handshake_guard is not None and not self._head_allowed(data):
            return
        if self.state == _OPEN and not self.data and not self.inside_message and self.current_frame is None:
            data = self._whole_messages(data)
        if data:
            self._dataReceived(data)
        if self._compacted is None:
            self._compact()

    def _whole_messages(self, data: bytes) -> bytes:
        """
        Hand the relay each whole message at the start of C{data} that is
        a single masked text or binary frame within the size limit (what
        devices send), as Autobahn's frame parser would, and return the
        rest for that parser: anything else (a control frame, a fragment,
        a partial frame, invalid UTF-8, a protocol error) and everything
        after it.  Autobahn's parser costs a quarter of the relay's CPU per
        message, most of it the generality of fragments, extensions and
        streaming.  Autobahn's state it reads and sets (the state, data,
        inside_message, current_frame, the auto-ping timeout and
        _onMessage) is pinned by test_websocket's WholeMessageTests.
        """
        limit = self.maxMessagePayloadSize
        while len(data) >= 6:
            first = data[0]
            if first != 0x81 and first != 0x82:
                break
            length = data[1] ^ 0x80
            if length < 126:
                start = 6
            elif length == 126:
                length = int.from_bytes(data[2:4], "big")
                if length < 126:
                    break
                start = 8
            else:
                # Unmasked (Autobahn fails it), or 64-bit lengths.
                break
            end = start + length
            if len(data) < end or 0 < limit < length:
                break
            mask = data[start - 4:start]
            payload = (int.from_bytes(data[start:end], "little")
                       ^ int.from_bytes(mask * ((length >> 2) + 1), "little")).to_bytes(length + 4, "little")[:length]
            is_binary = first == 0x82
            if not is_binary and not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    break
            data = data[end:]
            if self.autoPingTimeoutCall is not None and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            self._onMessage(payload, is_binary)
            if self.state != _OPEN:
                break
        return data

    def _compact(self) -> None:
        """
        Once the first message is handled (and outside Autobahn's own
        calls, which may still read what they set): drop the attributes
        that hold their idle values (L{_IDLE_DEFAULTS}, which the class
        holds), and the transport description and last frame masker
        Autobahn keeps, into a __dict__ sized for what is left.
        """
        self._compacted = True
        d = self.__dict__
        if d.get("current_frame") is None and not d.get("inside_message"):
            # Between messages: what the last message and frame left (each
            # is set afresh when the next one begins).
            for name in _BETWEEN_MESSAGES:
                d.pop(name, None)
        d.pop("_transport_details", None)
        if self._listeners is None:
            # Autobahn's event listeners (ObservableMixin): the relay adds
            # none, so the events they would check (and L{onMessageEnd}
            # fires none) need no list and dict of their own.
            d.pop("_valid_events", None)
            d.pop("_results", None)
        # The idle values are singletons (None, False, True, b"") or small
        # ints, which CPython keeps one of: "is" tells them.
        idle = _IDLE_DEFAULTS.get
        self.__dict__ = {name: value for name, value in d.items() if idle(name, d) is not value}

    def _head_allowed(self, data: bytes) -> bool:
        """
        Whether the opening handshake may read C{data}: Autobahn buffers a
        head of any size, so past the guard's limits it is answered (431)
        and nothing more is read, as twisted.web does with a request.
        """
        if self._head_refused:
            return False
        guard = self.handshake_guard
        head = self.data + data
        end = head.find(b"\r\n\r\n")
        size = len(head) if end < 0 else end
        lines = head.count(b"\r\n", 0, size)
        if size - 2 * lines <= guard.max_size and lines < guard.max_lines:
            return True
        self._head_refused = True
        self.transport.write(guard.refusal)
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            # The deadline aborts the connection if the client does not
            # close its side.
            half_close()
        else:
            self.transport.loseConnection()
        return False

    def processHandshake(self) -> None:
        if not self._plain_handshake():
            super().processHandshake()

    def _plain_handshake(self) -> bool:
        """
        Answer an opening handshake as devices send it (a request line
        C{GET <path> HTTP/1.1} with no query, each header once, version
        13, no Origin, no subprotocol, extensions offered only as the relay
        refuses them) as Autobahn's processHandshake and succeedHandshake
        would, without their generality: the URL parse, the Deferreds
        around onConnect, the debug lines.  Return False, having changed
        nothing, for anything else (an incomplete head too), which
        Autobahn's path takes with its errors.  Autobahn's state it reads
        and sets is pinned by test_websocket's PlainHandshakeTests, which
        compare both paths for any request.
        """
        data = self.data
        end = data.find(b"\r\n\r\n")
        # (The factory speaks version 13 alone and leaves maxConnections
        # to its own caps: both are Autobahn's checks passed.)
        if end < 0 or self._wskey is not None:
            return False
        head = data[:end + 4]
        parsed = device_head(head)
        if parsed is None:
            try:
                status, headers, counts = parseHttpHeader(head)
            except Exception:
                return False
            if max(counts.values(), default=2) > 1:
                return False
        else:
            status, headers = parsed
        parts = status.split()
        if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
            return False
        uri = parts[1]
        if uri[0] != "/" or uri[1:2] == "/" or not _URI_SPLITS.isdisjoint(uri):
            return False
        host = headers.get("host")
        key = headers.get("sec-websocket-key")
        upgrade = headers.get("upgrade")
        connection = headers.get("connection")
        offers = headers.get("sec-websocket-extensions")
        extensions = [] if offers is None else self.factory.refused_offers(self, offers)
        if (host is None or key is None or upgrade is None or connection is None
                or headers.get("sec-websocket-version") != "13"
                or "origin" in headers or "sec-websocket-protocol" in headers
                or (self.trustXForwardedFor and "x-forwarded-for" in headers)
                or _WEBSOCKET_KEY.fullmatch(key) is None
                or not (upgrade.lower() == "websocket"
                        or any(u.strip().lower() == "websocket" for u in upgrade.split(",")))
                or not (connection.lower() == "upgrade"
                        or any(c.strip().lower() == "upgrade" for c in connection.split(",")))
                or extensions is None):
            return False
        if ":" in host and not host.endswith("]"):
            host, port = host.rsplit(":", 1)
            try:
                int(port.strip())
            except ValueError:
                return False
            if self.factory.externalPort:
                return False
        # The request is one Autobahn would take: from here on, as it does.
        self.data = data[end + 4:]
        self._wskey = key
        request = ConnectionRequest(self.peer, headers, host, uri, {}, 13, "", [], extensions)
        try:
            accepted = self.onConnect(request)
        except ConnectionDeny as deny:
            self.failHandshake(deny.reason, deny.code)
            return True
        except Exception:
            self._connect_failed(txaio.create_failure())
            return True
        if accepted is not None:
            # Autobahn's way for the rest: a Deferred (the cluster's count)
            # or a subprotocol (none is offered: refused there).
            self.websocket_protocols = []
            self.websocket_extensions = extensions
            txaio.add_callbacks(txaio.as_future(lambda: accepted), self.succeedHandshake, self._connect_failed)
            return True
        factory = self.factory
        response = factory.upgrade_response_head()
        digest = hashlib.sha1(key.encode("ascii") + WebSocketProtocol._WS_MAGIC).digest()
        response = b"%sSec-WebSocket-Accept: %s\r\n\r\n" % (response, base64.b64encode(digest))
        if self.send_queue or self.logOctets:
            self.sendData(response)
        else:
            # What sendData does, but to the socket at once (L{_write}):
            # Twisted would buffer it for its next turn, two epoll_ctl()
            # calls and a turn more per connection.
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(response)
            self._write(response)
        self.state = _OPEN
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        # (inside_message and current_frame: the class's False and None
        # until the first frame.)
        if self.autoPingInterval:
            self.autoPingPendingCall = factory._batched_timer.call_later(self.autoPingInterval, self._sendAutoPing)
        if self.trackedTimings:
            self.trackedTimings.track("onOpen")
        self._onOpen()
        # Autobahn resolves is_open here; made later, it reads as resolved.
        is_open = self.__dict__.get("is_open")
        if is_open is not None:
            txaio.resolve(is_open, None)
        else:
            self._was_opened = True
        if self.data:
            self.consumeData()
        return True

    def _connect_failed(self, failure: Any) -> None:
        """
        onConnect refused the connection (ConnectionDeny) or failed: fail
        the handshake as Autobahn's processHandshake does.
        """
        if isinstance(failure.value, ConnectionDeny):
            self.failHandshake(failure.value.reason, failure.value.code)
            return
        self.log.warn("Unexpected exception in onConnect ['{err.value}']", err=failure)
        self.log.warn("{tb}", tb=txaio.failure_format_traceback(failure))
        self.failHandshake(f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR)

    def _handshake_done(self) -> None:
        guard, self.handshake_guard = self.handshake_guard, None
        if guard is not None:
            guard.done()

    def onConnect(self, request) -> None:
        factory = self.factory
        if not factory.origins.allows(request.origin, request.headers.get("host")):
            factory.refused[REFUSED_ORIGIN] += 1
            raise ConnectionDeny(403, "Origin Not Allowed")
        peer = getattr(self.peer_address or self.transport.getPeer(), "host", None)
        address = factory.proxies.client_address(peer, request.headers.get("x-forwarded-for"))
        factory.admit(address)
        self.address = address
        self._admitted = True
        if factory.shared is not None and address is not None and address != peer:
            # Forwarded by a trusted proxy, so the gate did not count it:
            # count it against the cluster before the handshake is answered.
            self._ticket, verdict = factory.shared.admit(address, factory.caps.max_per_address)
            if verdict is not None:
                return verdict.addCallback(self._cluster_verdict)
        return None

    def _cluster_verdict(self, refused: tuple[str, float] | None) -> None:
        """
        The cluster's answer for this forwarded client: go on with the
        handshake, or refuse it as L{RelayServerFactory.admit} would (also
        when the connection closed meanwhile: nothing is left to open).
        """
        if refused is None and self._admitted:
            return
        if self._admitted:
            self._admitted = False
            self.factory.release(self.address)
        if refused is not None:
            self._ticket = None
            self.factory.refused_by_cluster(self.address)
        raise ConnectionDeny(503, "Too Many Connections From Your Address")

    def _onOpen(self) -> None:
        """
        Autobahn's, which first sets the TLS channel id and peer
        certificate on the transport description, now that TLS is up: a
        description not made yet (L{_LazyTransportDetails}) reads them when
        it is made, so it is not made here.  Pinned by test_websocket's
        ConnectionMadeTests.
        """
        if "_transport_details" in self.__dict__:
            super()._onOpen()
        else:
            self.onOpen()

    def onOpen(self) -> None:
        if self.handshake_guard is not None:
            self._handshake_done()
        # (Left to the class's None: set only by Autobahn's own path.)
        state = self.__dict__
        for name in _HANDSHAKE_LEFTOVERS:
            state.pop(name, None)
        try:
            self.session = self.factory.relay.connect(self, self.address)
        except Exception:
            # A bug: the relay has no session for this connection (connect
            # registers all or nothing), so it cannot go on.
            _log.failure("bug while opening a WebSocket from {client_address}", client_address=self.address)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")
            return
        # Not logged here: the device's register, or its close, names the
        # address at info (a debug line too cost 2 % of a reconnect storm).

    def onMessageBegin(self, isBinary: bool) -> None:
        self._fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        # Each fragment costs the relay a bytes object and a list slot
        # (65,000 one-byte fragments held 3.5 MiB): more than max_fragments
        # fail the connection as a message over the size limit does, with
        # 1009 (Autobahn's _fail_connection, pinned by FragmentTests).
        self._fragments += 1
        if self._fragments > self.factory.limits.max_fragments and not self.failedByMe:
            self._fail_connection(self.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
                                  f"message in more than {self.factory.limits.max_fragments} frames")
        super().onMessageFrameBegin(length)

    def onMessageEnd(self) -> None:
        # Autobahn's, without firing the "message" event for listeners the
        # relay never adds (each fire makes a Deferred and a closure per
        # message).  Pinned by test_websocket's MessageEndTests.
        if not self.failedByMe:
            self._onMessage(b"".join(self.message_data), self.message_is_binary)
        self.message_data = None

    def onPing(self, payload: bytes) -> None:
        # A ping is a frame like any other: it counts against the message
        # rate, and its pong against the bytes a reader may leave unread.
        session = self.session
        if session is None or self.state != self.STATE_OPEN:
            return
        if not self.factory.relay.receive_ping(session):
            return
        if self._unsent is not None and self._held_back(2 + len(payload)):
            return
        self.sendPong(payload)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        self.factory.messages_received += 1
        if self._compacted is False:
            self._compacted = None
        try:
            if isBinary:
                self.factory.relay.receive_binary(session)
            else:
                self.factory.relay.receive(session, payload)
        except Exception:
            _log.failure("bug while handling a frame from {device_id}", device_id=session.device_id)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def connectionLost(self, reason: Any) -> None:
        try:
            super().connectionLost(reason)
        finally:
            cancel_close_timer(self)
            self._handshake_done()
            slot, self.gate_slot = self.gate_slot, None
            if slot is not None:
                gate, host, ticket = slot
                gate.release(host)
                if ticket is not None:
                    ticket.release()

    def sendPing(self, payload: bytes | None = None) -> None:
        super().sendPing(payload)
        session = self.session
        if payload and session is not None and self.state == self.STATE_OPEN:
            self._ping_payload = payload
            self._ping_mark = self.factory.relay.delivery_mark(session)

    def onPong(self, payload: bytes) -> None:
        # Also a pong Autobahn no longer waits for (it stops waiting when
        # other traffic arrives first): it proves the same.
        if payload and payload == self._ping_payload:
            mark, self._ping_payload, self._ping_mark = self._ping_mark, None, None
            if self.session is not None:
                self.factory.relay.delivered(self.session, mark)

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> Any:
        session = self.session
        if self.state == self.STATE_CLOSING and self._close_mark is not None and session is not None:
            # The device answers the close the relay sent after everything
            # else: it got all of it.
            self.factory.relay.delivered(session, self._close_mark)
        return super().onCloseFrame(code, reasonRaw)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self.session = self.session, None
        try:
            if session is not None:
                # The code the closing side sent (1006: none, the connection
                # was lost).
                by_relay = bool(self.closedByMe and self.localCloseCode)
                _log.info("device {device_id} at {client_address} disconnected, close code {close_code} "
                          "from the {side}",
                          device_id=session.device_id, client_address=self.address,
                          close_code=self.localCloseCode if by_relay else code,
                          side="relay" if by_relay else "device")
                self.factory.relay.disconnect(session)
        except Exception:
            _log.failure("bug while closing the WebSocket of {device_id} at {client_address}",
                         device_id=session.device_id, client_address=self.address)
        finally:
            # Whatever happened above, the connection no longer counts
            # against the caps.
            if self._admitted:
                self._admitted = False
                self.factory.release(self.address)
            ticket, self._ticket = self._ticket, None
            if ticket is not None:
                ticket.release()

    def sendHttpErrorResponse(self, code: int, reason: str, responseHeaders=None) -> None:
        # Autobahn's refusals (403, 503, 400...) carry the relay's security
        # headers and say where the response ends, like twisted.web's.  The
        # status line has the standard reason phrase: Autobahn's reasons
        # quote what the client sent (a bad Sec-WebSocket-Key, an Origin).
        headers = [*(responseHeaders or ()), *SECURITY_HEADERS,
                   (b"Content-Length", b"0"), (b"Connection", b"close")]
        lines = [b"HTTP/1.1 %d %s" % (code, reason_phrase(code))]
        for name, value in headers:
            lines.append((name if isinstance(name, bytes) else name.encode("utf-8")) + b": "
                         + (value if isinstance(value, bytes) else str(value).encode("utf-8")))
        self.sendData(b"\r\n".join(lines) + b"\r\n\r\n")

    # IPeer

    def send(self, message: Outgoing) -> None:
        if self.state != self.STATE_OPEN:
            return
        prepared = message.prepared
        if prepared is None:
            # Once per message, however many it goes to.
            prepared = message.prepared = self.factory.prepareMessage(message.payload)
            sent = message.message
            if type(sent) is ErrorFrame:
                self.factory.errors_sent[sent.error] += 1
        if self._unsent is not None and self._held_back(len(prepared.payloadHybi)):
            return
        self.factory.messages_sent += 1
        if self.send_queue:
            self.sendPreparedMessage(prepared)
        else:
            # What sendPreparedMessage does for an uncompressed connection
            # with nothing queued, without the debug line whose arguments
            # Autobahn formats for every send (compression is never
            # negotiated: perMessageCompressionAccept refuses every offer).
            self._write(prepared.payloadHybi)

    def _write(self, data: bytes) -> None:
        """
        Write C{data} to the socket at once when the transport has nothing
        waiting, as asyncio's transports do; what the socket does not take
        goes to the transport.  Twisted would buffer it and send it on the
        reactor's next turn: two more epoll_ctl() calls and a turn per
        delivery.  (C{_tempDataLen}, C{offset} and C{dataBuffer} are
        Twisted's FileDescriptor buffer, not its public API: the
        DirectWriteTests in test_limits_loopback fail if they change.)
        """
        transport = self.transport
        sock = self._socket
        if (sock is not None and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)
                and transport.connected and not transport.disconnecting):
            try:
                sent = sock.send(data)
            except OSError:
                # Full (EAGAIN) or broken: the transport finds out which.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def close(self, code: int, reason: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        # Autobahn takes a plain int, not a CloseCode.
        code = int(code)
        self.factory.closed_by_relay[code] += 1
        if self.session is not None:
            self._close_mark = self.factory.relay.delivery_mark(self.session)
        if code == 1000 or 3000 <= code <= 4999:
            self.sendClose(code, reason)
        else:
            # Autobahn's sendClose refuses the protocol codes (1001 going
            # away, 1011 internal error) that we document; frame them as it
            # does for its own limits.
            self.sendCloseFrame(code, reason.encode("utf-8")[:123], isReply=False)

    def pause_reading(self) -> None:
        producer = self._reader()
        if producer is not None:
            producer.pauseProducing()

    def resume_reading(self) -> None:
        producer = self._reader()
        if producer is not None and self.state != self.STATE_CLOSED:
            producer.resumeProducing()

    def _reader(self) -> Any:
        """
        The transport that reads the socket: the TCP connection itself, or
        the one under a TLS layer (which cannot pause reading itself).
        """
        transport = self.transport
        while transport is not None and not IPushProducer.providedBy(transport):
            transport = getattr(transport, "transport", None)
        return transport

    # IPushProducer: the transport's word on its buffer

    def pauseProducing(self) -> None:
        if self._unsent is None:
            self._unsent = 0

    def resumeProducing(self) -> None:
        if self._unsent is not None and self._unsent <= self.factory.limits.max_unsent:
            self._unsent = None

    def stopProducing(self) -> None:
        pass

    def _held_back(self, size: int) -> bool:
        """
        Count C{size} more bytes sent while paused; past the limit, cut the
        reader off and send nothing more (return C{True}).
        """
        before = self._unsent
        self._unsent = before + size
        limit = self.factory.limits.max_unsent
        if self._unsent <= limit:
            return False
        if before <= limit:
            self._unsent = float("inf")
            self.factory.slow_readers += 1
            _log.warn(
                "disconnecting {device_id} at {client_address}: it fell more than {limit} bytes "
                "behind reading what the relay sends",
                device_id=self.session.device_id if self.session else None,
                client_address=self.address, limit=limit,
            )
            self.transport.abortConnection()
        return True


for _name, _idle in _IDLE_DEFAULTS.items():
    setattr(RelayServerProtocol, _name, _idle)
del _name, _idle


@dataclass(frozen=True, slots=True)
class WebSocketStats:
    """
    The WebSocket layer's figures: connections and client addresses open
    now, and since the start: messages received and sent, handshakes
    refused by reason, error messages sent by code, connections the relay
    closed by close code, slow readers cut off.
    """

    connections: int
    client_addresses: int
    messages_received: int
    messages_sent: int
    refused: dict[str, int]
    errors_sent: dict[str, int]
    closed_by_relay: dict[int, int]
    slow_readers: int


class RelayServerFactory(WebSocketServerFactory):
    """
    Builds L{RelayServerProtocol}s for one L{Relay}, with every Autobahn
    option set explicitly, and keeps the connection counts and caps.

    @param proxies: whose X-Forwarded-For names the client address.
    @param origins: which browser origins may open a WebSocket.
    @param clock: what connections time out on (default: the relay's).
    """

    protocol = RelayServerProtocol

    def __init__(
        self,
        relay: Relay,
        limits: WebSocketLimits = WebSocketLimits(),
        proxies: TrustedProxies = TrustedProxies(),
        origins: OriginPolicy = OriginPolicy(),
        clock: Any = None,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.limits = limits
        # Every connection's timeouts on one wheel with O(1) cancels, in
        # place of txaio's batched timer (see leeloo.timers).
        self._batched_timer = TimerWheel(relay.clock if clock is None else clock)
        self.proxies = proxies
        self.origins = origins
        self.caps = ConnectionCaps(limits.max_connections, limits.max_connections_per_address)
        # The cluster's per-address counts (leeloo.sharedlimits) with --redis.
        self.shared: Any = None
        # Counters for the metrics: plain integers, O(1) to bump.
        self.refused: Counter[str] = Counter()
        # Error messages sent by code (rate_limited, device_auth_failed...),
        # and connections the relay closed by close code.
        self.errors_sent: Counter[str] = Counter()
        self.closed_by_relay: Counter[int] = Counter()
        self.messages_received = 0
        self.messages_sent = 0
        self.slow_readers = 0
        # Addresses (and TOO_MANY_CONNECTIONS for the total) whose refusal
        # was logged since they were last under their cap: one warning each
        # time a cap is reached, however many are refused.
        self._warned: set = set()
        # Sec-WebSocket-Extensions headers seen, and what refused_offers
        # made of them.
        self._offers: dict[str, list | None] = {}
        self.setProtocolOptions(
            versions=[13],
            webStatus=False,
            maskServerFrames=False,
            requireMaskedClientFrames=True,
            applyMask=True,
            maxFramePayloadSize=limits.max_message_size,
            maxMessagePayloadSize=limits.max_message_size,
            autoFragmentSize=0,
            failByDrop=False,
            echoCloseCodeReason=False,
            openHandshakeTimeout=limits.open_handshake_timeout,
            closeHandshakeTimeout=limits.close_handshake_timeout,
            tcpNoDelay=True,
            perMessageCompressionAccept=lambda offers: None,
            autoPingInterval=limits.auto_ping_interval,
            autoPingTimeout=limits.auto_ping_timeout,
            autoPingSize=12,
            # Origins are checked in onConnect (OriginPolicy), which can
            # compare with the Host header and answers 403 (Origin: null
            # too); connections are capped there too.
            allowedOrigins=["*"],
            allowNullOrigin=True,
            maxConnections=0,
            trustXForwardedFor=0,
        )
        # Autobahn copies each of its ~45 options from the factory into
        # every connection's __dict__, unless the protocol class has it
        # already.  Give them to a protocol class of this factory's own, so
        # an idle connection holds its state and not a copy of the options
        # (options set after this are not seen by connections).
        base = self.protocol
        self.protocol = type(base.__name__, (base,), {
            "__module__": base.__module__,
            **{name: _class_attribute(getattr(self, name)) for name in base.CONFIG_ATTRS},
            # With every option on the class there is nothing to copy; an
            # empty list also spares each connection Autobahn's pformat of
            # all its options for a debug line nobody sees (~14% of the
            # relay's CPU in a reconnect storm).
            "CONFIG_ATTRS": (),
        })

    def upgrade_response_head(self) -> bytes:
        """
        The start of Autobahn's answer to an opening handshake it accepts
        with no subprotocol and no extension, up to its
        Sec-WebSocket-Accept header (as succeedHandshake writes it).
        """
        response = "HTTP/1.1 101 Switching Protocols\r\n"
        if self.server:
            response += f"Server: {self.server}\r\n"
        response += "Upgrade: WebSocket\r\nConnection: Upgrade\r\n"
        for name, values in self.headers.items():
            if isinstance(values, str):
                values = [values]
            else:
                try:
                    values = iter(values)
                except TypeError:
                    values = [values]
            for value in values:
                response += f"{name}: {value}\r\n"
        return response.encode("utf8")

    def refused_offers(self, protocol: RelayServerProtocol, header: str) -> list | None:
        """
        The extensions Autobahn parses from a Sec-WebSocket-Extensions
        header C{header} (for the connection request), if it would refuse
        every offer in it (as this factory refuses compression); None if it
        would accept one or fail the handshake over it.  Remembered for the
        few headers clients send (the same for every device).
        """
        known = self._offers.get(header, False)
        if known is not False:
            return known
        try:
            extensions = protocol._parseExtensionsHeader(header)
            offers = [PERMESSAGE_COMPRESSION_EXTENSION[name]["Offer"].parse(params)
                      for name, params in extensions if name in PERMESSAGE_COMPRESSION_EXTENSION]
        except Exception:
            result = None
        else:
            result = extensions if not offers or protocol.perMessageCompressionAccept(offers) is None else None
        if len(self._offers) >= 64:
            self._offers.clear()
        self._offers[header] = result
        return result

    def admit(self, address: str | None) -> None:
        """
        Count a connection from C{address}, or refuse it with a 503.

        @raise ConnectionDeny: a cap is reached.
        """
        refused = self.caps.admit(address)
        if refused is None:
            return
        self.refused[refused] += 1
        if refused == TOO_MANY_CONNECTIONS:
            if refused not in self._warned:
                self._warned.add(refused)
                _log.warn("refusing WebSocket connections: {count} are open, the most allowed",
                          count=self.caps.total)
            raise ConnectionDeny(503, "Relay Full, Try Again Later")
        if address not in self._warned:
            self._warned.add(address)
            _log.warn("refusing WebSocket connections from {client_address}: "
                      "it has {count} open, the most allowed",
                      client_address=address, count=self.caps.max_per_address)
        raise ConnectionDeny(503, "Too Many Connections From Your Address")

    def refused_by_cluster(self, address: str | None) -> None:
        """
        The cluster (L{leeloo.sharedlimits}) refused a connection from
        C{address} that L{admit} let in (and that has been released).
        """
        self.refused[TOO_MANY_FROM_ADDRESS] += 1
        if address not in self._warned:
            self._warned.add(address)
            _log.warn("refusing WebSocket connections from {client_address}: "
                      "it has {count} open on all the relay's nodes, the most allowed",
                      client_address=address, count=self.caps.max_per_address)

    def release(self, address: str | None) -> None:
        """
        A connection L{admit}ted from C{address} closed.
        """
        self.caps.release(address)
        if self._warned:
            self._warned.discard(address)
            self._warned.discard(TOO_MANY_CONNECTIONS)

    def stats(self) -> WebSocketStats:
        return WebSocketStats(self.caps.total, len(self.caps.by_address), self.messages_received,
                              self.messages_sent, dict(self.refused), dict(self.errors_sent),
                              dict(self.closed_by_relay), self.slow_readers)

    def log_limits(self) -> None:
        _log.info("WebSocket limits: {limits}", limits=self.limits.describe())
        _log.info("WebSocket origins allowed: {origins}; trusted proxies: {proxies}",
                  origins=self.origins.describe(), proxies=self.proxies.describe())
