"""
The relay's core, sans I/O: crews, sessions, fan-out and pending Spotify
tokens.

Nothing here imports a reactor, a transport or Autobahn.  A connection is a
L{Session} whose L{IPeer} the core sends through; the WebSocket adapter, the
bot API and the tests all drive the same L{Relay} with method calls.  Time
comes from an injected clock (anything with C{seconds()}).
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Iterable

from twisted.logger import Logger
from zope.interface import Interface, implementer

from leeloo import messages
from leeloo.messages import (
    BinaryNotSupported,
    CreateCrew,
    CrewMessage,
    InvalidCrewCode,
    JoinCrew,
    NotInCrew,
    Ping,
    ProtocolError,
    Reaction,
    Register,
    ShareMusic,
)

# Close codes the relay documents (application reasons live in 4000-4999).
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_REPLACED = 4001

TELEGRAM_DEVICE_ID = "telegram"
TOKEN_TTL = 3600.0


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


class Outgoing:
    """
    One outgoing message, encoded at most once however many peers it goes to.

    C{prepared} is a slot for a transport to cache its framed form in (the
    WebSocket adapter keeps Autobahn's prepared message there).
    """

    __slots__ = ("message", "_payload", "prepared")

    def __init__(self, message: dict) -> None:
        self.message = message
        self._payload: bytes | None = None
        self.prepared: Any = None

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = messages.encode(self.message)
        return self._payload


class Session:
    """
    One connection: who it says it is and which crew it is in.
    """

    __slots__ = ("peer", "address", "device_id", "name", "crew")

    def __init__(self, peer: IPeer, address: str | None = None) -> None:
        self.peer = peer
        self.address = address
        self.device_id: str | None = None
        self.name: str | None = None
        self.crew: Crew | None = None

    def send(self, message: dict) -> None:
        self.peer.send(Outgoing(message))

    def __repr__(self) -> str:
        return f"<Session {self.device_id!r} in {self.crew.code if self.crew else None!r}>"


class Crew:
    """
    A crew: its code, its members online now (by device id) and the bot
    users who joined it.
    """

    __slots__ = ("code", "created_at", "created_by", "online", "bot_users")

    def __init__(self, code: str, created_at: float, created_by: str | None) -> None:
        self.code = code
        self.created_at = created_at
        self.created_by = created_by
        self.online: dict[str, Session] = {}
        self.bot_users: dict[str, str] = {}


def generate_crew_code(choice: Callable[[str], str] = secrets.choice, length: int = 4) -> str:
    return messages.CREW_CODE_PREFIX + "".join(
        choice(messages.CREW_CODE_ALPHABET) for _ in range(length)
    )


def generate_device_id(token_hex: Callable[[int], str] = secrets.token_hex) -> str:
    return messages.DEVICE_ID_PREFIX + token_hex(6)


class Relay:
    """
    Every crew and every connection of one relay.

    @param clock: an object with C{seconds()}, e.g. the reactor or a
        L{twisted.internet.task.Clock}.
    """

    log = Logger()

    def __init__(
        self,
        clock: Any,
        token_ttl: float = TOKEN_TTL,
        crew_code: Callable[[], str] = generate_crew_code,
        device_id: Callable[[], str] = generate_device_id,
    ) -> None:
        self.clock = clock
        self.token_ttl = token_ttl
        self._new_crew_code = crew_code
        self._new_device_id = device_id
        self.started = clock.seconds()
        self.sessions: set[Session] = set()
        self.devices: dict[str, Session] = {}
        self.crews: dict[str, Crew] = {}
        self.pending_tokens: dict[str, tuple[dict, float]] = {}
        self._handlers = {
            Register: self._register,
            CreateCrew: self._create_crew,
            JoinCrew: self._join_crew,
            CrewMessage: self._crew_message,
            ShareMusic: self._share_music,
            Reaction: self._reaction,
            Ping: self._ping,
        }

    # ------------------------------------------------------------ sessions

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def connect(self, peer: IPeer, address: str | None = None) -> Session:
        session = Session(peer, address)
        self.sessions.add(session)
        return session

    def receive(self, session: Session, data: bytes | str) -> None:
        """
        One text frame from C{session}: decode it and act on it.  A peer's
        mistake is answered with an C{error} message; the connection stays.
        """
        try:
            message = messages.decode(data)
            self._handlers[type(message)](session, message)
        except ProtocolError as e:
            self.log.debug("refused a frame: {code}", code=e.code)
            session.send(e.as_message())

    def receive_binary(self, session: Session) -> None:
        session.send(BinaryNotSupported("binary frames are not supported; send JSON text").as_message())

    def disconnect(self, session: Session) -> None:
        """
        C{session}'s connection closed: the rest of its crew hears that the
        device went offline.
        """
        self.sessions.discard(session)
        self._unbind(session)

    def _unbind(self, session: Session) -> None:
        if session.device_id is not None and self.devices.get(session.device_id) is session:
            del self.devices[session.device_id]
            self._leave(session, announce=True)
        session.crew = None

    def shutdown(self, code: int = CLOSE_GOING_AWAY, reason: str = "relay restarting") -> None:
        """
        Close every connection, telling devices to come back.
        """
        for session in list(self.sessions):
            session.peer.close(code, reason)

    # ------------------------------------------------------------ identity

    def _identify(self, session: Session, device_id: str | None, name: str | None) -> None:
        if device_id is None:
            device_id = session.device_id or self._new_device_id()
        if session.device_id != device_id:
            self._unbind(session)
            previous = self.devices.get(device_id)
            if previous is not None:
                self._replace(previous)
            session.device_id = device_id
            self.devices[device_id] = session
        if name is not None:
            session.name = name
        elif session.name is None:
            session.name = device_id

    def _replace(self, previous: Session) -> None:
        """
        A newer connection claims C{previous}'s device id (a reboot): the old
        one is detached without telling the crew, and closed.
        """
        self._leave(previous, announce=False)
        previous.crew = None
        del self.devices[previous.device_id]
        previous.device_id = None
        self.sessions.discard(previous)
        previous.peer.close(CLOSE_REPLACED, "replaced by a newer connection for this device")

    def _deliver_pending(self, session: Session) -> None:
        pending = self.pending_tokens.pop(session.device_id, None)
        if pending is not None:
            tokens, expires = pending
            if expires > self.clock.seconds():
                session.send(messages.spotify_auth_complete(tokens))

    # --------------------------------------------------------------- crews

    def _create(self, code: str, created_by: str | None) -> Crew:
        crew = self.crews[code] = Crew(code, self.clock.seconds(), created_by)
        self.log.info("crew {code} created", code=code)
        return crew

    def _unused_code(self) -> str:
        while True:
            code = self._new_crew_code()
            if code not in self.crews:
                return code

    def _enter(self, session: Session, crew: Crew, announce: bool) -> None:
        if session.crew is crew:
            return
        self._leave(session, announce=True)
        session.crew = crew
        crew.online[session.device_id] = session
        if announce:
            self._fanout(crew, messages.member_joined(session.device_id, session.name), session)

    def _leave(self, session: Session, announce: bool) -> None:
        crew = session.crew
        if crew is None:
            return
        session.crew = None
        if crew.online.get(session.device_id) is session:
            del crew.online[session.device_id]
            if announce:
                self._fanout(crew, messages.member_offline(session.device_id, session.name))

    def _fanout(self, crew: Crew, message: dict, sender: Session | None = None) -> int:
        """
        Send C{message} to every online member of C{crew} but C{sender},
        encoded once; return how many it went to.
        """
        out = Outgoing(message)
        reached = 0
        for member in tuple(crew.online.values()):
            if member is not sender:
                member.peer.send(out)
                reached += 1
        return reached

    def _crew_of(self, session: Session) -> Crew:
        if session.crew is None:
            raise NotInCrew("join or create a crew before sending crew messages")
        return session.crew

    # ------------------------------------------------------------ handlers

    def _register(self, session: Session, message: Register) -> None:
        self._identify(session, message.device_id, message.device_name)
        session.send(messages.registered(session.device_id))
        if message.crew_code is not None:
            crew = self.crews.get(message.crew_code) or self._create(
                message.crew_code, session.device_id
            )
            self._enter(session, crew, announce=False)
        self._deliver_pending(session)

    def _create_crew(self, session: Session, message: CreateCrew) -> None:
        self._identify(session, message.device_id, message.display_name)
        code = message.crew_code or self._unused_code()
        crew = self.crews.get(code)
        if crew is None:
            crew = self._create(code, session.device_id)
            self._enter(session, crew, announce=False)
        else:
            self._enter(session, crew, announce=True)
        session.send(messages.crew_created(session.device_id, code))
        self._deliver_pending(session)

    def _join_crew(self, session: Session, message: JoinCrew) -> None:
        crew = self.crews.get(message.crew_code)
        if crew is None:
            raise InvalidCrewCode(f"Crew {message.crew_code} not found")
        self._identify(session, message.device_id, message.display_name)
        self._enter(session, crew, announce=True)
        others = [m.name for m in crew.online.values() if m is not session]
        session.send(
            messages.crew_joined(session.device_id, crew.code, len(crew.online), others)
        )
        self._deliver_pending(session)

    def _crew_message(self, session: Session, message: CrewMessage) -> None:
        crew = self._crew_of(session)
        self._fanout(
            crew,
            messages.crew_message(
                session.device_id, session.name, message.msg_type, message.payload, self.now_ms()
            ),
            session,
        )

    def _share_music(self, session: Session, message: ShareMusic) -> None:
        crew = self._crew_of(session)
        self._fanout(crew, messages.music_shared(message, session.name, self.now_ms()), session)

    def _reaction(self, session: Session, message: Reaction) -> None:
        crew = self._crew_of(session)
        self._fanout(
            crew, messages.reaction(message.reaction_type, session.name, self.now_ms()), session
        )

    def _ping(self, session: Session, message: Ping) -> None:
        session.send(messages.pong())

    # ------------------------------------------------------------- bot API

    def _known_crew(self, code: str) -> Crew:
        crew = self.crews.get(messages.normalize_crew_code(code))
        if crew is None:
            raise InvalidCrewCode(f"Crew {code.strip().upper()} not found")
        return crew

    def bot_create_crew(self, user_id: str, name: str) -> str:
        crew = self._create(self._unused_code(), f"telegram:{user_id}")
        crew.bot_users[user_id] = name
        return crew.code

    def bot_join_crew(self, user_id: str, code: str, name: str) -> tuple[str, int]:
        """
        Put a bot user in a crew; return the crew's code and how many of
        its devices are online.
        """
        crew = self._known_crew(code)
        crew.bot_users[user_id] = name
        return crew.code, len(crew.online)

    def bot_message(
        self, user_id: str, code: str, sender_name: str, msg_type: str, payload: dict
    ) -> int:
        """
        A bot user's message to a crew it joined; return the devices reached.
        """
        crew = self._known_crew(code)
        if user_id not in crew.bot_users:
            raise NotInCrew(f"join crew {crew.code} before sending to it")
        return self._fanout(
            crew,
            messages.crew_message(TELEGRAM_DEVICE_ID, sender_name, msg_type, payload, self.now_ms()),
        )

    def crew_status(self, code: str) -> dict:
        code = messages.normalize_crew_code(code)
        crew = self.crews.get(code)
        online: Iterable[Session] = crew.online.values() if crew else ()
        bots = crew.bot_users if crew else {}
        return {
            "crew_code": code,
            "exists": crew is not None,
            "devices_online": len(crew.online) if crew else 0,
            "device_names": [s.name for s in online],
            "telegram_users": len(bots),
            "telegram_user_names": list(bots.values()),
        }

    # ------------------------------------------------------------- Spotify

    def deliver_tokens(self, device_id: str, tokens: dict) -> bool:
        """
        Hand Spotify tokens to C{device_id}: at once if it is online (return
        C{True}), else at its next register, create or join within the
        token lifetime.
        """
        session = self.devices.get(device_id)
        if session is not None:
            session.send(messages.spotify_auth_complete(tokens))
            return True
        self.pending_tokens[device_id] = (tokens, self.clock.seconds() + self.token_ttl)
        return False

    def expire(self) -> int:
        """
        Forget pending tokens past their lifetime; return how many.
        """
        now = self.clock.seconds()
        stale = [d for d, (_, expires) in self.pending_tokens.items() if expires <= now]
        for device_id in stale:
            del self.pending_tokens[device_id]
        return len(stale)

    # -------------------------------------------------------------- health

    def health(self) -> dict:
        return {
            "status": "ok",
            "devices": len(self.devices),
            "crews": len(self.crews),
            "uptime": int(self.clock.seconds() - self.started),
        }
