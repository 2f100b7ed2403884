"""
Device ids and their keys: trust on first use.

A device id the relay has never seen gets a key issued with its first
answer; the key binds the first time the device presents it, and from then
on the id must always present it.  Deployed devices never send a key and
keep working as legacy ids, unless the relay requires keys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING, Any, Callable

from twisted.logger import Logger

from leeloo import messages
from leeloo.messages import DeviceAuthFailed
from leeloo.store import PUT_DEVICE, DeviceRecord, Journal, Snapshot

if TYPE_CHECKING:
    from leeloo.core.sessions import Session

_log = Logger()


def generate_device_id(token_hex: Callable[[int], str] = secrets.token_hex) -> str:
    return messages.DEVICE_ID_PREFIX + token_hex(6)


def generate_device_key() -> str:
    return secrets.token_urlsafe(24)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Identity:
    """
    The device ids the relay knows (C{keys}: id -> L{DeviceRecord}).

    @param require_key: refuse device ids claimed without a key.
    """

    def __init__(self, clock: Any, journal: Journal, require_key: bool,
                 device_id: Callable[[], str] = generate_device_id,
                 device_key: Callable[[], str] = generate_device_key) -> None:
        self.clock = clock
        self.journal = journal
        self.require_key = require_key
        self.new_device_id = device_id
        self._new_device_key = device_key
        self.keys: dict[str, DeviceRecord] = {}

    def restore(self, snapshot: Snapshot) -> None:
        for d in snapshot.devices:
            self.keys[d.device_id] = d

    def adopt(self, record: DeviceRecord | None) -> None:
        """
        Hold C{record}, as the store gave it, unless one is held already.
        """
        if record is not None and record.device_id not in self.keys:
            self.keys[record.device_id] = record

    def refresh(self, record: DeviceRecord | None) -> None:
        """
        Take up C{record} as the store holds it now (another node may
        have bound the key since): a bound key there wins over one held
        here unbound, or bound to another key.
        """
        if record is None:
            return
        held = self.keys.get(record.device_id)
        if held is None or (record.bound and (not held.bound or held.key_hash != record.key_hash)):
            self.keys[record.device_id] = record

    def unseen(self, session: Session, device_id: str | None) -> bool:
        """
        Whether C{session} would be a device id the relay has never seen.
        """
        device_id = device_id or session.device_id
        return device_id is None or device_id not in self.keys

    def authenticate(self, session: Session, device_id: str, key: str | None, claimed: bool) -> str | None:
        """
        Check that C{session} may be C{device_id}; return a newly issued key
        when the id has none bound.

        @param claimed: the device named C{device_id} (rather than being
            given a new one).
        @raise DeviceAuthFailed: it may not.
        """
        now = self.clock.seconds()
        record = self.keys.get(device_id)
        if key is not None:
            digest = key_hash(key)
            if record is None or (not record.bound and hmac.compare_digest(record.key_hash, digest)):
                record = self.keys[device_id] = DeviceRecord(
                    device_id, digest, True, record.created_at if record else now, now)
                self.journal.put((PUT_DEVICE, record), wait=False)
                return None
            if hmac.compare_digest(record.key_hash, digest):
                return None
            self._failed(session, device_id, "wrong key")
            raise DeviceAuthFailed("the device key does not match this device id")
        if record is not None and record.bound:
            self._failed(session, device_id, "no key")
            raise DeviceAuthFailed("this device id is protected by its device key: present it as device_key")
        if claimed and self.require_key:
            self._failed(session, device_id, "legacy id")
            raise DeviceAuthFailed(
                "this relay requires device keys: register without device_id to get a new id and key")
        issued = self._new_device_key()
        record = self.keys[device_id] = DeviceRecord(device_id, key_hash(issued), False, now)
        self.journal.put((PUT_DEVICE, record), wait=False)
        return issued

    def seen(self, device_id: str) -> None:
        """
        Note that C{device_id} was here without entering a crew (a member
        is seen through its memberships), so that it is not pruned.
        """
        record = self.keys.get(device_id)
        if record is not None:
            record = self.keys[device_id] = dataclasses.replace(record, last_seen=self.clock.seconds())
            self.journal.put((PUT_DEVICE, record), key=(PUT_DEVICE, device_id))

    @staticmethod
    def _failed(session: Session, device_id: str, why: str) -> None:
        _log.warn("refused device {device_id} from {client_address}: {why}",
                  device_id=device_id, client_address=session.address, why=why)
