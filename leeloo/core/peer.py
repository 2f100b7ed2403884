"""
What the core sends through, and what it sends.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Interface

from leeloo import messages


class IPeer(Interface):
    """
    The far end of one connection, as the core sees it.
    """

    def send(message: "Outgoing") -> None:
        """
        Send one message.  The same L{Outgoing} may go to many peers.
        """

    def close(code: int, reason: str) -> None:
        """
        Close the connection with a documented close code.
        """

    def pause_reading() -> None:
        """
        Read nothing more from the connection until L{resume_reading} (the
        store is behind: what is not read stays in the sender's socket,
        not in the relay's memory).
        """

    def resume_reading() -> None:
        """
        Read from the connection again.
        """


class Outgoing:
    """
    One outgoing message, encoded at most once however many peers it goes to.

    C{prepared} is a slot for a transport to cache its framed form in (the
    WebSocket adapter keeps Autobahn's prepared message there).
    """

    __slots__ = ("message", "_payload", "prepared")

    def __init__(self, message: Any, payload: bytes | None = None) -> None:
        self.message = message
        self._payload = payload
        self.prepared: Any = None

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = messages.encode(self.message)
        return self._payload
