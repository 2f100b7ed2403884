"""
The connections: each one's L{Session}, the device it is bound to, its
replacement by a newer connection for the same device, and closing them
all at shutdown without a reconnect storm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from leeloo.core.peer import IPeer, Outgoing
from leeloo.limits import Bucket
from leeloo.messages import CLOSE_BIND_TIMEOUT, CLOSE_INTERNAL_ERROR, CLOSE_REPLACED
from leeloo.timers import TimerWheel

if TYPE_CHECKING:
    from leeloo.fanout import IFanout
    from leeloo.core.crews import Crew, Membership

_log = Logger()


class Session:
    """
    One connection: who it says it is and the crews it is in.

    C{primary} is its L{Membership} of the crew its crew messages go to,
    C{others} (C{None} while there are none, as for every device today:
    a dict costs more than the membership) those of the other crews it is
    in, by crew code; L{membership} finds either.  C{acks} is whether
    the device speaks the acknowledging protocol (it sent C{ack} or
    C{last_seq}); a device that does not is a legacy device.  C{multi} is
    whether it is multi-crew (it sent C{crew_add}): entering a crew then
    adds one instead of moving it.  C{bucket} and
    C{entries} are its rate budgets, C{strikes} its refusals in a row, and
    C{bind_timer} closes it if it binds no device in time.
    """

    __slots__ = ("peer", "address", "device_id", "name", "primary", "others", "multi", "acks",
                 "bucket", "entries", "strikes", "closing", "bind_timer", "waiting")

    def __init__(self, peer: IPeer, address: str | None, bucket: Bucket) -> None:
        self.peer = peer
        self.address = address
        self.device_id: str | None = None
        self.name: str | None = None
        self.primary: Membership | None = None
        self.others: dict[str, Membership] | None = None
        self.multi = False
        self.acks = False
        self.bucket = bucket
        self.entries: Bucket | None = None
        self.strikes = 0
        self.closing = False
        self.bind_timer: Any = None
        # While a frame waits on a lookup: the frames that came after it.
        self.waiting: list | None = None

    def membership(self, code: str) -> Membership | None:
        """
        Its membership of the crew of C{code}, if it is in it.
        """
        primary = self.primary
        if primary is not None and primary.crew.code == code:
            return primary
        others = self.others
        return others.get(code) if others else None

    def memberships(self) -> list[Membership]:
        """
        Every membership it holds, the primary first.
        """
        held = [] if self.primary is None else [self.primary]
        if self.others:
            held.extend(self.others.values())
        return held

    @property
    def crew(self) -> Crew | None:
        """
        The crew its crew messages go to, if it is in one.
        """
        return self.primary.crew if self.primary is not None else None

    def close(self, code: int, reason: str) -> None:
        """
        Close the connection; frames still arriving from it are ignored.
        """
        self.closing = True
        self.peer.close(code, reason)

    def send(self, message: Any) -> None:
        self.peer.send(Outgoing(message))

    def __repr__(self) -> str:
        crew = self.crew
        return f"<Session {self.device_id!r} in {crew.code if crew else None!r}>"


class Sessions:
    """
    Every open connection (C{sessions}) and the device each bound
    (claimed through the fan-out, so that a device id has one connection
    wherever it connects).

    @param bind_timeout: seconds a connection may stay without binding a
        device before it is closed with L{CLOSE_BIND_TIMEOUT}; 0 never.
    """

    def __init__(self, clock: Any, fanout: IFanout, bind_timeout: float) -> None:
        self.clock = clock
        self.fanout = fanout
        self.bind_timeout = bind_timeout
        # Every connection's bind timer on one wheel: a storm of new
        # connections sets and cancels thousands, a reactor timer each
        # would cost its heap place (leeloo.timers).
        self._timers = TimerWheel(clock)
        self.sessions: set[Session] = set()
        # Set by close_all: the close code and reason of connections opening now.
        self.stopping: tuple[int, str] | None = None
        self._when_gone: list[Deferred] = []

    def connect(self, peer: IPeer, address: str | None, bucket: Bucket) -> Session:
        """
        A new connection's session; registered all or nothing: if this
        raises, nothing of it is kept.
        """
        session = Session(peer, address, bucket)
        if self.bind_timeout:
            session.bind_timer = self._timers.call_later(self.bind_timeout, self._bind_expired, session)
        self.sessions.add(session)
        if self.stopping is not None:
            try:
                session.close(*self.stopping)
            except BaseException:
                self.stop_bind_timer(session)
                self.discard(session)
                raise
        return session

    def _bind_expired(self, session: Session) -> None:
        session.bind_timer = None
        if session.device_id is None and not session.closing and session in self.sessions:
            _log.info("closing a connection from {client_address} that bound no device in {timeout} seconds",
                      client_address=session.address, timeout=self.bind_timeout)
            session.close(CLOSE_BIND_TIMEOUT, "no device registered in time; reconnect and register")

    @staticmethod
    def stop_bind_timer(session: Session) -> None:
        if session.bind_timer is not None:
            session.bind_timer.cancel()
            session.bind_timer = None

    def is_bound(self, session: Session) -> bool:
        """
        Whether C{session} is the connection of the device it names.
        """
        return session.device_id is not None and self.fanout.connection(session.device_id) is session

    def bind(self, session: Session, device_id: str) -> Session | None:
        """
        Make C{session} the connection of C{device_id}; return the
        connection it replaces, for L{replace}.
        """
        session.device_id = device_id
        previous = self.fanout.claim(device_id, session)
        self.stop_bind_timer(session)
        return previous

    def unbind(self, session: Session) -> None:
        if session.device_id is not None:
            self.fanout.release(session.device_id, session)

    def replace(self, previous: Session) -> None:
        """
        A newer connection claims C{previous}'s device id (a reboot): close
        the old one (its crews were left without a word).
        """
        previous.device_id = None
        self.discard(previous)
        previous.close(CLOSE_REPLACED, "replaced by a newer connection for this device")

    def close_for_bug(self, session: Session) -> None:
        """
        Close C{session} with 1011 after a bug in handling it.
        """
        if not session.closing and session in self.sessions:
            try:
                session.close(CLOSE_INTERNAL_ERROR, "internal error")
            except Exception:
                _log.failure("bug while closing the connection of {device_id}", device_id=session.device_id)

    def discard(self, session: Session) -> None:
        self.sessions.discard(session)
        if self._when_gone and not self.sessions:
            waiting, self._when_gone = self._when_gone, []
            for d in waiting:
                d.callback(None)

    def close_all(self, code: int, reason: str, spread: float, steps: int, grace: float) -> Deferred:
        """
        Close every connection, spread over C{spread} seconds in C{steps}
        so the fleet does not come back in one burst, and fire once every
        one has gone (L{discard}), or C{grace} seconds after the last close.
        Connections opening meanwhile are closed at once.
        """
        self.stopping = (code, reason)
        sessions = list(self.sessions)
        per_step = max(1, -(-len(sessions) // steps))
        waits = []
        for i in range(0, len(sessions), per_step):
            chunk = sessions[i:i + per_step]
            delay = spread * i / max(1, len(sessions))
            d = Deferred()
            waits.append(d)
            if delay:
                self.clock.callLater(delay, self._close_chunk, chunk, code, reason, d)
            else:
                self._close_chunk(chunk, code, reason, d)
        done = DeferredList(waits) if waits else succeed(None)
        return done.addCallback(lambda _: self._all_gone(grace))

    @staticmethod
    def _close_chunk(chunk: list, code: int, reason: str, d: Deferred) -> None:
        for session in chunk:
            session.close(code, reason)
        d.callback(None)

    def _all_gone(self, grace: float) -> Deferred:
        """
        Fires once no session is left, or after C{grace} seconds.
        """
        if not self.sessions:
            return succeed(None)
        gone: Deferred = Deferred()
        self._when_gone.append(gone)

        def give_up() -> None:
            if not gone.called:
                _log.warn("{count} connections did not close within {grace:g}s of being told to; "
                          "dropping them", count=len(self.sessions), grace=grace)
                self._when_gone.remove(gone)
                gone.callback(None)

        timer = self.clock.callLater(grace, give_up)
        return gone.addCallback(lambda _: timer.cancel() if timer.active() else None)
