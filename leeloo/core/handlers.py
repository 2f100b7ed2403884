"""
What the relay does with each frame a device sends, once decoded: one
method per message type, given the session, the typed message and the
frame's size.  Errors are raised as L{ProtocolError}s for the relay to
answer; what only a later event answers (a crew durable, a message stored)
is answered here when it happens.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.logger import Logger

from leeloo import messages
from leeloo.messages import (
    Ack,
    CreateCrew,
    CrewAdd,
    CrewLeave,
    CrewLimit,
    CrewMessage,
    CrewPrimary,
    Crews,
    InvalidCrewCode,
    JoinCrew,
    NotRegistered,
    Ping,
    ProtocolError,
    Reaction,
    Register,
    ShareMusic,
    SpotifyNotConfigured,
    SpotifyPair,
    ShareNowPlaying,
    SpotifyForget,
    SpotifyRefresh,
    SpotifySearch,
    StoreUnavailable,
)
from leeloo.core.spotify_broker import SpotifyBroker
from leeloo.store import StoreError

if TYPE_CHECKING:
    from leeloo.core.admission import Admission
    from leeloo.core.crews import Crew, Crews
    from leeloo.core.grants import Grants
    from leeloo.core.delivery import Delivery, Fanout
    from leeloo.core.identity import Identity
    from leeloo.core.pairing import Pairings
    from leeloo.core.replay import Replayer
    from leeloo.core.sessions import Session, Sessions
    from leeloo.core.tokens import PendingTokens
    from leeloo.store import IStore, Journal, Snapshot

_log = Logger()


class Handlers:
    def __init__(self, store: IStore, journal: Journal, sessions: Sessions, identity: Identity, admission: Admission,
                 crews: Crews, delivery: Delivery, replayer: Replayer, tokens: PendingTokens,
                 pairing: Pairings, grants: Grants | None = None) -> None:
        self.store = store
        self.journal = journal
        self.sessions = sessions
        self.identity = identity
        self.admission = admission
        self.crews = crews
        self.delivery = delivery
        self.replayer = replayer
        self.tokens = tokens
        self.pairing = pairing
        self.spotify_broker = SpotifyBroker(pairing.clock, lambda: pairing.spotify, sessions.sessions,
                                            grants=grants)
        self.crew_messages = posted = CrewMessageHandlers(sessions, delivery)
        self.spotify = spotify = SpotifyHandlers(sessions, pairing, self.spotify_broker, delivery)
        self.by_type = {
            Register: self.register,
            CreateCrew: self.create_crew,
            JoinCrew: self.join_crew,
            CrewMessage: posted.crew_message,
            ShareMusic: posted.share_music,
            Reaction: posted.reaction,
            Ping: self.ping,
            Ack: self.ack,
            SpotifyPair: spotify.spotify_pair,
            SpotifyRefresh: spotify.spotify_refresh,
            SpotifySearch: spotify.spotify_search,
            SpotifyForget: spotify.spotify_forget,
            ShareNowPlaying: spotify.share_now_playing,
            CrewAdd: self.crew_add,
            CrewLeave: self.crew_leave,
            Crews: self.crews_list,
            CrewPrimary: self.crew_primary,
        }

    # ------------------------------------------------------ entering crews

    def register(self, session: Session, message: Register, size: int) -> Deferred | None:
        return self._looked_up(session, message, self._register)

    def create_crew(self, session: Session, message: CreateCrew, size: int) -> Deferred | None:
        if message.crew_code is None and self.crews.fanout.shared:
            # Other nodes make crews too: a new code is reserved in the store.
            return self.crews.reserve_code().addCallback(
                lambda code: self._looked_up(session, dataclasses.replace(message, crew_code=code),
                                             self._create_crew))
        return self._looked_up(session, message, self._create_crew)

    def join_crew(self, session: Session, message: JoinCrew, size: int) -> Deferred | None:
        return self._looked_up(session, message, self._join_crew)

    def _looked_up(self, session: Session, message: Any, then: Any) -> Deferred | None:
        """
        Call C{then(session, message)} once the crew and the device id that
        C{message} names are known here as the store knows them: what the
        relay does not hold (another node made it, say) is looked up first,
        and the connection's next frames wait for it (the relay's
        L{receive} keeps them in order).  Return the wait, or C{None} when
        there was nothing to look up.
        """
        waits: list[Deferred] = []
        code, device_id = message.crew_code, getattr(message, "device_id", None)
        if code is not None and self.crews.aliases:
            # A member of a renamed crew whose device still has the old code.
            resolved = self.crews.resolve(code, device_id or session.device_id)
            if resolved != code:
                message = dataclasses.replace(message, crew_code=resolved)
                code = resolved
        if code is not None and code not in self.crews.crews:
            self._find(waits, self.store.find_crew(code), self._adopt_crew, code)
        elif code is not None and self.crews.fanout.shared:
            # Other nodes change it: as the store holds it now (its
            # members, how far each got, its last sequence).
            self._find(waits, self.store.find_crew(code), self._refresh_crew)
        multi = self.crews.multi.get(device_id) if device_id is not None else None
        if multi is not None:
            # A multi-crew device comes back to its crews: those another
            # node made are looked up too.
            for held in multi.crews:
                if held != code and held not in self.crews.crews:
                    self._find(waits, self.store.find_crew(held), self._adopt_crew, held)
        if device_id is not None:
            if device_id not in self.identity.keys:
                self._find(waits, self.store.find_device(device_id), self.identity.adopt)
            elif self.crews.fanout.shared:
                # Another node may have bound its key since.
                self._find(waits, self.store.find_device(device_id), self.identity.refresh)
            if device_id not in self.tokens.pending:
                self._find(waits, self.store.find_token(device_id), self.tokens.adopt)
        if not waits:
            then(session, message)
            return None
        wait = waits[0] if len(waits) == 1 else DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        wait.addErrback(self._lookup_failed)
        return wait.addCallback(self._after_lookup, session, message, then)

    def _after_lookup(self, _: Any, session: Session, message: Any, then: Any) -> None:
        if session.closing:
            return
        code = message.crew_code
        if code is not None and code not in self.crews.crews and code in self.crews.aliases:
            # The lookup found it renamed (on another node, since this one
            # learnt its aliases).
            resolved = self.crews.resolve(code, getattr(message, "device_id", None) or session.device_id)
            if resolved != code:
                message = dataclasses.replace(message, crew_code=resolved)
        then(session, message)

    @staticmethod
    def _find(waits: list, answer: Any, adopt: Any, *args: Any) -> None:
        """
        Give C{adopt} the store's C{answer}: at once when the store knew it
        without asking (a plain value), else when it comes (a Deferred,
        added to C{waits}).
        """
        if answer is None:
            # The commonest answer (a new device, a new crew), and the cheapest
            # to tell apart: isinstance on a Deferred goes through its ABCs.
            return
        if isinstance(answer, Deferred):
            waits.append(answer.addCallback(adopt, *args))
        else:
            adopt(answer, *args)

    @staticmethod
    def _lookup_failed(failure: Any) -> None:
        if failure.check(FirstError):
            failure = failure.value.subFailure
        failure.trap(StoreError)
        _log.error("could not look a crew or device up in the store: {error}", error=failure.getErrorMessage())
        raise StoreUnavailable("the relay could not read its store; try again")

    @staticmethod
    def _sent_lookup_failed(failure: Any, client_msg_id: str) -> None:
        """
        The store could not say whether C{client_msg_id} was sent already:
        the message is not sent, and the refusal names it, as a failed
        write's does.
        """
        failure.trap(StoreError)
        _log.error("could not look a client_msg_id up in the store: {error}", error=failure.getErrorMessage())
        raise StoreUnavailable("the message could not be stored and was not delivered; send it again",
                               client_msg_id=client_msg_id)

    def _refresh_crew(self, snapshot: Snapshot | None) -> None:
        if snapshot is not None:
            self.crews.refresh(snapshot)

    def _adopt_crew(self, snapshot: Snapshot | None, code: str) -> None:
        if snapshot is not None and code not in self.crews.crews:
            if any(record.code in self.crews.crews for record in snapshot.crews):
                # C{code} is the old code of a crew held here under its new:
                # as the store holds it now.
                self.crews.aliases.update(snapshot.aliases)
                self.crews.refresh(snapshot)
                return
            self.crews.restore(snapshot)
            self.delivery.restore(snapshot)

    def _register(self, session: Session, message: Register) -> None:
        crew = self.crews.get(message.crew_code)
        self.crews.check_last_seq(crew, message.last_seq)
        if message.crew_code is not None:
            self._check_room(message.device_id or session.device_id, message.crew_code)
        if message.crew_code is not None or self.identity.unseen(session, message.device_id):
            self.admission.check_entry(session, message.device_id, crew)
        key = self._identify(session, message.device_id, message.device_name, message.device_key)
        if message.crew_code is None:
            self.identity.seen(session.device_id)
        session.send(messages.Registered(session.device_id, key))
        self.tokens.hand_over(session)
        self._come_back(session, message.crew_code, message.last_seq)
        if message.crew_code is not None:
            if crew is None:
                crew = self.crews.create(message.crew_code, session.device_id)
            self._enter(session, crew, announce=False, last_seq=message.last_seq)
        self._log_entry("register", session)

    def _create_crew(self, session: Session, message: CreateCrew) -> None:
        crew = self.crews.get(message.crew_code)
        self.crews.check_last_seq(crew, message.last_seq)
        self._check_room(message.device_id or session.device_id, message.crew_code)
        # Counted before a code is searched for: a refused flood costs no search.
        self.admission.check_entry(session, message.device_id, crew)
        code = message.crew_code or self.crews.unused_code()
        key = self._identify(session, message.device_id, message.display_name, message.device_key)
        if crew is None:
            # A new crew is answered once it is durable: a code handed out
            # and then lost in a crash could be handed to someone else.
            self._come_back(session)
            self._enter(session, self.crews.create(code, session.device_id, message.crew_name), announce=False)
            self.journal.barrier().addCallbacks(
                self._crew_stored, self._crew_not_stored,
                callbackArgs=(session, session.device_id, code, key), errbackArgs=(session, code),
            ).addErrback(self._crew_answer_bug, session, code)
            self._log_entry("create_crew", session)
            return
        session.send(messages.CrewCreated(session.device_id, code, key))
        self.tokens.hand_over(session)
        self._come_back(session, code, message.last_seq)
        self._enter(session, crew, announce=True, last_seq=message.last_seq)
        self._log_entry("create_crew", session)

    def _crew_stored(self, _: Any, session: Session, device_id: str, code: str, key: str | None) -> None:
        if session.closing or session not in self.sessions.sessions or session.device_id != device_id:
            return
        session.send(messages.CrewCreated(device_id, code, key))
        self.tokens.hand_over(session)

    def _crew_answer_bug(self, failure: Any, session: Session, code: str) -> None:
        _log.failure("bug while answering the creation of crew {crew_code}", failure, crew_code=code)
        self.sessions.close_for_bug(session)

    def _crew_not_stored(self, failure: Any, session: Session, code: str) -> None:
        # The crew stays, and its record is retried with the relay's other
        # state; the device is told it was not created, and may ask again.
        _log.error("crew {crew_code} was not stored: {error}", crew_code=code, error=failure.getErrorMessage())
        if not session.closing and session in self.sessions.sessions:
            membership = session.membership(code)
            if membership is not None:
                self.crews.leave_crew(membership, announce=False)
            session.send(StoreUnavailable("the crew could not be stored; try again").as_frame())

    def _join_crew(self, session: Session, message: JoinCrew) -> None:
        crew = self.crews.get(message.crew_code)
        self.admission.check_entry(session, message.device_id, crew)
        if crew is None:
            raise InvalidCrewCode(f"Crew {message.crew_code} not found")
        self.crews.check_last_seq(crew, message.last_seq)
        self._check_room(message.device_id or session.device_id, crew.code)
        key = self._identify(session, message.device_id, message.display_name, message.device_key)
        session.send(self._crew_joined(session, crew, key))
        self.tokens.hand_over(session)
        self._come_back(session, crew.code, message.last_seq)
        self._enter(session, crew, announce=True, last_seq=message.last_seq)
        self._log_entry("join_crew", session)

    def _online(self, session: Session, crew: Crew) -> tuple[int, list[str]]:
        """
        The members of C{crew} online counting C{session}'s device, and the
        others' names.
        """
        others = self.crews.online_names(crew, session)
        return self.crews.online_count(crew) + (not self.crews.online_anywhere(crew, session.device_id)), others

    def _crew_joined(self, session: Session, crew: Crew, key: str | None = None) -> messages.CrewJoined:
        online, others = self._online(session, crew)
        return messages.CrewJoined(session.device_id, crew.code, online, others, key, crew.name)

    # ------------------------------------------------------- several crews

    def _check_room(self, device_id: str | None, code: str | None) -> None:
        """
        Check that a multi-crew device has room for crew C{code} (C{None}:
        a new one) if it is not in it: C{join_crew}, C{create_crew} and
        C{register} add a crew for it, as C{crew_add} does.

        @raise CrewLimit: it is in C{max_crews_per_device} crews.
        """
        record = self.crews.multi.get(device_id) if device_id is not None else None
        limit = self.admission.limits.max_crews_per_device
        if record is not None and code not in record.crews and len(record.crews) >= limit:
            raise CrewLimit(f"this device is in {limit} crews, the most it may be in; leave one first")

    def _bound(self, session: Session) -> None:
        """
        @raise NotRegistered: C{session} has bound no device.
        """
        if not self.sessions.is_bound(session):
            raise NotRegistered("register, create_crew or join_crew first, then ask again")

    def crew_add(self, session: Session, message: CrewAdd, size: int) -> Deferred | None:
        self._bound(session)
        return self._looked_up(session, message, self._crew_add)

    def _crew_add(self, session: Session, message: CrewAdd) -> None:
        self._bound(session)
        crew = self.crews.get(message.crew_code)
        self.admission.check_entry(session, session.device_id, crew)
        if crew is None:
            raise InvalidCrewCode(f"Crew {message.crew_code} not found")
        self.crews.check_last_seq(crew, message.last_seq)
        held = session.membership(crew.code) is not None
        if not held and len(session.memberships()) >= self.admission.limits.max_crews_per_device:
            raise CrewLimit(f"this device is in {self.admission.limits.max_crews_per_device} crews, "
                            "the most it may be in; leave one first")
        self.crews.become_multi(session)
        session.send(self._crew_joined(session, crew))
        if not held:
            self._enter(session, crew, announce=True, last_seq=message.last_seq)
            self._log_entry("crew_add", session)

    def crew_leave(self, session: Session, message: CrewLeave, size: int) -> None:
        self._bound(session)
        membership = self.crews.held(session, message.crew_code)
        self.crews.end(membership)
        session.send(messages.CrewLeft(membership.crew.code))

    def crews_list(self, session: Session, message: Crews, size: int) -> None:
        self._bound(session)
        listed = []
        for membership in sorted(session.memberships(), key=lambda m: m.joined):
            online, others = self._online(session, membership.crew)
            listed.append(messages.CrewListing(membership.crew.code, membership.crew.name, online, others))
        primary = session.primary.crew.code if session.primary is not None else None
        session.send(messages.CrewList(primary, listed))

    def crew_primary(self, session: Session, message: CrewPrimary, size: int) -> None:
        self._bound(session)
        membership = self.crews.held(session, message.crew_code)
        self.crews.make_primary(session, membership)
        session.send(messages.PrimaryCrew(membership.crew.code))

    def _come_back(self, session: Session, code: str | None = None, last_seq: int | None = None) -> None:
        """
        A multi-crew device entering on a connection (C{register},
        C{create_crew} or C{join_crew}) re-enters every crew it is in, as
        the store keeps them (also after a restart), each replaying what it
        missed there (after C{last_seq} for the crew of C{code}, the one
        its message names), in the order it joined them; its primary is
        what it was.  Nothing for a legacy device, nor for one whose
        connection holds its crews already.
        """
        held = self.crews.held_crews(session.device_id)
        if held is None:
            return
        session.multi = True
        for crew in held:
            self._enter(session, crew, announce=False, last_seq=last_seq if crew.code == code else None)
        self.crews.restore_primary(session)

    def _enter(self, session: Session, crew: Crew, announce: bool, last_seq: int | None = None) -> None:
        """
        Put C{session} in C{crew}; a returning member first gets what it
        missed, then live traffic.
        """
        membership = self.crews.enter(session, crew, announce, last_seq)
        if membership is not None:
            self.replayer.catch_up(membership)

    def _identify(self, session: Session, device_id: str | None, name: str | None,
                  key: str | None = None) -> str | None:
        """
        Make C{session} the connection of C{device_id} (a new id when none
        is given); return a device key issued to it, if one was.
        """
        claimed = device_id is not None
        if device_id is None:
            device_id = session.device_id or self.identity.new_device_id()
        issued = None
        if session.device_id != device_id or key is not None:
            issued = self.identity.authenticate(session, device_id, key, claimed)
        if session.device_id != device_id:
            self.unbind(session)
            previous = self.sessions.bind(session, device_id)
            if previous is not None:
                # A newer connection for the device (a reboot): the old one
                # is detached without telling the crew, and closed.
                self.crews.leave(previous, announce=False)
                self.sessions.replace(previous)
        if name is not None:
            session.name = name
        elif session.name is None:
            session.name = device_id
        return issued

    def unbind(self, session: Session) -> None:
        """
        C{session} is no longer its device's connection: its crew hears
        the device went offline.
        """
        if self.sessions.is_bound(session):
            self.sessions.unbind(session)
            self.crews.leave(session, announce=True)

    @staticmethod
    def _log_entry(action: str, session: Session) -> None:
        """
        The lifecycle line for a device that identified itself: who, from
        where, in which crew (never what it sent).
        """
        _log.info("{action}: device {device_id} from {client_address}, crew {crew_code}", action=action,
                  device_id=session.device_id, client_address=session.address,
                  crew_code=session.crew.code if session.crew is not None else None)

    # ---------------------------------------------------------------- other

    @staticmethod
    def ping(session: Session, message: Ping, size: int) -> None:
        session.send(messages.Pong())

    def ack(self, session: Session, message: Ack, size: int) -> None:
        self.replayer.ack(session, message.seq, message.crew_code)


class CrewMessageHandlers:
    """
    The crew messages a device sends (C{message}, C{share_music},
    C{reaction}): looked up when their C{client_msg_id} may be another
    node's, then published; a refusal from the store is answered, a bug
    closes the sender.
    """

    def __init__(self, sessions: Sessions, delivery: Delivery) -> None:
        self.sessions = sessions
        self.delivery = delivery

    def crew_message(self, session: Session, message: CrewMessage, size: int) -> Deferred | None:
        return self._send(session, messages.RelayedMessage(session.device_id, session.name, message.msg_type,
                                                  message.payload), message, size)

    def share_music(self, session: Session, message: ShareMusic, size: int) -> Deferred | None:
        return self._send(session, messages.MusicShared(message.spotify_uri, message.artist, message.track, message.album,
                                                      session.name), message, size)

    def reaction(self, session: Session, message: Reaction, size: int) -> Deferred | None:
        return self._send(session, messages.RelayedReaction(message.reaction_type, session.name), message, size)

    def _send(self, session: Session, out: Fanout, received: Any, size: int) -> Deferred | None:
        wait = self.delivery.look_up_sent(session, received.client_msg_id, received.crew_code)
        if wait is not None:
            wait.addErrback(Handlers._sent_lookup_failed, received.client_msg_id)
            return wait.addCallback(lambda _: None if session.closing else self._send_now(session, out, received, size))
        self._send_now(session, out, received, size)
        return None

    def _send_now(self, session: Session, out: Fanout, received: Any, size: int) -> None:
        d = self.delivery.send(session, out, received.client_msg_id, received, size)
        if d is not None:
            d.addErrback(self._refuse, session)

    def _refuse(self, failure: Any, session: Session) -> None:
        try:
            if failure.check(ProtocolError):
                session.send(failure.value.as_frame())
                return
            # A bug, not the store refusing: the sender cannot know what
            # became of its message.  It reconnects, and a resend with its
            # client_msg_id is answered as the relay knows it.
            _log.failure("bug while publishing a message from {device_id}", failure,
                         device_id=session.device_id)
        except Exception:
            _log.failure("bug while answering {device_id}", device_id=session.device_id)
        self.sessions.close_for_bug(session)


class SpotifyHandlers:
    """
    What a device asks of Spotify through the relay: pairing, refresh,
    search, forgetting the access the relay keeps and sharing what plays,
    for a bound device of a relay with a Spotify app.
    """

    def __init__(self, sessions: Sessions, pairing: Pairings, spotify_broker: SpotifyBroker,
                 delivery: Delivery | None = None) -> None:
        self.sessions = sessions
        self.pairing = pairing
        self.spotify_broker = spotify_broker
        self.delivery = delivery

    def _spotify_device(self, session: Session) -> None:
        """
        Check that C{session} may ask for anything Spotify: it has a device
        id, and the relay has a Spotify app.

        @raise NotRegistered: no device id yet.
        @raise SpotifyNotConfigured: no Spotify app.
        """
        if not self.sessions.is_bound(session):
            raise NotRegistered("register first (no crew is needed), then ask again")
        if not self.pairing.configured:
            raise SpotifyNotConfigured("this relay has no Spotify app configured")

    def spotify_pair(self, session: Session, message: SpotifyPair, size: int) -> None:
        self._spotify_device(session)
        self.pairing.start(session, message.scopes, message.keep_access)

    def spotify_refresh(self, session: Session, message: SpotifyRefresh, size: int) -> None:
        self._spotify_device(session)
        self.spotify_broker.refresh(session, message)

    def spotify_search(self, session: Session, message: SpotifySearch, size: int) -> None:
        self._spotify_device(session)
        self.spotify_broker.search(session, message)

    def spotify_forget(self, session: Session, message: SpotifyForget, size: int) -> None:
        self._spotify_device(session)
        self.spotify_broker.forget(session)

    def share_now_playing(self, session: Session, message: ShareNowPlaying, size: int) -> None:
        self._spotify_device(session)
        # A crew it is not in is refused before Spotify is asked.
        self.delivery.crew_of(session, message.crew_code)
        self.spotify_broker.share_now_playing(session, message,
                                              lambda track: self._push(session, message, track, size))

    def _push(self, session: Session, message: ShareNowPlaying, track: dict, size: int) -> Deferred | None:
        """
        The track playing for C{session}'s device, to its crew as an
        ordinary C{message} of C{msg_type} C{song_push}; the sender is
        answered C{sent}.
        """
        if session.closing:
            return None
        payload = {"track": track["track"], "artist": track["artist"], "album": track["album"],
                   "spotify_uri": track["spotify_uri"], "album_art_url": track["album_art_url"],
                   "note": message.note}
        out = messages.RelayedMessage(session.device_id, session.name, "song_push", payload)
        return self.delivery.send(session, out, message.client_msg_id, message, size, answer=True)
