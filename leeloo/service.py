"""
The relay's service tree: a frozen L{leeloo.tap.Config} and a reactor
become named services, each found with C{getServiceNamed}:

  - C{store}: the store, open once the tree is built, closed once the
    relay has flushed it;
  - C{relay}: the relay core and its WebSocket factory (logs the effective
    limits at start; on stop closes every connection with 1001 and flushes
    the store);
  - C{timers}: the relay's periodic work (C{expire}, C{retention});
  - C{tls}: the certificates of C{letsencrypt:} and C{acme:} endpoints
    reloaded on SIGHUP (where there are any);
  - C{web}: the public site and its C{--listen} and C{--redirect-listen}
    endpoints;
  - C{admin}: the admin site and its C{--admin-listen} endpoints (where
    there are any), with the admin API (L{leeloo.admin.api});
  - C{admin-files}: what the relay leaves in its data directory for
    C{leeloo-admin} (L{leeloo.admin.datadir});
  - C{acme}: the relay's own ACME client (where there are C{acme:}
    endpoints);
  - C{readiness}: says C{READY=1} once everything listens, C{STOPPING=1}
    at stop;
  - C{watchdog}: C{WATCHDOG=1} while systemd asks for it;
  - C{http-pool}: the connections to Spotify kept for reuse, closed last
    (where Spotify is configured).

The parts expose their figures through C{stats()}, which the metrics read.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver, Logger

from leeloo import __version__
from leeloo.access import OriginPolicy, TrustedProxies
from leeloo.admin.api import AdminAPI
from leeloo.admin.datadir import DataDirFiles, admin_token
from leeloo.core.pairing import PairingSettings
from leeloo.listening import Listener, Readiness, as_written
from leeloo.metrics import Metrics
from leeloo.process import (
    Watchdog, exit_process, files_needed, open_file_limit_lines, raise_open_file_limit, sd_notify, watchdog_interval,
)
from leeloo.relay import DAY, Relay
from leeloo.spotify import SpotifyOAuth
from leeloo.limits import Limiter
from leeloo.sealing import KEY_FILE_NAME, KeyFileError, SealError, Sealer, create_key, read_key
from leeloo.sqlitestore import DATABASE_NAME, SchemaError, SQLiteStore, schema_version
from leeloo.store import IStore, MemoryStore, StoreError
from leeloo.tls import LetsEncryptServerEndpoint, ReloadOnHangup, health_fields
from leeloo.tls_acme import AcmeService
from leeloo.web import make_admin_site, make_redirect_site, make_site
from leeloo.websocket import RelayServerFactory

if TYPE_CHECKING:
    from leeloo.tap import Config


_log = Logger()


class StartupError(Exception):
    """
    The relay cannot start; the message says why and what to do.
    """


def key_file(config: Config) -> Path:
    return config.secrets_key_file if config.secrets_key_file is not None else config.data_dir / KEY_FILE_NAME


def _holds_sealed_rows(path: Path) -> bool:
    """
    Whether the database at C{path} (if there is one) holds Spotify tokens
    sealed with a secrets key (schema 9 and later seal every one).
    """
    if not path.exists():
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return False
    try:
        if schema_version(db) < 9:
            return False
        return any(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
                   for table in ("pending_tokens", "spotify_grants"))
    except sqlite3.Error:
        return False
    finally:
        db.close()


def open_sealer(config: Config, create: bool = True) -> Sealer:
    """
    The sealer of the secrets key file, created (0600) on first start.

    @raise StartupError: the file cannot be read or created, or it is
        missing while the database holds tokens sealed with it.
    """
    path = key_file(config)
    try:
        return Sealer(read_key(path))
    except KeyFileError as e:
        raise StartupError(f"{e}; restore it from your backup (README.rst, 'The secrets key')") from None
    except FileNotFoundError:
        pass
    database = config.data_dir / DATABASE_NAME
    if _holds_sealed_rows(database):
        raise StartupError(
            f"the database {database} holds encrypted Spotify tokens but the secrets key file {path} is missing; "
            "restore it from your backup, or pass --secrets-key-file (README.rst, 'The secrets key')")
    if not create:
        return Sealer()
    try:
        key = create_key(path)
    except KeyFileError as e:
        raise StartupError(str(e)) from None
    _log.info("created the secrets key file {path}: back it up (README.rst, 'The secrets key')", path=str(path))
    return Sealer(key)


def _check_shared_key(config: Config, store: Any, sealer: Sealer) -> None:
    """
    Every node on one Redis must seal with one secrets key: refuse to start
    with another (a node started without the key file makes a new one).
    """
    from leeloo.redisstore import KeyMismatch

    try:
        store.check_key(sealer.fingerprint)
    except KeyMismatch:
        store.close()
        raise StartupError(
            f"the secrets key file {key_file(config)} is not the key the other nodes on this Redis use: copy the "
            "secrets key file of a node already running to this one, or pass --secrets-key-file "
            "(README.rst, 'Deploying several nodes')") from None
    except StoreError as e:
        store.close()
        raise StartupError(f"cannot open the Redis store: {e}") from None


def open_store(config: Config, reactor: Any, sealer: Sealer | None = None) -> IStore:
    if config.store == "memory":
        return MemoryStore()
    if config.redis is not None:
        # Imported here: the SQLite path never loads the Redis client.
        from leeloo.redisstore import RedisStore

        try:
            return RedisStore(config.redis, reactor)
        except StoreError as e:
            raise StartupError(
                f"cannot open the Redis store: {e}; check that Redis runs there, and "
                "LEELOO_REDIS_PASSWORD if it asks for a password"
            ) from None
    try:
        return SQLiteStore(config.data_dir, reactor, fsync=config.fsync, sealer=sealer)
    except (sqlite3.Error, SchemaError, OSError) as e:
        raise StartupError(
            f"cannot open the database in {config.data_dir}: {e}; "
            "check the directory's permissions and free space, or restore it from a backup"
        ) from None


class StoreService(Service):
    """
    Owns the store: it is open from the start, and closed at stop once
    every Deferred handed to L{close_after} (the relay's flush) has fired.
    """

    name = "store"

    def __init__(self, store: IStore) -> None:
        self.store = store
        self._before_close: list[Deferred] = []

    def close_after(self, d: Deferred) -> None:
        """
        Keep the store open at stop until C{d} fires (whatever it fires with).
        """
        self._before_close.append(d)

    def stopService(self) -> Deferred:
        super().stopService()
        waiting, self._before_close = self._before_close, []
        return DeferredList(waiting, consumeErrors=True).addCallback(lambda _: self.store.close())


class FanoutService(Service):
    """
    Owns a fan-out shared with other nodes (C{--redis}): it joins the
    cluster at start, and leaves it at stop, after the relay has closed
    its connections (their leaving is told to the other nodes first).
    """

    name = "fanout"

    def __init__(self, fanout: Any) -> None:
        self.fanout = fanout

    def startService(self) -> None:
        super().startService()
        self.fanout.start()

    def stopService(self) -> Deferred:
        super().stopService()
        return self.fanout.stop()


class RelayService(Service):
    """
    Owns the relay: logs its limits at start and closes every connection,
    telling devices to come back, at stop (the store stays open until the
    relay has flushed it).

    @param file_limit: raises the open-file limit towards the number given
        and returns the soft and hard limits then in force.
    """

    name = "relay"
    log = Logger()

    def __init__(self, relay: Relay, ws_factory: RelayServerFactory, config: Config,
                 store: StoreService | None = None,
                 file_limit: Callable[[int], tuple[int, int]] = raise_open_file_limit) -> None:
        self.relay = relay
        self.ws_factory = ws_factory
        self.config = config
        self.store = store
        self.file_limit = file_limit

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "LEELOO relay starting, version {version}, on {listen}, data in {data_dir}",
            version=__version__,
            listen=", ".join([as_written(e) for e in self.config.listen]
                             + [f"{as_written(e)} (redirect to https)" for e in self.config.redirect_listen]),
            data_dir=str(self.config.data_dir),
        )
        for warning in self.config.warnings:
            self.log.warn("{problem}", problem=warning)
        self._log_file_limit()
        self.ws_factory.log_limits()
        self.log.info("HTTP limits: {limits}", limits=self.config.http_limits.describe())
        self.log.info(
            "metrics: /metrics {where}",
            where=("on " + ", ".join(self.config.admin_listen) + ", and to loopback clients on the public site")
            if self.config.admin_listen else "to loopback clients only (no --admin-listen)",
        )
        self.log.info("relay limits: {limits}", limits=self.relay.limits.describe())
        self.log.info(
            "legacy devices are replayed messages from the last {age:g}s, nudges and reactions from "
            "the last {ephemeral:g}s; connections that bind no device are closed after {bind}",
            age=self.relay.legacy_replay_age, ephemeral=self.relay.ephemeral_age,
            bind=f"{self.relay.bind_timeout:g}s" if self.relay.bind_timeout else "never (off)",
        )
        self.log.info(
            "store limits: crew logs of at most {log} bytes, senders paused past {queue} bytes "
            "waiting for the store; presence grace {grace:g}s",
            log=self.relay.crew_log_bytes, queue=self.relay.store_queue_bytes, grace=self.relay.presence_grace)
        self.log.info(
            "Spotify {spotify}; bot API {bot}",
            spotify=f"configured: {self.relay.pairing.settings.describe()}" if self.config.spotify
            else "not configured",
            bot="enabled" if self.config.telegram_api_secret else "disabled (no TELEGRAM_API_SECRET)",
        )

    def _log_file_limit(self) -> None:
        maximum = self.config.limits.max_connections
        soft, hard = self.file_limit(files_needed(maximum))
        info, warning = open_file_limit_lines(maximum, soft, hard)
        self.log.info("{limit}", limit=info, open_file_limit=soft, open_file_limit_hard=hard,
                      files_needed=files_needed(maximum))
        if warning is not None:
            self.log.warn("{problem}", problem=warning)

    def stopService(self) -> Deferred:
        super().stopService()
        self.log.info("closing {count} connections and flushing the store",
                      count=len(self.relay.sessions))
        # Autobahn drops a connection whose device does not answer the
        # close within its close handshake timeout: wait a little longer.
        d = self.relay.shutdown(grace=self.config.limits.close_handshake_timeout + 1)
        if self.store is None:
            return d.addBoth(lambda _: self.relay.store.close())
        flushed: Deferred = Deferred()
        self.store.close_after(flushed)
        return d.addBoth(lambda _: flushed.callback(None))


class HTTPPoolService(Service):
    """
    Closes the connections an HTTP client's pool keeps for reuse when the
    relay stops.
    """

    name = "http-pool"

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def stopService(self) -> Deferred:
        super().stopService()
        return self.pool.closeCachedConnections()


def _never_raises(call: Callable[[], Any], log: Logger, what: str) -> Callable[[], None]:
    """
    Wrap a timer's callable: a TimerService whose callable raises (or whose
    Deferred fails) stops for good, so log the failure and keep going.
    """

    def failed(failure: Any) -> None:
        log.failure("timer {what} failed; it will run again", failure, what=what)

    def safely() -> Any:
        try:
            result = call()
        except Exception:
            log.failure("timer {what} failed; it will run again", what=what)
            return None
        if isinstance(result, Deferred):
            return result.addErrback(failed)
        return None

    return safely


def _prune(relay: Relay, log: Logger) -> Deferred:
    def pruned(counts: tuple[int, int]) -> None:
        log.info("retention: pruned {messages} old messages and {crews} idle crews",
                 messages=counts[0], crews=counts[1])

    return relay.prune().addCallback(pruned)


def timers(relay: Relay, reactor: Any) -> MultiService:
    """
    The C{timers} service: C{expire} (Spotify tokens past their lifetime,
    every minute) and C{retention} (old messages and idle crews, hourly).
    """
    group = MultiService()
    group.setName("timers")
    for interval, call, name, what in (
        (60, relay.expire, "expire", "expire tokens"),
        (3600, lambda: _prune(relay, RelayService.log), "retention", "retention"),
    ):
        timer = TimerService(interval, _never_raises(call, RelayService.log, what))
        timer.clock = reactor
        timer.setName(name)
        timer.setServiceParent(group)
    return group


class SiteService(MultiService):
    """
    A site and the listeners that serve it (C{web}: the public site and the
    redirect site; C{admin}: the admin site).
    """

    def __init__(self, name: str, site: Any, listeners: Iterable[Listener] = (), redirect_site: Any = None) -> None:
        super().__init__()
        self.setName(name)
        self.site = site
        self.redirect_site = redirect_site
        for listener in listeners:
            listener.setServiceParent(self)

    @property
    def listeners(self) -> list[Listener]:
        return [s for s in self if isinstance(s, Listener)]


class RelayTree(MultiService):
    """
    The whole service tree.  Besides C{getServiceNamed}, the parts tests
    and tools reach most: C{relay}, C{site}, C{admin_site}, C{metrics},
    C{acme}.
    """

    metrics: Metrics
    # The log observer twistd's application is given (L{setServiceParent}).
    log_observer: Any = None

    def setServiceParent(self, parent: Any) -> None:
        """
        Under twistd, C{parent} is its application: give it
        C{log_observer}, which twistd's logger takes in place of its own
        (C{AppLogger.start}), unless the application has one.
        """
        if self.log_observer is not None and hasattr(parent, "setComponent") \
                and parent.getComponent(ILogObserver, None) is None:
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    def _named(self, name: str) -> Any:
        return self.namedServices.get(name)

    @property
    def relay(self) -> Relay:
        return self.getServiceNamed("relay").relay

    @property
    def site(self) -> Any:
        return self.getServiceNamed("web").site

    @property
    def admin_site(self) -> Any:
        admin = self._named("admin")
        return None if admin is None else admin.site

    @property
    def acme(self) -> AcmeService | None:
        return self._named("acme")

    @property
    def listeners(self) -> list[Listener]:
        """
        Every listener: C{--listen}, C{--redirect-listen}, C{--admin-listen}.
        """
        return [l for name in ("web", "admin") if self._named(name) is not None
                for l in self.getServiceNamed(name).listeners]



def _relay(config: Config, reactor: Any, clock: Any, store: StoreService, spotify: Any, sealer: Sealer,
           fanout: Any = None, budget: Any = Limiter) -> Relay:
    return Relay(
        reactor if clock is None else clock,
        store.store,
        fanout=fanout,
        budget=budget,
        spotify=spotify,
        pairing=PairingSettings(public_url=config.public_url, legacy_state=config.legacy_spotify_state,
                                pkce=config.spotify_pkce),
        replay_limit=config.replay_limit,
        retention=config.retention_days * DAY,
        crew_ttl=config.crew_ttl_days * DAY,
        limits=config.relay_limits,
        legacy_replay_age=config.legacy_replay_age,
        ephemeral_age=config.ephemeral_age,
        bind_timeout=config.bind_timeout,
        presence_grace=config.presence_grace,
        crew_log_bytes=config.crew_log_bytes,
        store_queue_bytes=config.store_queue_bytes,
        sealer=sealer,
    )


def build_service(config: Config, reactor: Any, http: Any = None,
                  exit: Callable[[int], None] | None = None,
                  notify: Callable[[str], Any] | None = None, clock: Any = None,
                  environ: Mapping[str, str] | None = None) -> RelayTree:
    """
    The relay's service tree for C{config} on C{reactor}; C{clock} is the
    relay core's (default: C{reactor}; connections always time out on the
    reactor's).  C{http} is the treq-like client Spotify is called with
    (default: treq on C{reactor}); C{exit} ends the process when an
    endpoint cannot listen (default: L{exit_process}); C{notify} tells the
    service manager how the relay is doing (default: L{sd_notify});
    C{environ} is where systemd's C{NOTIFY_SOCKET} and C{WATCHDOG_USEC}
    are read (default: the process's).
    """
    import txaio

    txaio.use_twisted()
    txaio.config.loop = reactor
    environ = os.environ if environ is None else environ
    if notify is None:
        def notify(state: str) -> bool:
            return sd_notify(state, environ)

    spotify = None
    pool = None
    if config.spotify is not None:
        if http is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, HTTPConnectionPool

            pool = HTTPConnectionPool(reactor)
            http = HTTPClient(Agent(reactor, pool=pool))
        spotify = SpotifyOAuth(config.spotify, http, reactor)
    sealer = open_sealer(config) if config.store != "memory" else Sealer()
    store = StoreService(open_store(config, reactor, sealer))
    fanout = shared = None
    budget: Any = Limiter
    if config.redis is not None:
        # Imported here: the SQLite path never loads the Redis client.
        from leeloo.fanout.redis import RedisFanout
        from leeloo.sharedlimits import SharedBudget, SharedLimits

        fanout = RedisFanout(config.redis, reactor, config.node_heartbeat)
        # Every node on this Redis counts each client address's
        # connections together (one cap for the cluster, not one a node),
        # and spends its budgets together (crew entries, bot joins, /pair/
        # lookups).  Heartbeats as the nodes' presence does (--node-heartbeat).
        shared = SharedLimits(store.store.connection, reactor, heartbeat=config.node_heartbeat)
        budget = functools.partial(SharedBudget, shared)
    try:
        relay = _relay(config, reactor, clock, store, spotify, sealer, fanout, budget)
    except SealError:
        store.store.close()
        raise StartupError(
            f"the secrets key file {key_file(config)} does not open the Spotify tokens in the database: it is not "
            "the key they were encrypted with; restore the right one (README.rst, 'The secrets key')") from None
    if config.redis is not None:
        _check_shared_key(config, store.store, sealer)

    proxies = TrustedProxies(config.trusted_proxies)
    ws_factory = RelayServerFactory(relay, config.limits, proxies, OriginPolicy(config.public_url), reactor)
    # One count of connections per address for the public and redirect sites.
    gate = config.http_limits.gate(reactor, proxies)
    metrics = Metrics(relay, ws_factory)
    acme = None
    if config.acme is not None:
        try:
            acme = AcmeService(reactor, config.acme, config.data_dir / "certificates")
        except OSError as e:
            raise StartupError(
                f"cannot use {config.data_dir / 'certificates'} for the acme: certificates "
                f"({e.strerror or e}); check that the relay's user owns it") from None
        acme.setName("acme")
    acme_specs = {spec.description: spec for spec in (config.acme.endpoints if config.acme else ())}
    endpoints = [acme.endpoint(acme_specs[description]) if description in acme_specs
                 else serverFromString(reactor, description) for description in config.listen]
    certificates = list(dict.fromkeys(e.certificates for e in endpoints if isinstance(e, LetsEncryptServerEndpoint)))
    metrics.add_certificates(certificates)
    challenges = acme.challenges.lookup if acme is not None else None
    site = make_site(
        relay, ws_factory, spotify, config.telegram_api_secret, reactor=reactor,
        limits=config.http_limits, metrics=metrics,
        health_fields=[health_fields(certificates)] if certificates else (),
        challenges=challenges,
        gate=gate,
    )
    listeners = [Listener(endpoint, site, "--listen", as_written(description))
                 for endpoint, description in zip(endpoints, config.listen)]
    redirect_site = None
    if config.redirect_listen:
        redirect_site = make_redirect_site(config.acme_webroot, reactor=reactor, limits=config.http_limits,
                                           challenges=challenges, gate=gate)
        for description in config.redirect_listen:
            listeners.append(Listener(serverFromString(reactor, description), redirect_site,
                                      "--redirect-listen", as_written(description)))

    top = RelayTree()
    top.metrics = metrics
    if shared is not None:
        from leeloo.sharedlimits import SharedLimitsService

        gate.shared = ws_factory.shared = shared
        limits_service = SharedLimitsService(shared)
    if pool is not None:
        # Stopped last: the connections to Spotify kept open for reuse close.
        HTTPPoolService(pool).setServiceParent(top)
    store.setServiceParent(top)
    if config.redis is not None:
        limits_service.setServiceParent(top)
    if fanout is not None:
        # Stopped after the relay, before the store.
        FanoutService(fanout).setServiceParent(top)
    RelayService(relay, ws_factory, config, store).setServiceParent(top)
    timers(relay, reactor).setServiceParent(top)
    if certificates:
        tls = ReloadOnHangup(reactor, certificates)
        tls.setName("tls")
        tls.setServiceParent(top)
    SiteService("web", site, listeners, redirect_site).setServiceParent(top)
    admin_listeners: list[Listener] = []
    if config.admin_listen:
        try:
            token = admin_token(config.data_dir)
        except OSError as e:
            raise StartupError(f"cannot write the admin API's token to {config.data_dir}: "
                               f"{e.strerror or e}; check that the relay's user owns it") from None
        admin_site = make_admin_site(relay, metrics, reactor=reactor, limits=config.http_limits,
                                     admin=AdminAPI(relay.operator, token))
        admin_listeners = [
            Listener(serverFromString(reactor, description), admin_site, "--admin-listen", as_written(description))
            for description in config.admin_listen
        ]
        SiteService("admin", admin_site, admin_listeners).setServiceParent(top)
    # config.json at start, admin.json once the admin listeners listen.
    DataDirFiles(config.data_dir, config, __version__, admin_listeners).setServiceParent(top)
    if acme is not None:
        # After the listeners: it starts ordering once they listen (the
        # challenges are answered there), and stops before them.
        acme.setServiceParent(top)
    readiness = Readiness(top.listeners, notify, exit or exit_process(reactor),
                          when_running=reactor.callWhenRunning)
    readiness.setName("readiness")
    readiness.setServiceParent(top)
    interval = watchdog_interval(environ)
    if interval is not None:
        Watchdog(interval, notify, reactor).setServiceParent(top)
    return top
