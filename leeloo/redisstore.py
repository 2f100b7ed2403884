"""
The Redis store: the relay's state in Redis behind the same interfaces as
SQLite (L{leeloo.store.IStore}), so the core does not know which engine
runs.  Every batch of the journal is one Lua script (atomic in Redis,
checked before it changes anything); the keys are described in
L{leeloo.redisscripts}.

The client is txredisapi's protocol on the default reactor, connected by
Twisted's own L{ClientService} (reconnection with backoff) over
C{HostnameEndpoint}, with TLS from L{optionsForClientTLS} for
C{rediss://} (the certificate and host name verified).  While there is no
connection every operation fails at once with a transient L{StoreError}:
the relay answers C{store_unavailable}, keeps its connections open, and
resumes once the client is back.

The state is read once at start, before the reactor runs, like SQLite's:
the same protocol, driven over a blocking socket (L{BlockingRedis}).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from dataclasses import dataclass
from hashlib import sha1
from typing import Any, Callable, Iterable

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import protocol
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from leeloo import redisscripts
from leeloo.redisurl import RedisSettings
from leeloo.store import (
    APPEND,
    DELETE_CREW,
    DELETE_DEVICE,
    DELETE_GRANT,
    DELETE_MEMBER,
    DELETE_MULTI_CREW,
    DELETE_TOKEN,
    PUT_ALIAS,
    PUT_BOT_USER,
    PUT_CREW,
    PUT_DEVICE,
    PUT_GRANT,
    PUT_MEMBER,
    PUT_MULTI_CREW,
    PUT_TOKEN,
    RENAME_CREW,
    BotUserRecord,
    CrewRecord,
    DeviceRecord,
    GrantRecord,
    IPairings,
    IStore,
    LogEntry,
    MemberRecord,
    MultiCrewRecord,
    PairingRecord,
    Replay,
    Sequences,
    Snapshot,
    StoreError,
    TokenRecord,
    _replay_window,
    encode_tokens,
)

_log = Logger()

# ------------------------------------------------------------ encoding


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _seq(value: int) -> str:
    return str(int(value))


def _time(value: float) -> str:
    return repr(float(value))


def _encode(ops: list) -> list:
    """
    The write script's arguments for C{ops}.

    @raise ValueError: an unknown operation (nothing is sent).
    """
    args: list = []
    for kind, arg in ops:
        if kind == PUT_CREW:
            args += ["crew", arg.code, _dumps([arg.created_at, arg.created_by, arg.name])]
        elif kind == DELETE_CREW:
            args += ["delete_crew", arg]
        elif kind == PUT_MEMBER:
            args += ["member", arg.crew_code, arg.device_id,
                     _dumps([arg.name, arg.last_seen, arg.delivered_seq, arg.acked_seq, arg.online])]
        elif kind == DELETE_MEMBER:
            args += ["delete_member", arg[0], arg[1]]
        elif kind == PUT_BOT_USER:
            args += ["bot_user", arg.crew_code, arg.user_id, arg.name]
        elif kind == PUT_TOKEN:
            args += ["token", arg.device_id, _dumps([encode_tokens(arg.tokens), arg.expires_at])]
        elif kind == DELETE_TOKEN:
            args += ["delete_token", arg]
        elif kind == APPEND:
            meta = {"id": arg.id, "sender": arg.sender, "cmid": arg.client_msg_id,
                    "digest": arg.digest.hex() if arg.digest is not None else None,
                    "at": arg.created_at, "eph": bool(arg.ephemeral)}
            split = _split_stamp(arg) if arg.renumber is not None else None
            if split is not None:
                # Redis mints the number: the payload around its stamp.
                args += ["mint", arg.crew_code, _seq(arg.seq), _dumps(meta), split[0], _time(arg.created_at),
                         split[1]]
            else:
                args += ["append", arg.crew_code, _seq(arg.seq), _dumps(meta), bytes(arg.payload),
                         _time(arg.created_at), ""]
        elif kind == PUT_DEVICE:
            args += ["device", arg.device_id, _dumps([arg.key_hash, arg.bound, arg.created_at, arg.last_seen])]
        elif kind == DELETE_DEVICE:
            args += ["delete_device", arg]
        elif kind == PUT_MULTI_CREW:
            args += ["multi_crew", arg.device_id, _dumps([list(arg.crews), arg.primary])]
        elif kind == DELETE_MULTI_CREW:
            args += ["delete_multi_crew", arg]
        elif kind == PUT_GRANT:
            # Ciphertext (leeloo.sealing), kept as it is.
            args += ["grant", arg.device_id, arg.sealed]
        elif kind == DELETE_GRANT:
            args += ["delete_grant", arg]
        elif kind == RENAME_CREW:
            args += ["rename_crew", arg[0], arg[1]]
        elif kind == PUT_ALIAS:
            args += ["alias", arg[0], arg[1]]
        else:
            raise ValueError(f"unknown store operation {kind!r}")
    return args


def _split_stamp(entry: LogEntry) -> tuple[bytes, bytes] | None:
    """
    C{entry}'s payload as the bytes before and after the digits of its
    stamped sequence number (L{leeloo.messages.stamped} puts C{"seq":N}
    just before C{"id"}, after the message's own fields, so the last such
    stamp is it); C{None} if there is none.
    """
    payload = bytes(entry.payload)
    stamp = b'"seq":%d,"id":' % entry.seq
    at = payload.rfind(stamp)
    if at < 0:
        return None
    head = at + len(b'"seq":')
    return payload[:head], payload[head + len(str(entry.seq)):]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _pairs(flat: list) -> Iterable[tuple[str, str]]:
    for i in range(0, len(flat), 2):
        yield _text(flat[i]), _text(flat[i + 1])


def _entry(code: str, seq: Any, meta: bytes | str) -> LogEntry:
    m = json.loads(meta)
    digest = bytes.fromhex(m["digest"]) if m["digest"] is not None else None
    return LogEntry(code, int(seq), m["id"], m["sender"], m["cmid"], digest, m["at"], b"", m["eph"])


def _pairing(user_code: str, value: str) -> PairingRecord:
    return PairingRecord(**json.loads(value))


def _pairing_value(record: PairingRecord) -> str:
    return _dumps({name: getattr(record, name) for name in record.__slots__})


def decode_snapshot(reply: list) -> Snapshot | None:
    """
    The SNAPSHOT script's answer as a L{Snapshot} (C{None}: no such crew).
    """
    if not reply:
        return None
    crews, aliases, devices, tokens, multi, pairings, per_crew, grants = reply
    snapshot = Snapshot()
    for code, value in _pairs(crews):
        created_at, created_by, name = json.loads(value)
        snapshot.crews.append(CrewRecord(code, created_at, created_by, name))
    snapshot.aliases = dict(_pairs(aliases))
    for device_id, value in _pairs(devices):
        key_hash, bound, created_at, last_seen = json.loads(value)
        snapshot.devices.append(DeviceRecord(device_id, key_hash, bound, created_at, last_seen))
    for device_id, value in _pairs(tokens):
        text, expires_at = json.loads(value)
        snapshot.tokens.append(TokenRecord(device_id, json.loads(text), expires_at))
    for device_id, value in _pairs(multi):
        codes, primary = json.loads(value)
        snapshot.multi_crew.append(MultiCrewRecord(device_id, tuple(codes), primary))
    snapshot.pairings = [_pairing(user_code, value) for user_code, value in _pairs(pairings)]
    snapshot.grants = [GrantRecord(device_id, sealed) for device_id, sealed in _pairs(grants)]
    for code, members, bots, last, size, newest, sent in per_crew:
        code = _text(code)
        for device_id, value in _pairs(members):
            name, last_seen, delivered, acked, online = json.loads(value)
            snapshot.members.append(MemberRecord(code, device_id, name, last_seen, delivered, acked, online))
        snapshot.bot_users.extend(BotUserRecord(code, user_id, name) for user_id, name in _pairs(bots))
        if last:
            snapshot.last_seq[code] = int(last)
            snapshot.log_bytes[code] = int(size)
            if newest:
                snapshot.last_message_at[code] = json.loads(newest)["at"]
        snapshot.client_messages.extend(_entry(code, seq, meta) for seq, meta in _pairs(sent))
    return snapshot


# ---------------------------------------------------------- connections


def _script_call(script: str) -> tuple[str, bytes]:
    body = script.encode("utf-8")
    return sha1(body).hexdigest(), body


_SCRIPTS = {name: _script_call(getattr(redisscripts, name)) for name in
            ("WRITE", "SNAPSHOT", "FIND_SENT", "REPLAY", "TRIM", "PRUNE", "PAIRINGS_EXPIRED", "EMPTY", "LOG")}


def _is_noscript(error: Exception) -> bool:
    return isinstance(error, txredisapi.ResponseError) and str(error).startswith("NOSCRIPT")


def store_error(failure: Failure) -> Failure:
    """
    Any failure of a Redis command as a L{StoreError}: a refusal of the
    write script's checks for good, anything else (no connection, a
    timeout, Redis loading or out of memory) for now.
    """
    if failure.check(StoreError, ValueError):
        return failure
    message = failure.getErrorMessage()
    if failure.check(txredisapi.ResponseError) and message.startswith("LEELOO-REFUSED "):
        return Failure(StoreError(message[len("LEELOO-REFUSED "):], transient=False))
    if failure.check(txredisapi.ResponseError) and message.startswith("LEELOO-TAKEN "):
        return Failure(StoreError(message[len("LEELOO-TAKEN "):], transient=True))
    return Failure(StoreError(f"Redis: {message}"))


class _BlockingTransport:
    """
    Just enough of a transport for txredisapi's protocol over a blocking
    socket.
    """

    disconnecting = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def writeSequence(self, data: list) -> None:
        self.sock.sendall(b"".join(data))

    def loseConnection(self) -> None:
        self.disconnecting = True

    abortConnection = loseConnection

    def pauseProducing(self) -> None:
        pass

    resumeProducing = stopProducing = pauseProducing


class _StartFactory:
    """
    What txredisapi's protocol asks of its factory, for one connection.
    """

    isLazy = False

    def __init__(self) -> None:
        self.error: str | None = None

    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.error = why


class KeyMismatch(StoreError):
    """
    This node's secrets key is not the one the other nodes on its Redis use.
    """


class BlockingRedis:
    """
    One connection to Redis, synchronous: txredisapi's protocol fed from a
    blocking socket until each answer is in.  For reading the state at
    start (before the reactor runs) and for C{leeloo-admin}.

    The protocol schedules the rest of a reply it cannot parse yet with its
    C{callLater} (C{setLineMode}); here that is run in the loop.  Pinned by
    tests/test_redisstore.py C{BlockingRedisTests}.
    """

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        try:
            sock = socket.create_connection((settings.host, settings.port), timeout=settings.connect_timeout)
        except OSError as e:
            raise StoreError(f"cannot reach Redis at {settings.where}: {e.strerror or e}") from None
        if settings.tls:
            context = ssl.create_default_context(cafile=settings.ca_file)
            try:
                sock = context.wrap_socket(sock, server_hostname=settings.host)
            except (ssl.SSLError, OSError) as e:
                sock.close()
                raise StoreError(f"TLS to Redis at {settings.where} failed: {e}") from None
        sock.settimeout(settings.reply_timeout)
        self.sock = sock
        self._later: list[tuple[Callable, tuple]] = []
        self.protocol = txredisapi.RedisProtocol(
            charset=None, password=settings.password, dbid=settings.db or None, convertNumbers=False,
            username=settings.username)
        self.protocol.callLater = self._call_later
        self._factory = factory = _StartFactory()
        self.protocol.factory = factory
        self.protocol.makeConnection(_BlockingTransport(sock))
        try:
            self._wait(self.protocol.whenConnected())
        except StoreError:
            self.close()
            raise
        if factory.error is not None or not self.protocol.connected:
            self.close()
            # txredisapi's message names the refusal (never the password).
            raise StoreError(f"Redis at {settings.where} refused the connection: "
                             f"{factory.error or 'closed'}")

    def _call_later(self, delay: float, f: Callable, *args: Any) -> None:
        self._later.append((f, args))

    def _wait(self, d: Deferred) -> Any:
        result: list = []
        d.addBoth(result.append)
        while not result:
            while self._later and not result:
                f, args = self._later.pop(0)
                f(*args)
            if result:
                break
            if self.protocol.transport.disconnecting:
                if self._factory.error is not None:
                    # txredisapi's message names the refusal (never the password).
                    raise StoreError(f"Redis at {self.settings.where} refused the connection: "
                                     f"{self._factory.error}")
                raise StoreError(f"Redis at {self.settings.where} closed the connection")
            try:
                data = self.sock.recv(65536)
            except (OSError, ssl.SSLError) as e:
                raise StoreError(f"Redis at {self.settings.where}: {e}") from None
            if not data:
                raise StoreError(f"Redis at {self.settings.where} closed the connection")
            self.protocol.dataReceived(data)
        [value] = result
        if isinstance(value, Failure):
            store_error(value).raiseException()
        if isinstance(value, Exception):
            raise store_error(Failure(value)).value
        return value

    def command(self, *args: Any) -> Any:
        return self._wait(self.protocol.execute_command(*args))

    def script(self, name: str, *args: Any) -> Any:
        digest, body = _SCRIPTS[name]
        try:
            return self._wait(self.protocol.execute_command("EVALSHA", digest, 0, self.settings.prefix, *args))
        except StoreError as e:
            if not str(e).startswith("Redis: NOSCRIPT"):
                raise
        return self._wait(self.protocol.execute_command("EVAL", body, 0, self.settings.prefix, *args))

    def snapshot(self) -> Snapshot:
        return decode_snapshot(self.script("SNAPSHOT", ""))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Factory(protocol.Factory):
    """
    Builds txredisapi protocols for L{RedisConnection}'s ClientService.
    """

    isLazy = False
    noisy = False

    def __init__(self, connection: RedisConnection, protocol_class: Any = None) -> None:
        self.connection = connection
        self.protocol_class = txredisapi.RedisProtocol if protocol_class is None else protocol_class

    def buildProtocol(self, addr: Any) -> Any:
        s = self.connection.settings
        p = self.protocol_class(
            charset=None, replyTimeout=s.reply_timeout, password=s.password, dbid=s.db or None,
            convertNumbers=False, username=s.username)
        p.factory = self
        p.whenConnected().addCallback(self.connection._ready)
        return p

    def stopTrying(self) -> None:
        # txredisapi calls it when AUTH or SELECT is refused; the service
        # keeps trying (with backoff), and says why each time.
        pass

    def connectionError(self, why: str) -> None:
        self.connection.log.error("Redis at {where} refused the relay: {error}",
                                  where=self.connection.settings.where, error=why)


class RedisConnection:
    """
    The relay's connection to Redis, made (and made again, with backoff)
    by a L{ClientService}.  L{call} and L{script} fail at once with a
    transient L{StoreError} while there is none.  C{on_ready} is called
    with each new connection before it is used (its Deferred waited for).
    """

    log = _log
    # What it logs (the cluster's connections say it otherwise).
    CANNOT_CONNECT = "cannot connect to Redis at {where}: {error}; retrying"
    CONNECTED = "connected to Redis at {where}"
    CONNECTED_AGAIN = "connected to Redis at {where} again"
    NOT_READY = "the new connection to Redis at {where} failed: {error}"
    LOST = "lost the connection to Redis at {where}; reconnecting"

    def __init__(self, settings: RedisSettings, reactor: Any,
                 on_ready: Callable[[RedisConnection], Deferred | None] | None = None,
                 protocol_class: Any = None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.on_ready = on_ready
        self.protocol: Any = None
        self._was_connected = False
        # Until the first connection is made (or its first attempt fails),
        # commands wait for it rather than fail.
        self._first: list[Deferred] | None = []
        endpoint: Any = HostnameEndpoint(reactor, settings.host, settings.port, timeout=settings.connect_timeout)
        if settings.tls:
            endpoint = wrapClientTLS(tls_options(settings), endpoint)
        self.service = ClientService(
            endpoint, _Factory(self, protocol_class),
            retryPolicy=backoffPolicy(initialDelay=0.1, maxDelay=settings.max_retry_delay, factor=2.0),
            clock=reactor)

    @property
    def starting(self) -> bool:
        """
        Whether commands wait for the first connection (made, or its first
        attempt failed, they fail at once while there is none).
        """
        return self._first is not None

    def also_on_ready(self, hook: Callable[[Any], Deferred | None]) -> None:
        """
        Call C{hook} too with each new connection before it is used, after
        C{on_ready} (and waited for the same way).
        """
        first = self.on_ready

        def both(p: Any) -> Deferred:
            d = maybeDeferred(first, p) if first is not None else succeed(None)
            return d.addCallback(lambda _: hook(p))

        self.on_ready = both

    def start(self) -> None:
        self.service.startService()
        self.service.whenConnected(failAfterFailures=1).addErrback(self._first_failed)

    def _first_failed(self, failure: Failure) -> None:
        if self._first is not None and not failure.check(StoreError):
            _log.error(self.CANNOT_CONNECT, where=self.settings.where, error=failure.getErrorMessage())
        self._release_first()

    def _release_first(self) -> None:
        """
        The first connection is made, or its first attempt failed: what
        waited for it goes on (and fails at once if there is none).
        """
        waiting, self._first = self._first, None
        for d in waiting or ():
            d.callback(None)

    def stop(self) -> Deferred:
        self.protocol = None
        self._first_failed(Failure(StoreError("the store is closed")))
        return self.service.stopService()

    def _ready(self, p: Any) -> None:
        p.whenDisconnected().addCallback(self._lost)
        # A first answer before the connection is used: over TLS the
        # handshake (and the certificate's check) is done by then.
        d = self.call("PING", protocol=p)
        if self.on_ready is not None:
            d.addCallback(lambda _: self.on_ready(p))
        d.addCallbacks(self._use, self._not_ready, callbackArgs=(p,), errbackArgs=(p,))

    def _use(self, _: Any, p: Any) -> None:
        if not p.connected:
            return
        self.protocol = p
        _log.info(self.CONNECTED_AGAIN if self._was_connected else self.CONNECTED, where=self.settings.where)
        self._was_connected = True
        self._release_first()

    def _not_ready(self, failure: Failure, p: Any) -> None:
        _log.error(self.NOT_READY, where=self.settings.where, error=failure.getErrorMessage())
        p.transport.loseConnection()
        self._release_first()

    def _lost(self, p: Any) -> None:
        if self.protocol is p:
            self.protocol = None
            _log.warn(self.LOST, where=self.settings.where)

    def call(self, *args: Any, protocol: Any = None) -> Deferred:
        p = self.protocol if protocol is None else protocol
        if p is None:
            if self._first is not None:
                waiting: Deferred = Deferred()
                self._first.append(waiting)
                return waiting.addCallback(lambda _: self.call(*args, protocol=protocol))
            return fail(StoreError(f"no connection to Redis at {self.settings.where}"))
        try:
            d = p.execute_command(*args)
        except Exception:
            return fail().addErrback(store_error)
        return d.addErrback(store_error)

    def script(self, name: str, *args: Any, protocol: Any = None) -> Deferred:
        digest, body = _SCRIPTS[name]
        p = self.protocol if protocol is None else protocol
        return run_script(self.call, digest, body, [], [self.settings.prefix, *args], protocol=p)


def run_script(call: Callable[..., Deferred], digest: str, body: bytes, keys: list, args: list,
               **options: Any) -> Deferred:
    """
    Run a Lua script through C{call} (a L{RedisConnection}'s) by its
    digest, sending its body once when Redis does not hold it (after a
    restart, say).
    """
    def missing(failure: Failure) -> Any:
        if failure.check(StoreError) and failure.getErrorMessage().startswith("Redis: NOSCRIPT"):
            return call("EVAL", body, len(keys), *keys, *args, **options)
        return failure

    return call("EVALSHA", digest, len(keys), *keys, *args, **options).addErrback(missing)


def tls_options(settings: RedisSettings) -> Any:
    """
    The client TLS options of C{rediss://}: the server's certificate must
    chain to C{ca_file} (or the system's roots) and name the host.
    """
    if settings.ca_file is not None:
        with open(settings.ca_file, "rb") as f:
            pem = f.read()
        # Every certificate of the file (a bundle), not only the first.
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
        trust: Any = trustRootFromCertificates([Certificate.loadPEM(block) for block in blocks])
    else:
        trust = platformTrust()
    return optionsForClientTLS(settings.host, trustRoot=trust)


# ---------------------------------------------------------------- store


@implementer(IPairings)
class RedisPairings:
    """
    The pairing flows of a L{RedisStore}, in its C{pairings} hash.
    """

    def __init__(self, connection: RedisConnection) -> None:
        self._connection = connection

    def put(self, record: PairingRecord) -> Deferred:
        return self._connection.call("HSET", self._connection.settings.prefix + "pairings", record.user_code,
                                     _pairing_value(record)).addCallback(lambda _: None)

    def delete(self, user_code: str) -> Deferred:
        return self._connection.call("HDEL", self._connection.settings.prefix + "pairings",
                                     user_code).addCallback(lambda _: None)

    def delete_expired(self, now: float) -> Deferred:
        return self._connection.script("PAIRINGS_EXPIRED", _time(now)).addCallback(int)



class RedisSequences(Sequences):
    """
    The relay's proposals for each crew's next number; Redis mints the
    number itself as it stores the entry (the write script), and the
    entry is renumbered if Redis gave another.
    """

    engine_mints = True


@implementer(IStore)
class RedisStore:
    """
    State in Redis.  Opening it reads the whole state (synchronously, at
    start) and starts the connection the relay uses from then on.

    This relay mints each crew's sequence numbers as the SQLite store does,
    from the last one Redis holds; the write script keeps Redis's count
    and refuses (atomically, with the whole batch) a number the log already
    holds, so that a number is never stored twice.  After any failed batch
    and on every reconnection the counts are read back from Redis, so the
    relay never mints behind them.

    @raise StoreError: Redis cannot be reached or refused the relay.
    """

    def __init__(self, settings: RedisSettings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        start = BlockingRedis(settings)
        try:
            self._snapshot: Snapshot | None = start.snapshot()
        finally:
            start.close()
        self.sequences = RedisSequences(self._snapshot.last_seq)
        self.connection = RedisConnection(settings, reactor, on_ready=self._resync)
        self.pairings = RedisPairings(self.connection)
        self._started = False
        self._closed = False
        self.connection.start()

    def check_key(self, fingerprint: str) -> None:
        """
        Make sure every node on this Redis seals with one secrets key: the
        first to start records its key's fingerprint (not the key), and a
        node whose key has another is refused, before it seals anything
        the others could not open.  Blocking, at start.

        @raise KeyMismatch: Redis records another key's fingerprint.
        @raise StoreError: Redis cannot be reached.
        """
        name = self.settings.prefix + "secrets-key"
        start = BlockingRedis(self.settings)
        try:
            start.command("SET", name, fingerprint, "NX")
            recorded = start.command("GET", name)
        finally:
            start.close()
        if recorded is not None and _text(recorded) != fingerprint:
            raise KeyMismatch("the other nodes on this Redis use another secrets key")

    def _resync(self, p: Any) -> Deferred | None:
        """
        A new connection (the first since start needs nothing): learn the
        counts Redis holds before the connection is used.
        """
        if not self._started:
            self._started = True
            return None
        return self.connection.call("HGETALL", self.settings.prefix + "seq", protocol=p).addCallback(self._counts)

    def _counts(self, flat: list) -> None:
        for code, seq in _pairs(flat):
            self.sequences.seen(code, int(seq))

    def load(self) -> Snapshot:
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            raise RuntimeError("load() is read once, at start")
        return snapshot

    def write(self, ops: list) -> Deferred:
        if not ops:
            return succeed(None)
        try:
            args = _encode(ops)
        except ValueError:
            return fail()
        d = self.connection.script("WRITE", *args)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(ops,), errbackArgs=(ops,))
        return d

    def _written(self, minted: list, ops: list) -> None:
        """
        The numbers Redis minted, in the order of the batch's entries that
        let it: renumber those it numbered otherwise than proposed (another
        relay took the number), and mint later ones after them.
        """
        if not minted:
            return
        entries = iter(arg for kind, arg in ops if kind == APPEND and arg.renumber is not None)
        for seq in minted:
            entry = next(entries)
            while _split_stamp(entry) is None:
                entry = next(entries)
            if isinstance(seq, list):
                # A resend already in the log (sent through another node at
                # the same time): stored once, answered as the first.
                first = _entry(entry.crew_code, seq[0], seq[1])
                entry.renumber(first.seq, first.id)
                continue
            seq = int(seq)
            self.sequences.seen(entry.crew_code, seq)
            if seq != entry.seq:
                entry.renumber(seq)

    def _write_failed(self, failure: Failure, ops: list) -> Failure:
        if any(kind == APPEND for kind, _ in ops):
            # The relay gives the batch's numbers back as this failure
            # reaches it (before any answer from Redis can): then read what
            # Redis holds (the batch may have
            # been applied though its answer was lost, or another writer
            # took a number), so that no number is minted twice.
            self._refresh_counts()
        return failure

    def _refresh_counts(self) -> None:
        if self.connection.protocol is None:
            return  # read on reconnection
        self.connection.call("HGETALL", self.settings.prefix + "seq").addCallbacks(
            self._counts, lambda f: _log.warn("could not read the sequence counts back from Redis: {error}",
                                              error=f.getErrorMessage()))

    def find_crew(self, code: str) -> Deferred:
        return self.connection.script("SNAPSHOT", code).addCallback(decode_snapshot)

    def find_device(self, device_id: str) -> Deferred:
        def decoded(value: bytes | None) -> DeviceRecord | None:
            if value is None:
                return None
            key_hash, bound, created_at, last_seen = json.loads(value)
            return DeviceRecord(device_id, key_hash, bound, created_at, last_seen)

        return self.connection.call("HGET", self.settings.prefix + "devices", device_id).addCallback(decoded)

    def find_token(self, device_id: str) -> Deferred:
        def decoded(value: bytes | None) -> TokenRecord | None:
            if value is None:
                return None
            text, expires_at = json.loads(value)
            return TokenRecord(device_id, json.loads(text), expires_at)

        return self.connection.call("HGET", self.settings.prefix + "tokens", device_id).addCallback(decoded)

    def find_grant(self, device_id: str) -> Deferred:
        def decoded(value: bytes | None) -> GrantRecord | None:
            return None if value is None else GrantRecord(device_id, _text(value))

        return self.connection.call("HGET", self.settings.prefix + "grants", device_id).addCallback(decoded)

    def find_sent(self, crew_code: str, sender: str, client_msg_id: str) -> Deferred:
        def decoded(reply: list) -> LogEntry | None:
            if not reply:
                return None
            seq, meta = reply
            return _entry(crew_code, seq, meta)

        return self.connection.script("FIND_SENT", crew_code, sender, client_msg_id).addCallback(decoded)

    def replay(self, crew_code: str, after_seq: int, up_to_seq: int, since: float, exclude_sender: str,
               limit: int, ephemeral_since: float | None = None) -> Deferred:
        def decoded(flat: list) -> Replay:
            rows = [(int(flat[i]), bytes(flat[i + 1])) for i in range(0, len(flat), 2)]
            rows.reverse()
            return _replay_window(rows, after_seq, limit)

        return self.connection.script(
            "REPLAY", crew_code, _seq(after_seq), _seq(up_to_seq), _time(since), exclude_sender, _seq(limit),
            _time(since if ephemeral_since is None else ephemeral_since),
        ).addCallback(decoded)

    def prune(self, log_before: float) -> Deferred:
        return self.connection.script("PRUNE", _time(log_before)).addCallback(int)

    def trim(self, crew_code: str, max_bytes: int, keep: int) -> Deferred:
        return self.connection.script("TRIM", crew_code, _seq(max_bytes), _seq(keep)).addCallback(
            lambda reply: (int(reply[0]), int(reply[1])))

    def close(self) -> Deferred:
        if self._closed:
            return succeed(None)
        self._closed = True
        return self.connection.stop()


# ------------------------------------------------------------- migration


def snapshot_ops(snapshot: Snapshot, log: Callable[[str], Iterable[LogEntry]]) -> Iterable[list]:
    """
    The batches of write operations that put C{snapshot} (with each crew's
    log from C{log(code)}) into an empty store: crews with their members,
    bot users, aliases and log, then devices, tokens and multi-crew devices.
    """
    members: dict[str, list] = {}
    for m in snapshot.members:
        members.setdefault(m.crew_code, []).append(m)
    bots: dict[str, list] = {}
    for b in snapshot.bot_users:
        bots.setdefault(b.crew_code, []).append(b)
    aliases: dict[str, list] = {}
    for old, code in snapshot.aliases.items():
        aliases.setdefault(code, []).append(old)
    for crew in snapshot.crews:
        ops: list = [(PUT_CREW, crew)]
        ops += [(PUT_MEMBER, m) for m in members.get(crew.code, ())]
        ops += [(PUT_BOT_USER, b) for b in bots.get(crew.code, ())]
        ops += [(PUT_ALIAS, (old, crew.code)) for old in aliases.get(crew.code, ())]
        for entry in log(crew.code):
            ops.append((APPEND, entry))
            if len(ops) >= 500:
                yield ops
                ops = []
        if ops:
            yield ops
    rest: list = [(PUT_DEVICE, d) for d in snapshot.devices]
    rest += [(PUT_TOKEN, t) for t in snapshot.tokens]
    rest += [(PUT_MULTI_CREW, r) for r in snapshot.multi_crew]
    rest += [(PUT_GRANT, g) for g in snapshot.grants]
    for start in range(0, len(rest), 500):
        yield rest[start:start + 500]


def read_log(redis: BlockingRedis, code: str) -> list[LogEntry]:
    """
    Crew C{code}'s log in Redis, oldest first, payloads included.
    """
    metas, payloads = redis.script("LOG", code)
    data = {int(seq): bytes(payload) for seq, payload in zip(payloads[::2], payloads[1::2])}
    entries = []
    for seq, meta in sorted(((int(s), m) for s, m in zip(metas[::2], metas[1::2]))):
        e = _entry(code, seq, meta)
        e.payload = data.get(seq, b"")
        entries.append(e)
    return entries


class MigrationError(Exception):
    """
    The migration was refused; the message says why (nothing was written).
    """


@dataclass(frozen=True)
class Migrated:
    crews: int
    messages: int
    devices: int
    tokens: int
    pairings: int
    grants: int


def migrate_to_redis(snapshot: Snapshot, log: Callable[[str], Iterable[LogEntry]],
                     settings: RedisSettings) -> Migrated:
    """
    Put a single node's state (C{snapshot}, each crew's log from
    C{log(code)}) into an empty Redis, in batches of the write script, then
    check that Redis holds what was read.

    @raise MigrationError: Redis already holds a relay's state there.
    @raise StoreError: Redis cannot be reached, or refused a batch.
    """
    redis = BlockingRedis(settings)
    try:
        if not int(redis.script("EMPTY")):
            raise MigrationError(f"Redis at {settings.where} already holds a relay's state (keys "
                                 f"{settings.prefix}*): migrate into an empty database only")
        messages = 0
        for ops in snapshot_ops(snapshot, log):
            messages += sum(kind == APPEND for kind, _ in ops)
            redis.script("WRITE", *_encode(ops))
        for record in snapshot.pairings:
            redis.command("HSET", settings.prefix + "pairings", record.user_code, _pairing_value(record))
        copied = redis.snapshot()
    finally:
        redis.close()
    if (len(copied.crews), len(copied.devices), len(copied.tokens), len(copied.pairings), len(copied.grants)) != (
            len(snapshot.crews), len(snapshot.devices), len(snapshot.tokens), len(snapshot.pairings),
            len(snapshot.grants)):
        raise MigrationError("Redis does not hold what was copied; check it and migrate again into an empty one")
    return Migrated(len(snapshot.crews), messages, len(snapshot.devices), len(snapshot.tokens),
                    len(snapshot.pairings), len(snapshot.grants))
