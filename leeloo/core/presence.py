"""
Who hears of a member coming and going.

A device that leaves its crew is announced C{member_offline} only after the
presence grace: back within it, the crew hears neither its leaving nor its
return (only those who came online since hear it joined), so a device that
reconnects on its own schedule does not flicker on its friends' screens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leeloo import messages
from leeloo.core.peer import Outgoing

if TYPE_CHECKING:
    from leeloo.core.crews import Crew, Crews, Membership


class Presence:
    """
    @param grace: seconds a device's crew hears nothing of it leaving; 0
        announces at once.
    """

    def __init__(self, clock: Any, crews: Crews, grace: float) -> None:
        self.clock = clock
        self.crews = crews
        self.grace = grace
        # (crew code, device id) -> (the timer announcing it offline, the
        # sessions online in the crew when it left)
        self._leaving: dict[tuple[str, str], tuple[Any, frozenset]] = {}

    def entered(self, membership: Membership, announce: bool) -> None:
        """
        C{membership} came online: its crew hears C{member_joined} when
        C{announce}; back within the grace, only those who came since do.
        """
        crew, session = membership.crew, membership.session
        witnesses = self._returned(crew, session.device_id)
        if witnesses is not None:
            joined = Outgoing(messages.MemberJoined(session.device_id, session.name, crew.code))
            for other in tuple(self.crews.online(crew).values()):
                if other is not membership and other.session not in witnesses:
                    other.peer.send(joined)
        elif announce:
            joined = Outgoing(messages.MemberJoined(session.device_id, session.name, crew.code))
            self.crews.fanout.publish(crew.code, joined, session)

    def left(self, membership: Membership) -> None:
        """
        Tell C{membership}'s crew that its device went offline, unless it is
        back within the grace.
        """
        crew, session = membership.crew, membership.session
        out = Outgoing(messages.MemberOffline(session.device_id, session.name, crew.code))
        if self.grace <= 0:
            self.crews.fanout.publish(crew.code, out)
            return
        key = (crew.code, session.device_id)
        earlier = self._leaving.pop(key, None)
        if earlier is not None:
            earlier[0].cancel()
        call = self.clock.callLater(self.grace, self._gone, crew, key, out)
        self._leaving[key] = (call, frozenset(m.session for m in self.crews.online(crew).values()))

    def _gone(self, crew: Crew, key: tuple[str, str], out: Outgoing) -> None:
        del self._leaving[key]
        if not self.crews.online_anywhere(crew, key[1]) and self.crews.crews.get(crew.code) is crew:
            self.crews.fanout.publish(crew.code, out)

    def _returned(self, crew: Crew, device_id: str) -> frozenset | None:
        """
        If C{device_id} left C{crew} within the grace, take back the
        announcement of its leaving: return who was online then.
        """
        leaving = self._leaving.pop((crew.code, device_id), None)
        if leaving is None:
            return None
        leaving[0].cancel()
        return leaving[1]

    def renamed(self, old: str, new: str) -> None:
        """
        Crew C{old} is called C{new} now: who is leaving it still is.
        """
        for key in [k for k in self._leaving if k[0] == old]:
            self._leaving[(new, key[1])] = self._leaving.pop(key)

    def cancel_all(self) -> None:
        """
        Announce no one (the relay is stopping: nobody is left to tell).
        """
        for call, _ in self._leaving.values():
            call.cancel()
        self._leaving.clear()
