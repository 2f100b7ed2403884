"""
The relay's state read straight from Redis (read only), with the same
answers as L{leeloo.admin.state.Reader} gives from a SQLite database, so
that C{leeloo-admin crews}, C{crew}, C{devices} and C{export} work on a
relay that keeps its state in Redis.  Everything but the logs is read in
one step (one script, atomic in Redis) when the reader is entered.
"""

from __future__ import annotations

from typing import Any, Iterator

from leeloo.admin.state import StateError, export_document
from leeloo.redisstore import BlockingRedis, read_log
from leeloo.redisurl import RedisSettings
from leeloo.sqlitestore import SCHEMA_VERSION
from leeloo.store import Snapshot, StoreError


class RedisReader:
    """
    C{with RedisReader(settings) as r:}, then the methods of
    L{leeloo.admin.state.Reader}.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        try:
            self.redis = BlockingRedis(settings)
        except StoreError as e:
            raise StateError(str(e)) from None
        self.snapshot = Snapshot()

    def __enter__(self) -> RedisReader:
        try:
            self.snapshot = self.redis.snapshot()
        except StoreError as e:
            self.redis.close()
            raise StateError(str(e)) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.redis.close()

    def _count(self, code: str) -> int:
        return int(self.redis.command("HLEN", f"{self.settings.prefix}log:{code}"))

    def crews(self) -> list[dict]:
        out = []
        for c in sorted(self.snapshot.crews, key=lambda c: c.code):
            members = [m for m in self.snapshot.members if m.crew_code == c.code]
            out.append({"code": c.code, "name": c.name, "created_at": c.created_at, "created_by": c.created_by,
                        "members": len(members), "online": sum(m.online for m in members),
                        "bot_users": sum(b.crew_code == c.code for b in self.snapshot.bot_users),
                        "messages": self._count(c.code), "last_seq": self.snapshot.last_seq.get(c.code, 0)})
        return out

    def members(self, code: str) -> list[dict]:
        return [{"device_id": m.device_id, "name": m.name, "last_seen": m.last_seen,
                 "delivered_seq": m.delivered_seq, "acked_seq": m.acked_seq, "online": bool(m.online)}
                for m in sorted(self.snapshot.members, key=lambda m: m.device_id) if m.crew_code == code]

    def bot_users(self, code: str) -> list[dict]:
        return [{"user_id": b.user_id, "name": b.name}
                for b in sorted(self.snapshot.bot_users, key=lambda b: b.user_id) if b.crew_code == code]

    def aliases(self) -> dict[str, str]:
        return dict(sorted(self.snapshot.aliases.items()))

    def log(self, code: str) -> Iterator[dict]:
        for e in read_log(self.redis, code):
            yield {"seq": e.seq, "id": e.id, "sender": e.sender, "client_msg_id": e.client_msg_id,
                   "digest": e.digest.hex() if e.digest is not None else None, "created_at": e.created_at,
                   "ephemeral": bool(e.ephemeral), "payload": e.payload.decode("utf-8", "replace")}

    def devices(self) -> list[dict]:
        crews: dict[str, list[str]] = {}
        for m in sorted(self.snapshot.members, key=lambda m: m.crew_code):
            crews.setdefault(m.device_id, []).append(m.crew_code)
        return [{"device_id": d.device_id, "key_hash": d.key_hash, "bound": bool(d.bound),
                 "created_at": d.created_at, "last_seen": d.last_seen, "crews": crews.get(d.device_id, [])}
                for d in sorted(self.snapshot.devices, key=lambda d: d.device_id)]

    def multi_crew(self) -> list[dict]:
        return [{"device_id": r.device_id, "crews": list(r.crews), "primary": r.primary}
                for r in sorted(self.snapshot.multi_crew, key=lambda r: r.device_id)]

    def tokens(self) -> list[dict]:
        return [{"device_id": t.device_id, "tokens": t.tokens, "expires_at": t.expires_at}
                for t in sorted(self.snapshot.tokens, key=lambda t: t.device_id)]

    def export(self) -> dict:
        return export_document(self, SCHEMA_VERSION)
