"""
The device client's crews beyond its main one (issue 16): L{SeveralCrews},
the part of L{leeloo.device.client.LeelooDevice} that adds, leaves and
lists crews, and comes back to them on every connection.

The main crew is the one C{crew_config.json} names, entered as deployed
devices enter theirs; a multi-crew device's other crews are kept in
C{relay_state.json} (L{leeloo.device.state.DeviceState.crews}).  The
relay's answers to C{crew_add}, C{crew_leave} and C{crews} carry no request
id, so these go one at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger

from leeloo import messages
from leeloo.messages import CrewJoined, CrewLeft, CrewList, InvalidMessage, NotInCrew, ProtocolError

if TYPE_CHECKING:
    from leeloo.device.state import DeviceState

# The errors that answer a crew_add, crew_leave or crews.
CREW_ERRORS = ("invalid_crew_code", "crew_limit", "not_in_crew", "rate_limited", "not_registered",
               "invalid_last_seq", "invalid_message", "unknown_type")

_log = Logger()


class SeveralCrews:
    """
    A device's crews: L{crew_add}, L{crew_leave}, L{crews} and
    L{held_crews}.  Mixed into L{leeloo.device.client.LeelooDevice}, whose
    connection, state and events it uses (C{_emit}, C{_stopped},
    C{_drop_other_crews}).
    """

    state: DeviceState
    phase: str
    crew_code: str | None
    reactor: Any
    _proto: Any
    _target: tuple
    stopped_by: Exception | None

    def _init_crews(self) -> None:
        # crew_add / crew_leave / crews: (frame, Deferred or None for the
        # device's own re-adds), the first one sent (True) or waiting to be.
        self._crew_calls: list[tuple[dict, Deferred | None]] = []
        self._crew_sent = False
        self._crew_timer: Any = None

    @property
    def held_crews(self) -> list[str]:
        """
        The codes of the crews this device is in as it knows them: its main
        crew (C{crew_config.json}'s) first, then the others in the order
        added.
        """
        main = self.crew_code or self.state.config.crew_code or None
        return ([main] if main else []) + [c for c in self.state.crews if c != main]

    def crew_add(self, crew_code: str) -> Deferred:
        """
        Add the existing crew C{crew_code} to this device's crews, keeping
        the others: the device is multi-crew from then on, and comes back
        to it on every connection.  Fires with the relay's C{crew_joined}
        frame (its C{crew_name} when the crew has one); fails with
        L{messages.InvalidCrewCode} (no such crew: C{crew_add} never
        creates one), the relay's C{crew_limit} or C{rate_limited}, or
        L{DeviceStopped}.  Offline, it waits for the connection.
        """
        try:
            code = messages.normalize_crew_code(crew_code)
        except ProtocolError as e:
            return fail(e)
        if not code:
            return fail(InvalidMessage("crew_add needs a crew code"))
        return self._crew_call({"type": "crew_add", "crew_code": code})

    def crew_leave(self, crew_code: str) -> Deferred:
        """
        Leave crew C{crew_code} for good (nothing of it is replayed); its
        unsent messages are dropped (their sends fail with
        L{messages.NotInCrew}).  Leaving the main crew makes the
        earliest-added other crew the main one, as the relay makes it
        primary.  Fires with the relay's C{crew_left} frame; fails with
        L{messages.NotInCrew} for a crew the device is not in.
        """
        try:
            code = messages.normalize_crew_code(crew_code)
        except ProtocolError as e:
            return fail(e)
        if code not in self.held_crews:
            return fail(NotInCrew(f"this device is not in crew {code}"))
        return self._crew_call({"type": "crew_leave", "crew_code": code})

    def crews(self) -> Deferred:
        """
        Ask the relay which crews this device is in.  Fires with its
        C{crews} frame: C{primary}, and C{crews}, each with C{crew_code},
        C{crew_name}, C{members_online} (the device included) and
        C{member_names} (the others).
        """
        return self._crew_call({"type": "crews"})

    def _crew_call(self, frame: dict) -> Deferred:
        stopped = self._stopped()
        if stopped is not None:
            return stopped
        d = Deferred()
        self._crew_calls.append((frame, d))
        self._send_crew_call()
        return d

    def _send_crew_call(self) -> None:
        if self._crew_calls and not self._crew_sent and self.phase == "ready" and self._proto is not None \
                and self._crew_timer is None:
            self._crew_sent = True
            frame = dict(self._crew_calls[0][0])
            code = frame.get("crew_code")
            if frame["type"] == "crew_add" and code in self.state.last_seq:
                frame["last_seq"] = self.state.last_seq[code]
            self._proto.send_frame(frame)

    def _readd_crews(self) -> None:
        """
        A multi-crew device entered its main crew: add its other crews
        again (the relay answers a crew it still holds C{crew_joined}, with
        nothing replayed twice), before anything the application asked.
        """
        queued = {f.get("crew_code") for f, d in self._crew_calls if d is None}
        adds: list[tuple[dict, Deferred | None]] = [
            ({"type": "crew_add", "crew_code": code}, None)
            for code in self.state.crews if code != self.crew_code and code not in queued]
        at = 1 if self._crew_sent else 0
        self._crew_calls[at:at] = adds
        self._send_crew_call()

    @staticmethod
    def _answers(call: dict, message: Any) -> bool:
        if call["type"] == "crew_add":
            return isinstance(message, CrewJoined) and message.crew_code == call["crew_code"]
        if call["type"] == "crew_leave":
            return isinstance(message, CrewLeft) and message.crew_code == call["crew_code"]
        return isinstance(message, CrewList)

    def _crew_answered(self, message: CrewJoined | CrewLeft | CrewList, frame: dict) -> None:
        if self._crew_calls and self._crew_sent and self._answers(self._crew_calls[0][0], message):
            call, d = self._crew_calls.pop(0)
            self._crew_sent = False
            if call["type"] == "crew_add":
                self._added(call["crew_code"])
            elif call["type"] == "crew_leave":
                self._left(call["crew_code"])
            if d is not None:
                d.callback(frame)
            self._send_crew_call()
        self._emit(frame["type"], frame)

    def _added(self, code: str) -> None:
        state = self.state
        changed = not state.multi
        state.multi = True
        if code != self.crew_code and code not in state.crews:
            state.crews.append(code)
            changed = True
        if changed:
            state.save_positions()

    def _left(self, code: str) -> None:
        state = self.state
        if code in state.crews:
            state.crews.remove(code)
        state.last_seq.pop(code, None)
        c = state.config
        if code == self.crew_code:
            # The earliest-added other crew is the main one now (the relay
            # makes it primary), or none.
            self.crew_code = state.crews.pop(0) if state.crews else None
            c.crew_code = c.crew_id = self.crew_code or ""
            state.save_config()
            self._target = ("join", self.crew_code, False) if self.crew_code else ("register", None, False)
        state.save_positions()
        self._drop_other_crews()

    def _crew_refused(self, error: Exception) -> None:
        call, d = self._crew_calls[0]
        code = call.get("crew_code")
        if getattr(error, "code", None) == "rate_limited":
            self._crew_sent = False

            def again() -> None:
                self._crew_timer = None
                self._send_crew_call()

            self._crew_timer = self.reactor.callLater(error.retry_after, again)
            return
        if getattr(error, "code", None) == "invalid_last_seq" and code in self.state.last_seq:
            self.state.last_seq.pop(code)
            self.state.save_positions()
            self._crew_sent = False
            self._send_crew_call()
            return
        self._crew_calls.pop(0)
        self._crew_sent = False
        if d is not None:
            d.errback(error)
        elif call["type"] == "crew_add":
            _log.warn("could not add crew {crew_code} again: {error}", crew_code=code, error=str(error))
            if getattr(error, "code", None) == "invalid_crew_code" and code in self.state.crews:
                # The relay lost it: it is no longer one of this device's crews.
                self.state.crews.remove(code)
                self.state.save_positions()
        self._send_crew_call()

    def _fail_crew_calls(self, error: Exception) -> None:
        calls, self._crew_calls = self._crew_calls, []
        self._crew_sent = False
        self._cancel_crew_timer()
        for _, d in calls:
            if d is not None:
                d.errback(error)

    def _cancel_crew_timer(self) -> None:
        if self._crew_timer is not None:
            if self._crew_timer.active():
                self._crew_timer.cancel()
            self._crew_timer = None

