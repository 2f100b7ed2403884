"""
C{leeloo-admin [--data-dir DIR] COMMAND ...}: look after a relay's crews
and devices (also C{python3 -m leeloo.admin}).

Commands that only read work on the data directory directly, even while
the relay runs: C{crews}, C{crew CODE}, C{devices}, C{export}, C{config},
C{backup FILE}.  Commands that change state go through the running relay's
admin API (found from C{DATA_DIR/admin.json}, with the token in
C{DATA_DIR/admin.token}), so that the relay and its store never disagree:
C{reset-key DEVICE}, C{remove DEVICE CREW}, C{rename-crew OLD NEW},
C{delete-crew CODE}, C{import FILE}.

A relay on the Redis store (C{--redis}) is read from Redis: the one named
by C{--redis URL}, or else the one the relay of C{--data-dir} wrote in its
C{config.json}, with the password from C{LEELOO_REDIS_PASSWORD} (the
environment, or C{--env-file}).  C{migrate-to-redis URL} copies a stopped
single node's SQLite state into an empty Redis.

Exit status: 0 done; 1 refused (no such crew, the relay not running or
not empty, ...); 2 bad input.  Every problem is one line on stderr.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Sequence, TextIO

# The relay's own default (leeloo.tap.DEFAULT_DATA_DIR), not imported: the
# relay's options module pulls in all of it.
DEFAULT_DATA_DIR = "leeloo-data"
TIMEOUT = 120.0


class Refusal(Exception):
    """
    The command was refused, or cannot be done as things are: exit 1.
    """


class BadInput(Exception):
    """
    The command's input is wrong: exit 2.
    """


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise BadInput(message)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(seconds))


def _code(value: str) -> str:
    from leeloo import messages

    try:
        return messages.normalize_crew_code(value)
    except messages.ProtocolError as e:
        raise BadInput(f"{value!r}: {e.message}") from None


def _device(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 64:
        raise BadInput(f"{value!r} is not a device id (1 to 64 characters)")
    return value


# ------------------------------------------------------------- read only


def _redis_password(args: argparse.Namespace) -> str | None:
    """
    LEELOO_REDIS_PASSWORD from the environment, or else from C{--env-file}.
    """
    from leeloo.redisurl import PASSWORD_SETTING

    if os.environ.get(PASSWORD_SETTING):
        return os.environ[PASSWORD_SETTING]
    if getattr(args, "env_file", None):
        from twisted.python.usage import UsageError

        from leeloo.tap import read_env_file

        try:
            return read_env_file(args.env_file).get(PASSWORD_SETTING) or None
        except UsageError as e:
            raise Refusal(str(e)) from None
    return None


def _redis_settings(args: argparse.Namespace, url: str, ca_file: str | None = None) -> Any:
    from leeloo.redisurl import RedisURLError, parse_redis_url

    try:
        return parse_redis_url(url, password=_redis_password(args), ca_file=ca_file)
    except RedisURLError as e:
        raise BadInput(str(e)) from None


def _redis_of(args: argparse.Namespace) -> Any:
    """
    The Redis the state is in: C{--redis URL}, or else the one the relay of
    C{--data-dir} said it uses (its config.json); C{None} for SQLite.
    """
    if getattr(args, "redis", None):
        return _redis_settings(args, args.redis, getattr(args, "redis_ca", None))
    from leeloo.admin.datadir import CONFIG_FILE

    try:
        document = json.loads((Path(args.data_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
        redis = document["config"]["redis"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(redis, dict) or not isinstance(redis.get("url"), str):
        return None
    return _redis_settings(args, redis["url"], redis.get("ca_file") if isinstance(redis.get("ca_file"), str) else None)


def _reader(args: argparse.Namespace) -> Any:
    from leeloo.admin.state import Reader, StateError, open_database

    redis = _redis_of(args)
    try:
        if redis is not None:
            from leeloo.admin.redisstate import RedisReader

            return RedisReader(redis)
        return Reader(open_database(args.data_dir))
    except StateError as e:
        raise Refusal(str(e)) from None


def _printable(text: str) -> str:
    """
    C{text} (a name a device chose) with what is not printable (a newline,
    say) shown as its escape, so that one line stays one line.
    """
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def cmd_crews(args: argparse.Namespace, out: TextIO) -> None:
    with _reader(args) as r:
        crews = r.crews()
        names = {c["code"]: [_printable(m["name"]) for m in r.members(c["code"])] for c in crews}
    for c in crews:
        out.write(f"{c['code']}  {c['members']} members, {c['online']} online, {c['messages']} messages"
                  f"{': ' + ', '.join(names[c['code']]) if names[c['code']] else ''}\n")
    out.write(f"{len(crews)} crews\n")


def cmd_crew(args: argparse.Namespace, out: TextIO) -> None:
    code = _code(args.code)
    with _reader(args) as r:
        crew = next((c for c in r.crews() if c["code"] == code), None)
        aliases = r.aliases()
        if crew is None:
            renamed = f" (it was renamed {aliases[code]})" if code in aliases else ""
            raise Refusal(f"no crew {code}{renamed}")
        members = r.members(code)
        bots = r.bot_users(code)
    out.write(f"crew {code}" + (f" ({_printable(crew['name'])})" if crew.get("name") else "") + "\n")
    out.write(f"  created      {_when(crew['created_at'])} by {crew['created_by'] or '-'}\n")
    out.write(f"  messages     {crew['messages']} in its log, last seq {crew['last_seq']}\n")
    was = sorted(a for a, target in aliases.items() if target == code)
    if was:
        out.write(f"  renamed from {', '.join(was)}\n")
    out.write(f"  members      {len(members)}, {sum(m['online'] for m in members)} online\n")
    for m in members:
        acked = "-" if m["acked_seq"] is None else m["acked_seq"]
        out.write(f"    {m['device_id']}  {m['name']!r}  {'online' if m['online'] else 'offline'}, "
                  f"last seen {_when(m['last_seen'])}, delivered {m['delivered_seq']}, acked {acked}\n")
    out.write(f"  bot users    {len(bots)}\n")
    for b in bots:
        out.write(f"    {b['user_id']}  {b['name']!r}\n")


def cmd_devices(args: argparse.Namespace, out: TextIO) -> None:
    with _reader(args) as r:
        devices = r.devices()
    for d in devices:
        key = "key bound" if d["bound"] else "key issued, not yet presented"
        out.write(f"{d['device_id']}  {key}, created {_when(d['created_at'])}, "
                  f"last seen {_when(d['last_seen'])}, crews: {', '.join(d['crews']) or '-'}\n")
    out.write(f"{len(devices)} devices\n")


def cmd_export(args: argparse.Namespace, out: TextIO) -> None:
    with _reader(args) as r:
        document = r.export()
    document["exported_at"] = time.time()
    json.dump(document, out, indent=1, sort_keys=True)
    out.write("\n")


def cmd_config(args: argparse.Namespace, out: TextIO) -> None:
    from leeloo.admin.datadir import CONFIG_FILE

    path = Path(args.data_dir) / CONFIG_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Refusal(f"no {path}: the relay writes its configuration there at start; start it once "
                      "with this --data-dir") from None
    except (OSError, ValueError) as e:
        raise Refusal(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    json.dump(document, out, indent=2, sort_keys=True)
    out.write("\n")


def cmd_backup(args: argparse.Namespace, out: TextIO) -> None:
    target = Path(args.file)
    if _redis_of(args) is not None:
        raise Refusal("the relay keeps its state in Redis: back it up with Redis's own persistence "
                      "(its AOF and RDB files, BGSAVE), not with leeloo-admin backup")
    if target.exists():
        raise Refusal(f"{target} exists: back up to a new file")
    r = _reader(args)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        r.db.close()
        raise Refusal(f"cannot create {target}: {e.strerror or e}") from None
    os.close(fd)
    try:
        dest = sqlite3.connect(target, isolation_level=None)
        try:
            # One step: the copy is the database as of one moment.
            r.db.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")
            check = dest.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            dest.close()
    except sqlite3.Error as e:
        target.unlink(missing_ok=True)
        raise Refusal(f"the backup failed: {e}") from None
    finally:
        r.db.close()
    if check != "ok":
        raise Refusal(f"the backup in {target} does not check out ({check}); try again")
    with _reader_of(target) as copy:
        crews = copy.crews()
    out.write(f"backed up {Path(args.data_dir) / 'leeloo.sqlite3'} to {target}: {len(crews)} crews, "
              f"{sum(c['messages'] for c in crews)} messages, {target.stat().st_size} bytes\n")


def _reader_of(path: Path) -> Any:
    from leeloo.admin.state import Reader

    return Reader(sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None))


# ---------------------------------------------------- through the relay


def admin_call(data_dir: str, command: str, arguments: dict) -> dict:
    """
    C{POST /admin/COMMAND} to the relay whose data directory is
    C{data_dir}; its answer.

    @raise Refusal: the relay refused, or cannot be reached.
    @raise BadInput: the relay says the input is wrong.
    """
    from leeloo.admin.datadir import ENDPOINT_FILE, TOKEN_FILE

    directory = Path(data_dir)
    try:
        endpoint = json.loads((directory / ENDPOINT_FILE).read_text(encoding="utf-8"))
        if not endpoint["admin"]:
            raise Refusal("the relay's admin API listens on no TCP address; give it one on loopback: "
                          "--admin-listen tcp:8081:interface=127.0.0.1")
        url = endpoint["admin"][0]["url"]
    except FileNotFoundError:
        raise Refusal(f"no {directory / ENDPOINT_FILE}: the relay is not running with --admin-listen "
                      "(e.g. --admin-listen tcp:8081:interface=127.0.0.1), or not on this data directory") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise Refusal(f"cannot read {directory / ENDPOINT_FILE}: {e}") from None
    try:
        token = (directory / TOKEN_FILE).read_text(encoding="ascii").strip()
    except OSError as e:
        raise Refusal(f"cannot read {directory / TOKEN_FILE}: {e.strerror or e} (run as the relay's user)") from None
    host, _, port = url.removeprefix("http://").rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=TIMEOUT)
    try:
        connection.request("POST", f"/admin/{command}", body=json.dumps(arguments).encode("utf-8"),
                           headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = connection.getresponse()
        raw = response.read()
    except OSError as e:
        raise Refusal(f"the relay does not answer at {url} ({e.strerror or e}): is it running?") from None
    finally:
        connection.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = {}
    if response.status == 200:
        return answer
    message = answer.get("message") or answer.get("error") or f"HTTP {response.status}"
    if response.status == 400:
        raise BadInput(message)
    if response.status == 401:
        raise Refusal(f"the relay at {url} does not take the token in {directory / TOKEN_FILE}: is it this "
                      "data directory's relay? (it writes its token there at start)")
    raise Refusal(f"the relay refused: {message}")


def cmd_reset_key(args: argparse.Namespace, out: TextIO) -> None:
    device = _device(args.device)
    answer = admin_call(args.data_dir, "reset-key", {"device_id": device})
    closed = "; its connection was closed" if answer.get("closed") else ""
    out.write(f"reset device {device}'s key: the next key it presents binds (none: it is issued a new one)"
              f"{closed}\n")


def cmd_remove(args: argparse.Namespace, out: TextIO) -> None:
    device, code = _device(args.device), _code(args.crew)
    answer = admin_call(args.data_dir, "remove", {"device_id": device, "crew_code": code})
    online = "; it was online, and its connection left the crew" if answer.get("online") else ""
    out.write(f"removed {device} from crew {answer.get('crew_code', code)}{online}\n")


def cmd_rename_crew(args: argparse.Namespace, out: TextIO) -> None:
    old, new = _code(args.old), _code(args.new)
    if old == new:
        raise BadInput(f"the old and the new code are both {old}")
    answer = admin_call(args.data_dir, "rename-crew", {"crew_code": old, "new_crew_code": new})
    out.write(f"renamed crew {answer.get('old_crew_code', old)} to {answer.get('crew_code', new)} "
              f"({answer.get('online', 0)} members online told); its members' devices that still have "
              f"{old} are taken to {new} and told the new code when they next join\n")


def cmd_delete_crew(args: argparse.Namespace, out: TextIO) -> None:
    code = _code(args.code)
    answer = admin_call(args.data_dir, "delete-crew", {"crew_code": code})
    out.write(f"deleted crew {answer.get('crew_code', code)} with its members, bot users and log "
              f"({answer.get('online', 0)} members online told, {answer.get('closed', 0)} connections closed)\n")


def cmd_import(args: argparse.Namespace, out: TextIO) -> None:
    from leeloo.admin.state import StateError, read_export

    path = Path(args.file).absolute()
    try:
        read_export(path)
    except StateError as e:
        raise BadInput(f"{args.file}: {e}") from None
    answer = admin_call(args.data_dir, "import", {"file": str(path)})
    out.write(f"imported {answer.get('crews', 0)} crews, {answer.get('members', 0)} members, "
              f"{answer.get('bot_users', 0)} bot users, {answer.get('devices', 0)} devices, "
              f"{answer.get('tokens', 0)} pending tokens and {answer.get('messages', 0)} messages from {path}\n")


def cmd_migrate_to_redis(args: argparse.Namespace, out: TextIO) -> None:
    from leeloo.admin.state import StateError, open_database
    from leeloo.redisstore import MigrationError, migrate_to_redis
    from leeloo.sqlitestore import SCHEMA_VERSION, load_database, read_log, schema_version
    from leeloo.store import StoreError

    settings = _redis_settings(args, args.url, args.redis_ca)
    try:
        db = open_database(args.data_dir)
    except StateError as e:
        raise Refusal(str(e)) from None
    try:
        if schema_version(db) != SCHEMA_VERSION:
            raise Refusal(f"the database in {args.data_dir} is at schema version {schema_version(db)}, not "
                          f"{SCHEMA_VERSION}: start this relay on it once (it migrates it), stop it, and try again")
        # One read transaction: the copy is the state of one moment.
        db.execute("BEGIN")
        try:
            snapshot = load_database(db)
            done = migrate_to_redis(snapshot, lambda code: read_log(db, code), settings)
        finally:
            db.execute("COMMIT")
    except (MigrationError, StoreError) as e:
        raise Refusal(str(e)) from None
    finally:
        db.close()
    out.write(f"copied {done.crews} crews, {done.messages} messages, {done.devices} devices, "
              f"{done.tokens} pending tokens, {done.grants} Spotify grants and {done.pairings} pairing flows from "
              f"{Path(args.data_dir) / 'leeloo.sqlite3'} to {settings.where}; start the relay with "
              f"--redis {settings.url}\n")


def parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--data-dir", "-d", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"the relay's --data-dir (default: {DEFAULT_DATA_DIR})")
    common.add_argument("--redis", metavar="URL", default=argparse.SUPPRESS,
                        help="read the state from this Redis (default: the one the relay of --data-dir "
                             "uses, if any); the password comes from LEELOO_REDIS_PASSWORD")
    common.add_argument("--redis-ca", metavar="FILE", default=argparse.SUPPRESS,
                        help="PEM certificates rediss:// trusts (default: the system's)")
    common.add_argument("--env-file", "-e", metavar="FILE", default=argparse.SUPPRESS,
                        help="the relay's env file, for LEELOO_REDIS_PASSWORD")
    top = _Parser(prog="leeloo-admin", parents=[common],
                  description="Look after a LEELOO relay's crews and devices.",
                  epilog="Exit status: 0 done, 1 refused, 2 bad input.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    def command(name: str, call: Any, help: str, *arguments: tuple[str, str]) -> None:
        p = commands.add_parser(name, help=help, description=help, parents=[common])
        for argument, what in arguments:
            p.add_argument(argument, help=what)
        p.set_defaults(call=call)

    command("crews", cmd_crews, "one line per crew: its code, members, online")
    command("crew", cmd_crew, "one crew: its members, bot users and log", ("code", "the crew's code"))
    command("devices", cmd_devices, "one line per device id: its key (bound or not), when seen, its crews")
    command("export", cmd_export, "the whole state as JSON on standard output (device keys as hashes)")
    command("config", cmd_config, "the relay's effective configuration (secrets masked)")
    command("backup", cmd_backup, "a consistent copy of the database (SQLite's online backup), while it runs",
            ("file", "the new file to write"))
    command("reset-key", cmd_reset_key, "forget a device's key: the next one it presents binds",
            ("device", "the device id"))
    command("remove", cmd_remove, "take a device out of a crew", ("device", "the device id"),
            ("crew", "the crew's code"))
    command("rename-crew", cmd_rename_crew, "give a crew a new code; its members follow",
            ("old", "the crew's code"), ("new", "its new code"))
    command("delete-crew", cmd_delete_crew, "delete a crew with its members, bot users and log",
            ("code", "the crew's code"))
    command("import", cmd_import, "take up an export in an empty relay", ("file", "the export's file"))
    command("migrate-to-redis", cmd_migrate_to_redis,
            "copy a stopped single node's SQLite state into an empty Redis (then start the relay with --redis)",
            ("url", "redis://[USER@]HOST:PORT/DB or rediss://..."))
    return top


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    if out is None:
        out = sys.stdout
        # A name in any script shows, whatever the terminal's encoding.
        if hasattr(out, "reconfigure"):
            out.reconfigure(errors="backslashreplace")
    err = sys.stderr if err is None else err
    # What the CLI creates (a backup; SQLite's -wal and -shm when the relay
    # is not running) is its user's alone.
    os.umask(0o077)
    try:
        args = parser().parse_args(argv)
        if not hasattr(args, "data_dir"):
            args.data_dir = DEFAULT_DATA_DIR
        if not hasattr(args, "redis_ca"):
            args.redis_ca = None
        args.call(args, out)
    except BadInput as e:
        err.write(f"leeloo-admin: {e}\n")
        return 2
    except Refusal as e:
        err.write(f"leeloo-admin: {e}\n")
        return 1
    except SystemExit as e:
        # --help
        return int(e.code or 0)
    except BrokenPipeError:
        return 1
    return 0
