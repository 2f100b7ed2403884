"""
What the relay leaves in its data directory for C{leeloo-admin}, each file
readable by the relay's user only:

  - C{config.json}: the effective configuration, written at every start,
    its secrets masked (every field the configuration's dataclasses keep
    out of their repr, C{field(repr=False)}, is a secret);
  - C{admin.token}: the admin API's bearer token, made once (32 random
    bytes, URL-safe) and kept across restarts;
  - C{admin.json}: where the admin API listens, written once its
    C{--admin-listen} endpoints listen, removed at stop.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import secrets
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from leeloo.access import is_loopback

CONFIG_FILE = "config.json"
TOKEN_FILE = "admin.token"
ENDPOINT_FILE = "admin.json"
MASK = "********"

_log = Logger()


def write_private(path: Path, text: str) -> None:
    """
    Write C{text} to C{path} (mode 0600) all at once: a reader sees the old
    file or the new, never half of one.
    """
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def admin_token(data_dir: Path) -> str:
    """
    The admin API's token in C{data_dir}/admin.token, made (0600) if there
    is none; a token file another user may read is tightened.
    """
    path = Path(data_dir) / TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if len(token) < 32:
        token = secrets.token_urlsafe(32)
        write_private(path, token + "\n")
    elif os.stat(path).st_mode & 0o077:
        os.chmod(path, 0o600)
    return token


def described(value: Any) -> Any:
    """
    C{value} (a configuration, or any part of one) as JSON values:
    dataclasses as objects whose secret fields (C{repr=False}) are masked
    when set, paths and other objects as strings.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            out[f.name] = (MASK if item is not None else None) if not f.repr else described(item)
        return out
    if isinstance(value, enum.Enum):
        return described(value.value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [described(v) for v in value]
    if isinstance(value, dict):
        return {str(k): described(v) for k, v in value.items()}
    return str(value)


def config_document(config: Any, version: str) -> str:
    """
    The text of C{config.json}: the relay's version and its configuration
    (L{described}; endpoints as the operator wrote them).
    """
    from leeloo.listening import as_written

    document = described(config)
    for name in ("listen", "redirect_listen", "admin_listen"):
        if isinstance(document.get(name), list):
            document[name] = [as_written(e) for e in document[name]]
    return json.dumps({"version": version, "config": document}, indent=2, sort_keys=True) + "\n"


def _observed(d: Deferred) -> Deferred:
    """
    A Deferred firing as C{d} does, leaving C{d}'s result (a failure too)
    to its other callbacks (L{leeloo.listening.Readiness} reads it).
    """
    seen: Deferred = Deferred()

    def passing(result: Any) -> Any:
        if isinstance(result, Failure):
            seen.errback(result)
        else:
            seen.callback(result)
        return result

    d.addBoth(passing)
    return seen


class DataDirFiles(Service):
    """
    Writes C{config.json} at start, and C{admin.json} once the admin
    listeners listen (removed at stop).

    @param listeners: the C{--admin-listen} L{leeloo.listening.Listener}s.
    """

    name = "admin-files"

    def __init__(self, data_dir: Path, config: Any, version: str, listeners: list = ()) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.version = version
        self.listeners = list(listeners)

    def startService(self) -> None:
        super().startService()
        try:
            write_private(self.data_dir / CONFIG_FILE, config_document(self.config, self.version))
        except OSError as e:
            _log.warn("could not write {path}: {error}", path=str(self.data_dir / CONFIG_FILE),
                      error=e.strerror or str(e))
        if self.listeners:
            gatherResults([_observed(l.listening) for l in self.listeners], consumeErrors=True).addCallbacks(
                self._listening, lambda _: None)

    def _listening(self, ports: list) -> None:
        if not self.running:
            return
        addresses = []
        for listener, port in zip(self.listeners, ports):
            host = port.getHost()
            if getattr(host, "port", None) is None:
                continue
            name = host.host
            # A wildcard address is reached on this host's loopback.
            name = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(name, name)
            url = f"http://[{name}]:{host.port}" if ":" in name else f"http://{name}:{host.port}"
            addresses.append({"listen": listener.description, "url": url})
        # The admin API answers loopback clients only: those addresses first.
        addresses.sort(key=lambda a: not is_loopback(a["url"].removeprefix("http://").rpartition(":")[0].strip("[]")))
        try:
            write_private(self.data_dir / ENDPOINT_FILE,
                          json.dumps({"pid": os.getpid(), "admin": addresses}, indent=2) + "\n")
        except OSError as e:
            _log.warn("could not write {path}: {error}", path=str(self.data_dir / ENDPOINT_FILE),
                      error=e.strerror or str(e))

    def stopService(self) -> None:
        super().stopService()
        if self.listeners:
            (self.data_dir / ENDPOINT_FILE).unlink(missing_ok=True)
