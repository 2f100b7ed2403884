"""
What the relay forgets, and when: log entries past the retention window,
crews idle past their lifetime, device ids in no crew not seen for as long,
and what it remembers of old C{client_msg_id}s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from leeloo.core.defaults import DAY
from leeloo.store import DELETE_DEVICE, IStore, Journal

if TYPE_CHECKING:
    from leeloo.core.crews import Crews
    from leeloo.core.identity import Identity
    from leeloo.core.sessions import Sessions

_log = Logger()


class Retention:
    """
    @param retention: seconds a logged message is kept and replayed.
    @param crew_ttl: seconds after which a crew with no message and no
        member seen, or a device id in no crew not seen, is forgotten.
    """

    def __init__(self, clock: Any, store: IStore, journal: Journal, crews: Crews, identity: Identity,
                 sessions: Sessions, retention: float, crew_ttl: float) -> None:
        self.clock = clock
        self.store = store
        self.journal = journal
        self.crews = crews
        self.identity = identity
        self.sessions = sessions
        self.retention = retention
        self.crew_ttl = crew_ttl

    def prune(self) -> Deferred:
        """
        Forget what is past its time.  Fires with C{(messages, crews)}
        pruned.
        """
        now = self.clock.seconds()
        cutoff = now - self.retention
        idle_before = now - self.crew_ttl
        crews = self.crews.crews
        stale = [
            crew for crew in crews.values()
            if not self.crews.online(crew) and not self.crews.fanout.elsewhere(crew.code)
            and max(crew.created_at, crew.last_message_at,
                    max((m.last_seen for m in crew.members.values()), default=0.0)) < idle_before
        ]
        for crew in stale:
            self.crews.forget(crew)
        members = {device_id for crew in crews.values() for device_id in crew.members}
        idle_devices = [
            device_id for device_id, record in self.identity.keys.items()
            if device_id not in members and self.crews.fanout.connection(device_id) is None
            and (record.last_seen if record.last_seen is not None else record.created_at) < idle_before
        ]
        for device_id in idle_devices:
            del self.identity.keys[device_id]
            self.journal.put((DELETE_DEVICE, device_id), wait=False)
            self.crews.forget_device(device_id)
        if idle_devices:
            _log.info("retention: forgot {count} device ids in no crew and not seen for {days:g} days",
                      count=len(idle_devices), days=self.crew_ttl / DAY)
        for crew in crews.values():
            if crew.client_messages:
                # The store keeps each crew's newest entry, and with it its
                # client_msg_id: keep remembering that one.
                for key in [k for k, v in crew.client_messages.items()
                            if v.created_at < cutoff and v.waiting is None and v.seq != crew.fanned_seq]:
                    del crew.client_messages[key]
        d = self.journal.barrier().addCallback(lambda _: self.store.prune(cutoff))
        return d.addCallback(lambda deleted: (deleted, len(stale)))
