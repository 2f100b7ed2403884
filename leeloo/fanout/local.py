"""
The fan-out of one relay process: listeners in memory, indexed by crew, so
a publication touches only that crew's members.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from zope.interface import implementer

from leeloo.core.peer import Outgoing
from leeloo.fanout import IFanout

_NONE: Mapping[str, Any] = MappingProxyType({})


@implementer(IFanout)
class LocalFanout:
    """
    C{devices}: device id -> its connection (a L{leeloo.core.sessions.Session}).
    """

    # Whether other nodes share the crews (and lookups must ask the store).
    shared = False

    def __init__(self) -> None:
        self._crews: dict[str, dict[str, Any]] = {}
        self.devices: dict[str, Any] = {}

    @property
    def crews_online(self) -> int:
        return len(self._crews)

    def subscribe(self, crew_code: str, device_id: str, listener: Any) -> bool:
        listeners = self._crews.get(crew_code)
        if listeners is None:
            self._crews[crew_code] = {device_id: listener}
            return True
        listeners[device_id] = listener
        return False

    def unsubscribe(self, crew_code: str, device_id: str, listener: Any) -> bool:
        listeners = self._crews.get(crew_code)
        if listeners is None or listeners.get(device_id) is not listener:
            return False
        del listeners[device_id]
        if not listeners:
            del self._crews[crew_code]
        return True

    def listeners(self, crew_code: str) -> Mapping[str, Any]:
        listeners = self._crews.get(crew_code)
        return _NONE if listeners is None else listeners

    @staticmethod
    def elsewhere(crew_code: str) -> Mapping[str, Any]:
        return _NONE

    @staticmethod
    def changed(crew_code: str) -> None:
        pass

    @staticmethod
    def renamed(old: str, new: str) -> None:
        pass

    @staticmethod
    def key_reset(device_id: str) -> None:
        pass

    @staticmethod
    def member_removed(crew_code: str, device_id: str) -> None:
        pass

    def publish(self, crew_code: str, out: Outgoing, sender: Any = None, seq: int = 0) -> int:
        listeners = self._crews.get(crew_code)
        if listeners is None:
            return 0
        reached = 0
        for membership in tuple(listeners.values()):
            if membership.session is sender:
                continue
            reached += 1
            if seq:
                if membership.held is not None:
                    membership.held.append((seq, out))
                    continue
                membership.last_sent_seq = seq
            membership.peer.send(out)
        return reached

    def claim(self, device_id: str, session: Any) -> Any:
        previous = self.devices.get(device_id)
        self.devices[device_id] = session
        return previous if previous is not session else None

    def release(self, device_id: str, session: Any) -> bool:
        if self.devices.get(device_id) is not session:
            return False
        del self.devices[device_id]
        return True

    def connection(self, device_id: str) -> Any:
        return self.devices.get(device_id)

    def send_to_device(self, device_id: str, message: Any) -> bool:
        session = self.devices.get(device_id)
        if session is None:
            return False
        session.send(message)
        return True

    def stats(self) -> dict:
        return {"devices": len(self.devices), "crews_online": len(self._crews)}
