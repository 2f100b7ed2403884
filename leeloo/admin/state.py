"""
The relay's state read straight from its database (read only, in one
transaction, so even while the relay runs every read agrees with the
others), and as one JSON document: what C{leeloo-admin export} prints and
C{import} takes.

The document (C{"format": "leeloo-export"}, C{"version": 1}):

  - C{crews}: each with C{code}, C{name} (what create_crew named it, or
    null), C{created_at}, C{created_by},
    C{members} (C{device_id}, C{name}, C{last_seen}, C{delivered_seq},
    C{acked_seq}, C{online}), C{bot_users} (C{user_id}, C{name}),
    C{aliases} (the codes it was renamed from) and C{log} (C{seq}, C{id},
    C{sender}, C{client_msg_id}, C{digest} in hex, C{created_at},
    C{ephemeral}, and C{payload}: the frame as stored, a JSON text);
  - C{devices}: C{device_id}, C{key_hash} (a device's key itself is
    never stored), C{bound}, C{created_at}, C{last_seen};
  - C{pending_tokens}: the Spotify tokens parked for devices that were
    offline, as stored (C{device_id}, C{tokens}, C{expires_at});
  - C{multi_crew}: the multi-crew devices (C{device_id}, C{crews}: their
    codes in the order joined, C{primary}).

Times are the relay's, seconds since the Unix epoch.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from leeloo import messages
from leeloo.core.operator import Imported
from leeloo.sqlitestore import DATABASE_NAME
from leeloo.store import (
    BotUserRecord, CrewRecord, DeviceRecord, LogEntry, MemberRecord, MultiCrewRecord, Snapshot, TokenRecord,
)

FORMAT = "leeloo-export"
VERSION = 1
# The oldest schema these reads understand (crew aliases came with 7).
MIN_SCHEMA = 6


class StateError(Exception):
    """
    The database or the document cannot be read; the message says why.
    """


def open_database(data_dir: Path | str) -> sqlite3.Connection:
    """
    The relay's database in C{data_dir}, opened read only.

    @raise StateError: there is none, or it is not one.
    """
    path = Path(data_dir) / DATABASE_NAME
    if not path.is_file():
        raise StateError(f"no database in {data_dir} (no {DATABASE_NAME}): is --data-dir the relay's?")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as e:
        raise StateError(f"cannot read {path}: {e}") from None
    if version < MIN_SCHEMA:
        db.close()
        raise StateError(f"{path} is at schema version {version}: start the relay once to migrate it")
    return db


class Reader:
    """
    Reads from an open database, all in one read transaction (C{with
    Reader(db) as r:}).
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.aliases_table = "crew_aliases" in tables
        self.multi_table = "multi_crew_devices" in tables
        self.crew_names = any(row[1] == "name" for row in db.execute("PRAGMA table_info(crews)"))

    def __enter__(self) -> Reader:
        self.db.execute("BEGIN")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.db.execute("COMMIT")

    def crews(self) -> list[dict]:
        """
        Every crew with its counts, by code.
        """
        name = "c.name" if self.crew_names else "NULL"
        rows = self.db.execute(
            f"SELECT c.code, {name}, c.created_at, c.created_by, "
            "(SELECT COUNT(*) FROM members m WHERE m.crew_code = c.code), "
            "(SELECT COUNT(*) FROM members m WHERE m.crew_code = c.code AND m.online), "
            "(SELECT COUNT(*) FROM bot_users b WHERE b.crew_code = c.code), "
            "(SELECT COUNT(*) FROM messages l WHERE l.crew_code = c.code), "
            "(SELECT MAX(seq) FROM messages l WHERE l.crew_code = c.code) "
            "FROM crews c ORDER BY c.code")
        return [{"code": code, "name": crew_name, "created_at": created, "created_by": by, "members": members,
                 "online": online, "bot_users": bots, "messages": count, "last_seq": last or 0}
                for code, crew_name, created, by, members, online, bots, count, last in rows]

    def members(self, code: str) -> list[dict]:
        return [{"device_id": d, "name": name, "last_seen": seen, "delivered_seq": delivered,
                 "acked_seq": acked, "online": bool(online)}
                for d, name, seen, delivered, acked, online in self.db.execute(
                    "SELECT device_id, display_name, last_seen, delivered_seq, acked_seq, online "
                    "FROM members WHERE crew_code = ? ORDER BY device_id", (code,))]

    def bot_users(self, code: str) -> list[dict]:
        return [{"user_id": user, "name": name} for user, name in self.db.execute(
            "SELECT user_id, display_name FROM bot_users WHERE crew_code = ? ORDER BY user_id", (code,))]

    def aliases(self) -> dict[str, str]:
        if not self.aliases_table:
            return {}
        return dict(self.db.execute("SELECT code, crew_code FROM crew_aliases ORDER BY code"))

    def log(self, code: str) -> Iterator[dict]:
        for seq, id, sender, cmid, digest, created, payload, ephemeral in self.db.execute(
            "SELECT seq, id, sender, client_msg_id, digest, created_at, payload, ephemeral "
            "FROM messages WHERE crew_code = ? ORDER BY seq", (code,)
        ):
            yield {"seq": seq, "id": id, "sender": sender, "client_msg_id": cmid,
                   "digest": bytes(digest).hex() if digest is not None else None, "created_at": created,
                   "ephemeral": bool(ephemeral), "payload": bytes(payload).decode("utf-8", "replace")}

    def devices(self) -> list[dict]:
        """
        Every device id with its key's hash, and the crews it is a member of.
        """
        crews: dict[str, list[str]] = {}
        for device, code in self.db.execute("SELECT device_id, crew_code FROM members ORDER BY crew_code"):
            crews.setdefault(device, []).append(code)
        return [{"device_id": d, "key_hash": key_hash, "bound": bool(bound), "created_at": created,
                 "last_seen": seen, "crews": crews.get(d, [])}
                for d, key_hash, bound, created, seen in self.db.execute(
                    "SELECT device_id, key_hash, bound, created_at, last_seen FROM devices ORDER BY device_id")]

    def multi_crew(self) -> list[dict]:
        if not self.multi_table:
            return []
        return [{"device_id": d, "crews": json.loads(crews), "primary": primary}
                for d, crews, primary in self.db.execute(
                    "SELECT device_id, crews, primary_crew FROM multi_crew_devices ORDER BY device_id")]

    def tokens(self) -> list[dict]:
        return [{"device_id": d, "tokens": json.loads(tokens), "expires_at": expires}
                for d, tokens, expires in self.db.execute(
                    "SELECT device_id, tokens, expires_at FROM pending_tokens ORDER BY device_id")]

    def export(self) -> dict:
        """
        The whole state as the export document.
        """
        return export_document(self, self.db.execute("PRAGMA user_version").fetchone()[0])


def export_document(reader: Any, schema: int) -> dict:
    """
    The export document of the state a reader (of SQLite, or of Redis)
    reads, written at C{schema}.
    """
    aliases = reader.aliases()
    crews = []
    for crew in reader.crews():
        code = crew["code"]
        crews.append({
            "code": code, "name": crew["name"], "created_at": crew["created_at"],
            "created_by": crew["created_by"],
            "members": reader.members(code), "bot_users": reader.bot_users(code),
            "aliases": sorted(a for a, target in aliases.items() if target == code),
            "log": list(reader.log(code)),
        })
    devices = [{k: v for k, v in d.items() if k != "crews"} for d in reader.devices()]
    return {"format": FORMAT, "version": VERSION, "schema": schema, "crews": crews, "devices": devices,
            "pending_tokens": reader.tokens(), "multi_crew": reader.multi_crew()}


# ------------------------------------------------------------------ import


def _get(obj: Any, name: str, kinds: tuple, where: str, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise StateError(f"{where} must be a JSON object")
    value = obj.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in kinds:
        value = None
    if not isinstance(value, kinds):
        raise StateError(f"{where}: {name} is missing or not {' or '.join(k.__name__ for k in kinds)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise StateError(f"{where}: {name} must be finite")
    return value


def _time(obj: Any, name: str, where: str, optional: bool = False) -> float | None:
    value = _get(obj, name, (int, float), where, optional)
    return None if value is None else float(value)


def _list(obj: Any, name: str, where: str) -> list:
    value = obj.get(name, []) if isinstance(obj, dict) else None
    if not isinstance(value, list):
        raise StateError(f"{where}: {name} must be a list")
    return value


def _code(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise StateError(f"{where}: a crew code must be a string")
    try:
        code = messages.normalize_crew_code(value)
    except messages.ProtocolError as e:
        raise StateError(f"{where}: {e.message}") from None
    if code != value:
        raise StateError(f"{where}: crew code {value!r} is not as the relay writes it ({code!r})")
    return code


def parse_export(text: str | bytes) -> Imported:
    """
    The state a document written by L{Reader.export} holds, checked.

    @raise StateError: it is not such a document; the message names the
        first problem.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(f"not a leeloo-admin export (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise StateError(f"export version {doc.get('version')!r}; this relay reads version {VERSION}")
    snapshot = Snapshot()
    entries: list[LogEntry] = []
    codes: set[str] = set()
    for i, crew in enumerate(_list(doc, "crews", "the export")):
        where = f"crews[{i}]"
        code = _code(_get(crew, "code", (str,), where), where)
        if code in codes:
            raise StateError(f"{where}: crew {code} appears twice")
        codes.add(code)
        where = f"crew {code}"
        snapshot.crews.append(CrewRecord(code, _time(crew, "created_at", where),
                                         _get(crew, "created_by", (str,), where, optional=True),
                                         _get(crew, "name", (str,), where, optional=True)))
        seen_members: set[str] = set()
        for m in _list(crew, "members", where):
            device = _get(m, "device_id", (str,), f"{where} member")
            if device in seen_members:
                raise StateError(f"{where}: member {device} appears twice")
            seen_members.add(device)
            w = f"{where} member {device}"
            snapshot.members.append(MemberRecord(
                code, device, _get(m, "name", (str,), w), _time(m, "last_seen", w),
                _get(m, "delivered_seq", (int,), w), _get(m, "acked_seq", (int,), w, optional=True),
                # Nobody is connected to the relay it goes into.
                False))
        for b in _list(crew, "bot_users", where):
            w = f"{where} bot user"
            snapshot.bot_users.append(BotUserRecord(code, _get(b, "user_id", (str,), w), _get(b, "name", (str,), w)))
        for alias in _list(crew, "aliases", where):
            snapshot.aliases[_code(alias, f"{where} alias")] = code
        last = 0
        for e in _list(crew, "log", where):
            seq = _get(e, "seq", (int,), f"{where} log entry")
            w = f"{where} log entry {seq}"
            if seq <= last:
                raise StateError(f"{w}: sequence numbers must rise")
            last = seq
            digest = _get(e, "digest", (str,), w, optional=True)
            try:
                digest_bytes = bytes.fromhex(digest) if digest is not None else None
            except ValueError:
                raise StateError(f"{w}: digest is not hex") from None
            payload = _get(e, "payload", (str,), w)
            entries.append(LogEntry(
                code, seq, _get(e, "id", (str,), w), _get(e, "sender", (str,), w),
                _get(e, "client_msg_id", (str,), w, optional=True), digest_bytes, _time(e, "created_at", w),
                payload.encode("utf-8"), bool(_get(e, "ephemeral", (bool,), w, optional=True))))
    for alias, code in snapshot.aliases.items():
        if alias in codes:
            raise StateError(f"alias {alias} of crew {code} is a crew's code too")
    devices: set[str] = set()
    for d in _list(doc, "devices", "the export"):
        device = _get(d, "device_id", (str,), "a device")
        if device in devices:
            raise StateError(f"device {device} appears twice")
        devices.add(device)
        w = f"device {device}"
        key_hash = _get(d, "key_hash", (str,), w)
        if len(key_hash) != 64 or any(c not in "0123456789abcdef" for c in key_hash):
            raise StateError(f"{w}: key_hash is not a SHA-256 in hex")
        snapshot.devices.append(DeviceRecord(device, key_hash, _get(d, "bound", (bool,), w),
                                             _time(d, "created_at", w), _time(d, "last_seen", w, optional=True)))
    for t in _list(doc, "pending_tokens", "the export"):
        device = _get(t, "device_id", (str,), "a pending token")
        w = f"the token pending for {device}"
        snapshot.tokens.append(TokenRecord(device, _get(t, "tokens", (dict,), w), _time(t, "expires_at", w)))
    for m in _list(doc, "multi_crew", "the export"):
        device = _get(m, "device_id", (str,), "a multi-crew device")
        w = f"multi-crew device {device}"
        held = [_code(c, w) for c in _list(m, "crews", w)]
        missing = [c for c in held if c not in codes]
        if missing:
            raise StateError(f"{w}: crew {missing[0]} is not in the export")
        primary = _get(m, "primary", (str,), w, optional=True)
        if primary is not None and primary not in held:
            raise StateError(f"{w}: primary {primary} is not one of its crews")
        snapshot.multi_crew.append(MultiCrewRecord(device, tuple(held), primary))
    return Imported(snapshot, entries)


def read_export(path: str | Path) -> Imported:
    """
    L{parse_export} of the file at C{path}.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_export(data)
