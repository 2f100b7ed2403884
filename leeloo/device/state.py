"""
The device's state directory, compatible with the files deployed LEELOO
devices keep beside each other:

C{crew_config.json}
    C{device_id}, C{crew_id}, C{crew_code}, C{display_name}, as the deployed
    client writes it; the older C{name} / C{invite_code} form is read too.
    Rewritten keeping every other field it holds (the deployed UI keeps
    C{members} there).
C{device_key}
    the device key the relay issued, alone, mode 0600.  Not in
    C{crew_config.json}: deployed code rewrites that file with only its four
    fields, which would drop the key and lock the device out.
C{relay_state.json}
    C{{"last_seq": {CREW: SEQ}}}: the last crew sequence handled, per crew;
    for a multi-crew device (it added a crew: issue 16) also
    C{"multi_crew": true} and C{"crews"}, the codes of its other crews in
    the order added (its main crew is C{crew_config.json}'s).
C{outbox.json}
    C{{"messages": [...]}}: crew messages not yet confirmed by the relay.
C{spotify_tokens.json}
    exactly the C{tokens} object of C{spotify_auth_complete}, as the
    deployed client writes it (mode 0600 here: they are secrets).

Every write is atomic: a temporary file in the same directory, fsync,
rename, fsync of the directory.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CREW_CONFIG = "crew_config.json"
DEVICE_KEY = "device_key"
RELAY_STATE = "relay_state.json"
OUTBOX = "outbox.json"
SPOTIFY_TOKENS = "spotify_tokens.json"

DEFAULT_NAME = "LEELOO"


class StateError(Exception):
    """
    A state file that cannot be read; the message names it and what to do.
    """


def atomic_write(path: Path, data: bytes, mode: int = 0o644, fsync: bool = True) -> None:
    """
    Replace C{path} with C{data} so that a crash leaves either the old file
    or the new one, never a mix: write a temporary file beside it, fsync it,
    rename it over C{path}, fsync the directory.
    """
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    if fsync:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _json_bytes(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, indent=indent, separators=None if indent else (",", ":")).encode("utf-8")


@dataclass
class CrewConfig:
    """
    What C{crew_config.json} says, in either of its formats.
    """

    device_id: str = ""
    crew_id: str = ""
    crew_code: str = ""
    display_name: str = DEFAULT_NAME

    @classmethod
    def from_json(cls, data: Any) -> "CrewConfig":
        """
        Read both formats the deployed client reads: C{crew_code} and
        C{display_name}, or the older C{invite_code} and C{name}.
        """
        if not isinstance(data, dict):
            return cls()

        def text(*names: str, default: str = "") -> str:
            for name in names:
                value = data.get(name)
                if isinstance(value, str) and value:
                    return value
            return default

        if "invite_code" in data:
            return cls(text("device_id"), text("crew_id"), text("invite_code"),
                       text("name", "display_name", default=DEFAULT_NAME))
        return cls(text("device_id"), text("crew_id"), text("crew_code"),
                   text("display_name", "name", default=DEFAULT_NAME))


class DeviceState:
    """
    The files of one device's state directory (created 0700 if missing).
    """

    def __init__(self, directory: str | os.PathLike, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._config_extra: dict = {}
        self.config = self._load_config()
        self.device_key = self._load_key()
        self.last_seq: dict[str, int] = {}
        # A multi-crew device's other crews (in the order added), and
        # whether it is one.
        self.crews: list[str] = []
        self.multi = False
        self._load_positions()
        self.outbox: list[dict] = self._load_outbox()

    def path(self, name: str) -> Path:
        return self.directory / name

    # ------------------------------------------------------------- reading

    def _read_json(self, name: str) -> Any:
        path = self.path(name)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise StateError(f"{path} is not valid JSON: fix it or remove it") from None

    def _load_config(self) -> CrewConfig:
        data = self._read_json(CREW_CONFIG)
        if isinstance(data, dict):
            self._config_extra = data
        return CrewConfig.from_json(data)

    def _load_key(self) -> str | None:
        try:
            key = self.path(DEVICE_KEY).read_text("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateError(f"cannot read {self.path(DEVICE_KEY)}: {e}") from None
        return key or None

    def _load_positions(self) -> None:
        data = self._read_json(RELAY_STATE) or {}
        if not isinstance(data, dict):
            data = {}
        positions = data.get("last_seq", {})
        if not isinstance(positions, dict):
            positions = {}
        self.last_seq = {str(k): v for k, v in positions.items()
                         if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
        crews = data.get("crews", [])
        self.crews = list(dict.fromkeys(c for c in crews if isinstance(c, str) and c)) \
            if isinstance(crews, list) else []
        self.multi = data.get("multi_crew") is True or bool(self.crews)

    def _load_outbox(self) -> list[dict]:
        data = self._read_json(OUTBOX) or {}
        entries = data.get("messages", []) if isinstance(data, dict) else []
        return [e for e in entries
                if isinstance(e, dict) and isinstance(e.get("client_msg_id"), str)
                and isinstance(e.get("message"), dict)]

    # ------------------------------------------------------------- writing

    def _write(self, name: str, data: bytes, mode: int) -> None:
        atomic_write(self.path(name), data, mode, self.fsync)

    def config_changed(self) -> bool:
        """
        Whether the four fields differ from what C{crew_config.json} holds
        (or it does not exist yet).
        """
        c = self.config
        on_disk = self._config_extra
        return not self.path(CREW_CONFIG).exists() or any(
            on_disk.get(k) != v for k, v in (("device_id", c.device_id), ("crew_id", c.crew_id),
                                             ("crew_code", c.crew_code), ("display_name", c.display_name)))

    def save_config(self) -> None:
        """
        Write C{crew_config.json} with the four fields the deployed client
        writes, keeping whatever else the file held; an older-format file
        keeps its C{invite_code} and C{name} in step.
        """
        data = dict(self._config_extra)
        c = self.config
        data.update(device_id=c.device_id, crew_id=c.crew_id, crew_code=c.crew_code,
                    display_name=c.display_name)
        if "invite_code" in data:
            data["invite_code"] = c.crew_code
        if "name" in data:
            data["name"] = c.display_name
        self._config_extra = data
        self._write(CREW_CONFIG, _json_bytes(data, indent=2), 0o644)

    def save_key(self, key: str) -> None:
        self.device_key = key
        self._write(DEVICE_KEY, key.encode("ascii") + b"\n", 0o600)

    def save_positions(self) -> None:
        """
        Write C{relay_state.json}: the positions, and a multi-crew device's
        other crews.
        """
        data: dict = {"last_seq": self.last_seq}
        if self.multi:
            data.update(multi_crew=True, crews=self.crews)
        self._write(RELAY_STATE, _json_bytes(data), 0o600)

    def save_outbox(self) -> None:
        self._write(OUTBOX, _json_bytes({"messages": self.outbox}), 0o600)

    def load_tokens(self) -> dict | None:
        """
        The saved Spotify tokens (C{spotify_tokens.json}), or C{None}.
        """
        tokens = self._read_json(SPOTIFY_TOKENS)
        return tokens if isinstance(tokens, dict) else None

    def save_tokens(self, tokens: dict) -> Path:
        path = self.path(SPOTIFY_TOKENS)
        self._write(SPOTIFY_TOKENS, _json_bytes(tokens, indent=2), 0o600)
        return path
