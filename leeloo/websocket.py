"""
The WebSocket adapter: Autobahn frames in, L{leeloo.relay.Relay} calls out.

The protocol implements L{IPeer} for its session; it holds no crew logic.
"""

from __future__ import annotations

from dataclasses import dataclass

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger
from zope.interface import implementer

from leeloo.relay import CLOSE_INTERNAL_ERROR, IPeer, Outgoing, Relay, Session

# Module-level: Autobahn's classes use their own ``log`` (a txaio logger that
# drops debug events cheaply); overriding it would emit every frame's debug.
_log = Logger()


@dataclass(frozen=True)
class WebSocketLimits:
    """
    Every limit Autobahn applies, set explicitly (its defaults are open).
    """

    max_message_size: int = 64 * 1024
    open_handshake_timeout: float = 10.0
    close_handshake_timeout: float = 5.0
    auto_ping_interval: float = 25.0
    auto_ping_timeout: float = 20.0

    def describe(self) -> str:
        return (
            f"max message {self.max_message_size} bytes, "
            f"open handshake {self.open_handshake_timeout:g}s, "
            f"close handshake {self.close_handshake_timeout:g}s, "
            f"ping every {self.auto_ping_interval:g}s (timeout {self.auto_ping_timeout:g}s)"
        )


@implementer(IPeer)
class RelayServerProtocol(WebSocketServerProtocol):
    """
    One device's WebSocket: translates frames to and from its L{Session}.
    """

    session: Session | None = None

    def onOpen(self) -> None:
        peer = self.transport.getPeer()
        self.session = self.factory.relay.connect(self, getattr(peer, "host", None))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self.session
        if session is None:
            return
        try:
            if isBinary:
                self.factory.relay.receive_binary(session)
            else:
                self.factory.relay.receive(session, payload)
        except Exception:
            _log.failure("bug while handling a frame from {device_id}", device_id=session.device_id)
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        session, self.session = self.session, None
        if session is not None:
            self.factory.relay.disconnect(session)

    # IPeer

    def send(self, message: Outgoing) -> None:
        if self.state != self.STATE_OPEN:
            return
        prepared = message.prepared
        if prepared is None:
            prepared = message.prepared = self.factory.prepareMessage(message.payload)
        self.sendPreparedMessage(prepared)

    def close(self, code: int, reason: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        if code == 1000 or 3000 <= code <= 4999:
            self.sendClose(code, reason)
        else:
            # Autobahn's sendClose refuses the protocol codes (1001 going
            # away, 1011 internal error) that we document; frame them as it
            # does for its own limits.
            self.sendCloseFrame(code, reason.encode("utf-8")[:123], isReply=False)


class RelayServerFactory(WebSocketServerFactory):
    """
    Builds L{RelayServerProtocol}s for one L{Relay}, with every Autobahn
    option set explicitly.
    """

    protocol = RelayServerProtocol

    def __init__(self, relay: Relay, limits: WebSocketLimits = WebSocketLimits()) -> None:
        super().__init__()
        self.relay = relay
        self.limits = limits
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
            allowedOrigins=["*"],
            maxConnections=0,
            trustXForwardedFor=0,
        )

    def log_limits(self) -> None:
        _log.info("WebSocket limits: {limits}", limits=self.limits.describe())
