"""
``twistd leeloo`` options: argv and the environment become a validated,
frozen Config, and bad configuration is a short actionable message.
"""

import os
import stat
import sys

import txaio
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from leeloo.tap import (
    DEFAULT_LISTEN,
    Options,
    build_service,
    read_env_file,
    with_default_backlog,
)


class OptionsTestCase(SynchronousTestCase):
    def setUp(self):
        self.tmp = self.mktemp()
        os.makedirs(self.tmp)
        self.data_dir = os.path.join(self.tmp, "data")

    def parse(self, *argv, environ=None):
        options = Options(environ={} if environ is None else environ)
        options.parseOptions(["--data-dir", self.data_dir, *argv])
        return options.config

    def env_file(self, text):
        path = os.path.join(self.tmp, "relay.env")
        with open(path, "w") as f:
            f.write(text)
        return path


class ListenTests(OptionsTestCase):
    def test_default(self):
        """
        With no --listen the relay serves loopback port 8080, backlog 1024.
        """
        self.assertEqual(self.parse().listen, (DEFAULT_LISTEN + ":backlog=1024",))

    def test_repeatable(self):
        """
        --listen may be given several times; every endpoint is kept in order.
        """
        config = self.parse("--listen", "tcp:8081", "--listen", "tcp6:8082:interface=\\:\\:1")
        self.assertEqual(config.listen, ("tcp:8081:backlog=1024", "tcp6:8082:interface=\\:\\:1:backlog=1024"))

    def test_explicit_backlog_kept(self):
        """
        An endpoint string that sets backlog= keeps its own.
        """
        self.assertEqual(self.parse("--listen", "tcp:8081:backlog=5").listen, ("tcp:8081:backlog=5",))

    def test_backlog_only_where_accepted(self):
        """
        Endpoint types without a backlog argument are left as written.
        """
        self.assertEqual(with_default_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")
        self.assertEqual(with_default_backlog("unix:/run/leeloo.sock"), "unix:/run/leeloo.sock:backlog=1024")

    def test_unparsable_endpoint(self):
        """
        An endpoint Twisted cannot parse stops start-up naming it and showing
        a good example.
        """
        for bad in ("tcp:notaport", "nosuchtype:1234", "tcp"):
            with self.assertRaises(UsageError) as raised:
                self.parse("--listen", bad)
            self.assertIn(bad, str(raised.exception))
            self.assertIn("tcp:8080", str(raised.exception))

    def test_listen_backlog_reaches_the_socket(self):
        """
        The service tree listens with the backlog the endpoint string says.
        """
        previous = txaio.config.loop
        self.addCleanup(setattr, txaio.config, "loop", previous)
        reactor = MemoryReactorClock()
        service = build_service(self.parse("--listen", "tcp:0:interface=127.0.0.1"), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (0, 1024, "127.0.0.1"))


class DataDirTests(OptionsTestCase):
    def test_created_private(self):
        """
        The data directory is created, readable by the relay's user only.
        """
        config = self.parse()
        self.assertEqual(str(config.data_dir), self.data_dir)
        self.assertEqual(stat.S_IMODE(os.stat(self.data_dir).st_mode), 0o700)

    def test_unwritable(self):
        """
        A data dir that cannot be written stops start-up with a message
        naming it and what to do.
        """
        blocker = os.path.join(self.tmp, "file")
        open(blocker, "w").close()
        with self.assertRaises(UsageError) as raised:
            Options(environ={}).parseOptions(["--data-dir", os.path.join(blocker, "sub")])
        self.assertIn("--data-dir", str(raised.exception))
        self.assertIn("writable", str(raised.exception))


class EnvFileTests(OptionsTestCase):
    def test_format(self):
        """
        The env file takes KEY=VALUE lines, comments, blank lines, quotes,
        export and trailing comments.
        """
        path = self.env_file(
            "# LEELOO relay\n\n"
            "SPOTIFY_CLIENT_ID=my-client\n"
            'export SPOTIFY_CLIENT_SECRET="placeholder secret"\n'
            "SPOTIFY_REDIRECT_URI = https://relay.example/spotify/callback  # where Spotify returns\n"
            "TELEGRAM_API_SECRET='bot-placeholder'\n"
        )
        self.assertEqual(
            read_env_file(path),
            {
                "SPOTIFY_CLIENT_ID": "my-client",
                "SPOTIFY_CLIENT_SECRET": "placeholder secret",
                "SPOTIFY_REDIRECT_URI": "https://relay.example/spotify/callback",
                "TELEGRAM_API_SECRET": "bot-placeholder",
            },
        )

    def test_settings_from_file(self):
        """
        Settings in the env file configure Spotify and the bot API.
        """
        path = self.env_file(
            "SPOTIFY_CLIENT_ID=cid\nSPOTIFY_CLIENT_SECRET=csecret\n"
            "SPOTIFY_REDIRECT_URI=https://r/spotify/callback\nSPOTIFY_ACCOUNTS_URL=http://127.0.0.1:9\n"
            "TELEGRAM_API_SECRET=bot\n"
        )
        config = self.parse("--env-file", path)
        self.assertEqual(config.spotify.client_id, "cid")
        self.assertEqual(config.spotify.client_secret, "csecret")
        self.assertEqual(config.spotify.token_url, "http://127.0.0.1:9/api/token")
        self.assertEqual(config.spotify.api_url, "https://api.spotify.com")
        self.assertEqual(config.telegram_api_secret, "bot")

    def test_environment_wins(self):
        """
        The process environment wins over the env file, which fills the rest.
        """
        path = self.env_file("TELEGRAM_API_SECRET=from-file\nSPOTIFY_CLIENT_ID=file-id\n")
        config = self.parse(
            "--env-file", path,
            environ={"TELEGRAM_API_SECRET": "from-env", "SPOTIFY_CLIENT_SECRET": "s", "SPOTIFY_REDIRECT_URI": "u"},
        )
        self.assertEqual(config.telegram_api_secret, "from-env")
        self.assertEqual(config.spotify.client_id, "file-id")

    def test_secrets_not_in_repr(self):
        """
        The config's repr never shows a secret.
        """
        config = self.parse(environ={"TELEGRAM_API_SECRET": "bot-placeholder-value", "SPOTIFY_CLIENT_ID": "i",
                                     "SPOTIFY_CLIENT_SECRET": "spotify-placeholder-value",
                                     "SPOTIFY_REDIRECT_URI": "u"})
        self.assertNotIn("bot-placeholder-value", repr(config))
        self.assertNotIn("spotify-placeholder-value", repr(config))

    def test_unreadable(self):
        """
        A missing env file stops start-up naming the file.
        """
        missing = os.path.join(self.tmp, "nope.env")
        with self.assertRaises(UsageError) as raised:
            self.parse("--env-file", missing)
        self.assertIn(missing, str(raised.exception))

    def test_bad_line_names_line_not_value(self):
        """
        A malformed line is reported by number, without its content.
        """
        path = self.env_file("A=1\nthis is a placeholder-secret line\n")
        with self.assertRaises(UsageError) as raised:
            self.parse("--env-file", path)
        self.assertIn("line 2", str(raised.exception))
        self.assertNotIn("placeholder-secret", str(raised.exception))

    def test_half_configured_spotify(self):
        """
        Spotify with only some of its settings is refused, naming what is
        missing.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse(environ={"SPOTIFY_CLIENT_ID": "x"})
        self.assertIn("SPOTIFY_CLIENT_SECRET", str(raised.exception))

    def test_no_settings(self):
        """
        Without settings Spotify and the bot API are off.
        """
        config = self.parse()
        self.assertIsNone(config.spotify)
        self.assertIsNone(config.telegram_api_secret)


class MessageSizeTests(OptionsTestCase):
    def test_default(self):
        """
        The default message size limit is 64 KiB.
        """
        self.assertEqual(self.parse().limits.max_message_size, 65536)

    def test_option(self):
        """
        --max-message-size sets the limit.
        """
        self.assertEqual(self.parse("--max-message-size", "4096").limits.max_message_size, 4096)

    def test_invalid(self):
        """
        A non-positive or non-numeric size is refused.
        """
        for bad in ("0", "-5", "big"):
            self.assertRaises(UsageError, self.parse, "--max-message-size", bad)


class _NoClock:
    def seconds(self):
        return 0.0


class TransportLimitOptionsTests(OptionsTestCase):
    def test_defaults(self):
        """
        The transport limits are on by default: 20000 connections, 256 per
        client address, 1 MiB unsent, 10 s to send a request, no trusted
        proxy, no public URL (same-origin browsers only), no admin listener.
        """
        config = self.parse()
        self.assertEqual(
            (config.limits.max_connections, config.limits.max_connections_per_address,
             config.limits.max_unsent, config.http_limits.request_timeout),
            (20000, 256, 1024 * 1024, 10.0))
        self.assertEqual((config.trusted_proxies, config.public_url, config.admin_listen), ((), None, ()))

    def test_options(self):
        """
        Each limit has its option.
        """
        config = self.parse(
            "--max-connections", "100", "--max-connections-per-address", "5",
            "--max-unsent-bytes", "65536", "--request-timeout", "2.5",
            "--public-url", "https://relay.example.org",
            "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1",
            "--admin-listen", "tcp:9100:interface=127.0.0.1",
        )
        self.assertEqual(
            (config.limits.max_connections, config.limits.max_connections_per_address,
             config.limits.max_unsent, config.http_limits.request_timeout),
            (100, 5, 65536, 2.5))
        self.assertEqual(config.public_url, "https://relay.example.org")
        self.assertEqual(config.trusted_proxies, ("10.0.0.0/8", "::1"))
        self.assertEqual(config.admin_listen, ("tcp:9100:interface=127.0.0.1:backlog=1024",))

    def test_invalid_numbers(self):
        """
        A non-positive or non-numeric limit is refused.
        """
        for option in ("--max-connections", "--max-connections-per-address", "--max-unsent-bytes",
                       "--request-timeout"):
            for bad in ("0", "-1", "lots"):
                self.assertRaises(UsageError, self.parse, option, bad)

    def test_bounds_under_attack(self):
        """
        --connect-rate (default 10 a second, bursts of 20) and
        --max-fragments (default 64) have their options; the connection
        cap per address applies to the sites' gate too.
        """
        defaults = self.parse()
        self.assertEqual((defaults.http_limits.connect_rate, defaults.http_limits.max_connections_per_address,
                          defaults.limits.max_fragments), (10.0, 256, 64))
        config = self.parse("--connect-rate", "2.5", "--max-fragments", "8", "--max-connections-per-address", "5")
        self.assertEqual((config.http_limits.connect_rate, config.http_limits.max_connections_per_address,
                          config.limits.max_fragments), (2.5, 5, 8))
        gate = config.http_limits.gate(_NoClock())
        self.assertEqual((gate.max_per_address, gate.rate.per_second, gate.rate.burst), (5, 2.5, 5.0))
        for option in ("--connect-rate", "--max-fragments"):
            for bad in ("0", "-1", "lots"):
                self.assertRaises(UsageError, self.parse, option, bad)

    def test_one_gate_for_public_and_redirect(self):
        """
        The public and the redirect sites count connections on one gate,
        which trusts the configured proxies.
        """
        config = self.parse("--redirect-listen", "tcp:8081:interface=127.0.0.1", "--trusted-proxy", "10.0.0.0/8")
        service, reactor = started(self, config)
        factories = {port: factory for (port, factory, _, _) in reactor.tcpServers}
        self.assertIsNotNone(service.site.gate)
        self.assertIs(factories[8081].gate, service.site.gate)
        self.assertFalse(service.site.gate.counted("10.1.1.1"))

    def test_invalid_trusted_proxy(self):
        """
        A trusted proxy that is not an address or CIDR block is refused,
        naming it.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--trusted-proxy", "proxy.example.org")
        self.assertIn("proxy.example.org", str(raised.exception))

    def test_invalid_public_url(self):
        """
        A public URL that is not http(s) with a host is refused with an
        example.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--public-url", "relay.example.org")
        self.assertIn("https://relay.example.org", str(raised.exception))

    def test_invalid_admin_listen(self):
        """
        An unusable admin endpoint is refused, naming the option.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--admin-listen", "tcp:notaport")
        self.assertIn("--admin-listen", str(raised.exception))


class FieldOptionsTests(OptionsTestCase):
    def test_defaults(self):
        """
        Legacy devices are replayed a day of messages and ten minutes of
        nudges and reactions; pings every 25 s with 20 s to answer;
        unbound connections closed after a minute.
        """
        config = self.parse()
        self.assertEqual(
            (config.legacy_replay_age, config.ephemeral_age, config.limits.auto_ping_interval,
             config.limits.auto_ping_timeout, config.bind_timeout),
            (86400.0, 600.0, 25.0, 20.0, 60.0))

    def test_options_reach_the_relay(self):
        """
        Each option reaches the relay or its WebSocket factory.
        """
        config = self.parse("--legacy-replay-age", "3600", "--ephemeral-age", "30",
                            "--ping-interval", "0.5", "--ping-timeout", "1.5", "--bind-timeout", "0")
        service, _ = started(self, config)
        relay = service.relay
        self.assertEqual((relay.legacy_replay_age, relay.ephemeral_age, relay.bind_timeout), (3600, 30, 0))
        [factory] = {r.ws_factory for r in service if hasattr(r, "ws_factory")}
        self.assertEqual((factory.autoPingInterval, factory.autoPingTimeout), (0.5, 1.5))

    def test_invalid(self):
        """
        Ages and ping times must be positive; the bind timeout 0 or more.
        """
        for option in ("--legacy-replay-age", "--ephemeral-age", "--ping-interval", "--ping-timeout"):
            for bad in ("0", "-1", "soon", "nan"):
                self.assertRaises(UsageError, self.parse, option, bad)
        for bad in ("-1", "soon", "nan", "inf"):
            self.assertRaises(UsageError, self.parse, "--bind-timeout", bad)

    def test_logged_at_start(self):
        """
        The effective ages, ping times and bind timeout are logged at start.
        """
        from twisted.logger import formatEvent

        config = self.parse("--legacy-replay-age", "3600", "--ephemeral-age", "30", "--ping-interval", "7")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        started(self, config)
        text = "\n".join(formatEvent(e) for e in events)
        for fact in ("last 3600s", "last 30s", "after 60s", "ping every 7s"):
            self.assertIn(fact, text)


class EnvFilePermissionTests(OptionsTestCase):
    SECRET = "s3cr3t-value-in-env-file"

    def env_file_mode(self, mode):
        path = self.env_file(f"TELEGRAM_API_SECRET={self.SECRET}\n")
        os.chmod(path, mode)
        return path

    def test_wide_permissions_warned(self):
        """
        An env file readable by others gives a start-up warning naming the
        file, its mode and the fix, never a value.
        """
        path = self.env_file_mode(0o644)
        [warning] = self.parse("--env-file", path).warnings
        self.assertIn(path, warning)
        self.assertIn("0644", warning)
        self.assertIn("chmod 600", warning)
        self.assertNotIn(self.SECRET, warning)

    def test_private_file_not_warned(self):
        """
        A 0600 (or stricter) env file gives no warning.
        """
        for mode in (0o600, 0o400):
            self.assertEqual(self.parse("--env-file", self.env_file_mode(mode)).warnings, ())

    def test_warning_logged_at_start(self):
        """
        The warning is logged when the relay starts, at warning level.
        """
        from twisted.logger import LogLevel, formatEvent

        # Few enough connections that this machine's open-file limit
        # warns of nothing.
        config = self.parse("--env-file", self.env_file_mode(0o640), "--max-connections", "100")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        started(self, config)
        [warning] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("0640", warning)
        self.assertNotIn(self.SECRET, "".join(formatEvent(e) + repr(e) for e in events))


def started(testcase, config):
    """
    Build and start the service tree for C{config} on a memory reactor.
    """
    previous = txaio.config.loop
    testcase.addCleanup(setattr, txaio.config, "loop", previous)
    reactor = MemoryReactorClock()
    service = build_service(config, reactor)
    service.startService()
    testcase.addCleanup(service.stopService)
    return service, reactor


class StartLogTests(OptionsTestCase):
    def test_limits_logged(self):
        """
        The effective transport limits are logged at start.
        """
        from twisted.logger import formatEvent

        config = self.parse("--max-connections", "1234", "--max-connections-per-address", "12",
                            "--request-timeout", "7", "--trusted-proxy", "10.0.0.0/8",
                            "--public-url", "https://relay.example.org")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        started(self, config)
        text = "\n".join(formatEvent(e) for e in events)
        for fact in ("1234 connections", "12 per client address", "1048576 bytes behind",
                     "within 7s", "65536 bytes", "10.0.0.0/8", "https://relay.example.org",
                     "loopback clients only"):
            self.assertIn(fact, text)


class BoundsLogTests(OptionsTestCase):
    def test_bounds_logged(self):
        """
        The connection gate's limits and the fragment limit are logged at
        start with the other limits.
        """
        from twisted.logger import formatEvent

        config = self.parse("--max-connections-per-address", "12", "--connect-rate", "3",
                            "--max-fragments", "9")
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        started(self, config)
        text = "\n".join(formatEvent(e) for e in events)
        for fact in ("12 connections per client address", "3 new ones a second per address (bursts of 6)",
                     "in at most 9 frames"):
            self.assertIn(fact, text)


class AdminListenTests(OptionsTestCase):
    def test_admin_site_listens(self):
        """
        Each --admin-listen endpoint serves the admin site (with /metrics),
        not the public one.
        """
        config = self.parse("--listen", "tcp:8080:interface=127.0.0.1",
                            "--admin-listen", "tcp:9100:interface=127.0.0.1")
        service, reactor = started(self, config)
        factories = {port: factory for (port, factory, _, _) in reactor.tcpServers}
        self.assertIs(factories[8080], service.site)
        self.assertIs(factories[9100], service.admin_site)
        self.assertIsNot(service.admin_site, service.site)
        self.assertIn(b"metrics", service.admin_site.resource.children)


class UnderTwistd:
    """
    Stands in for twistd's ServerOptions as the parent of our options.
    """


class OneLineTests(OptionsTestCase):
    BAD = [
        # option, value, what the line must say is allowed
        ("--max-message-size", "-5", "a whole number, 1 or more"),
        ("--max-connections", "lots", "a whole number, 1 or more"),
        ("--request-timeout", "0", "a number above 0"),
        ("--retention-days", "nan", "a number above 0"),
        ("--crew-code-length", "99", "a whole number from 4 to 16"),
        ("--store", "postgres", "sqlite or memory"),
    ]

    def parse_under_twistd(self, *argv):
        options = Options(environ={})
        options.parent = UnderTwistd()
        options.parseOptions(["--data-dir", self.data_dir, *argv])
        return options.config

    def test_bad_value_names_option_value_and_what_is_allowed(self):
        """
        A bad option value is one line: the option, the value as given, and
        what the option allows (not "Parameter type enforcement failed").
        """
        for option, value, allowed in self.BAD:
            with self.assertRaises(UsageError) as raised:
                self.parse(option, value)
            self.assertEqual(str(raised.exception), f"{option} {value}: must be {allowed}")

    def test_every_checked_option_names_itself(self):
        """
        Every option with a checked value, present and future, fails with
        the one line naming it and the value.
        """
        checked = [p[0] for p in Options.optParameters if len(p) > 4]
        self.assertIn("max-message-size", checked)
        for name in checked:
            with self.assertRaises(UsageError) as raised:
                self.parse(f"--{name}", "not-a-value")
            self.assertTrue(str(raised.exception).startswith(f"--{name} not-a-value: must be "),
                            str(raised.exception))

    def test_under_twistd_a_mistake_is_one_line_and_status_1(self):
        """
        Under twistd a mistake exits with one line (twistd would print its
        whole usage text above a UsageError).
        """
        for argv in ([option, value] for option, value, _ in self.BAD):
            e = self.assertRaises(SystemExit, self.parse_under_twistd, *argv)
            self.assertEqual(e.code, f"leeloo: {argv[0]} {argv[1]}: must be " + dict(
                (o, a) for o, _, a in self.BAD)[argv[0]])
        e = self.assertRaises(SystemExit, self.parse_under_twistd, "--no-such-option")
        self.assertIn("--no-such-option", e.code)
        self.assertNotIn("\n", e.code)

    def test_unparsable_endpoint_as_written(self):
        """
        An unusable endpoint is named as the operator wrote it, without the
        backlog the relay would add.
        """
        with self.assertRaises(UsageError) as raised:
            self.parse("--listen", "tcp:notaport")
        self.assertIn("--listen tcp:notaport is not a usable endpoint", str(raised.exception))
        self.assertNotIn("backlog", str(raised.exception))

    def test_systemd_endpoint_without_socket(self):
        """
        A systemd: endpoint with no socket passed says it needs socket
        activation.
        """
        with self.assertRaises(UsageError) as raised:
            Options(environ={}).parseOptions(["--data-dir", self.data_dir, "--listen", "systemd:domain=INET:index=0"])
        self.assertIn("socket activation", str(raised.exception))

    def test_help_is_clean(self):
        """
        --help has no stray runs of spaces inside an entry, and the --listen
        entry names letsencrypt:.
        """
        import re

        text = str(Options())
        for line in text.splitlines():
            entry = line.strip()
            if entry.startswith("-"):
                parts = re.split(r"\s{2,}", entry, maxsplit=1)
                entry = parts[1] if len(parts) > 1 else ""
            self.assertNotIn("  ", entry, line)
        listen = text[text.index("--listen="):text.index("--max-connections=")]
        self.assertIn("letsencrypt:", listen)

    def test_version(self):
        """
        --version prints the relay's version and exits 0.
        """
        from io import StringIO

        from leeloo import __version__

        out = StringIO()
        self.patch(sys, "stdout", out)
        e = self.assertRaises(SystemExit, self.parse, "--version")
        self.assertEqual(e.code, 0)
        self.assertTrue(out.getvalue().startswith(f"leeloo {__version__} (Twisted "), out.getvalue())


class EnvFileWarningTests(OptionsTestCase):
    def test_unknown_key_warned_by_name(self):
        """
        A key the relay does not read is warned about by name, with the
        setting it probably meant; its value is never in the warning.
        """
        path = self.env_file("TELEGRAM_API_SECRT=typo-secret-value\nPORT=3000\n")
        os.chmod(path, 0o600)
        warnings = self.parse("--env-file", path).warnings
        self.assertEqual(len(warnings), 2)
        self.assertIn("unknown setting TELEGRAM_API_SECRT ignored; did you mean TELEGRAM_API_SECRET?",
                      warnings[0])
        self.assertIn("unknown setting PORT ignored", warnings[1])
        self.assertNotIn("typo-secret-value", "".join(warnings))

    def test_known_keys_not_warned(self):
        """
        An env file with only the relay's settings gives no warning.
        """
        path = self.env_file("TELEGRAM_API_SECRET=x\nSPOTIFY_API_URL=http://127.0.0.1:1\n")
        os.chmod(path, 0o600)
        self.assertEqual(self.parse("--env-file", path).warnings, ())

    def test_placeholders_refuse_to_start(self):
        """
        Every value etc/leeloo.env.example ships with refuses to start,
        naming the setting, from the env file or the environment.
        """
        from leeloo.tap import PLACEHOLDERS

        example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "etc", "leeloo.env.example")
        shipped = read_env_file(example)
        self.assertEqual(shipped, {k: v for k, v in PLACEHOLDERS.items() if k in shipped})
        self.assertIn("TELEGRAM_API_SECRET", shipped)
        for key, value in shipped.items():
            path = self.env_file(f"{key}={value}\n")
            os.chmod(path, 0o600)
            with self.assertRaises(UsageError) as raised:
                self.parse("--env-file", path)
            self.assertIn(f"{key} in --env-file {path} is still the placeholder", str(raised.exception))
            with self.assertRaises(UsageError) as raised:
                self.parse(environ={key: value})
            self.assertIn(f"{key} in the environment is still the placeholder", str(raised.exception))

    def test_redirect_without_webroot_warned(self):
        """
        --redirect-listen without --acme-webroot warns that certificate
        challenges will be redirected.
        """
        [warning] = self.parse("--redirect-listen", "tcp:80").warnings
        self.assertIn("--redirect-listen without --acme-webroot", warning)
        self.assertIn("challenges", warning)
        webroot = os.path.join(self.tmp, "acme")
        os.makedirs(webroot)
        self.assertEqual(self.parse("--redirect-listen", "tcp:80", "--acme-webroot", webroot).warnings, ())

class StoreLimitOptionsTests(OptionsTestCase):
    def test_defaults(self):
        """
        By default a crew's log holds at most 16 MiB, senders are paused
        past 8 MiB waiting for the store, and presence has 10 s of grace.
        """
        config = self.parse()
        self.assertEqual((config.crew_log_bytes, config.store_queue_bytes, config.presence_grace),
                         (16 * 1024 * 1024, 8 * 1024 * 1024, 10.0))

    def test_options_reach_the_relay(self):
        """
        Each has its option, and the relay is built with it.
        """
        config = self.parse("--store", "memory", "--crew-log-bytes", "1000", "--store-queue-bytes", "2000",
                            "--presence-grace", "0")
        service, _ = started(self, config)
        relay = service.relay
        self.assertEqual((relay.crew_log_bytes, relay.store_queue_bytes, relay.presence_grace), (1000, 2000, 0.0))

    def test_invalid(self):
        """
        Byte bounds must be positive; the grace may be zero but not negative.
        """
        for option, bad in (("--crew-log-bytes", "0"), ("--store-queue-bytes", "-1"),
                            ("--presence-grace", "-1"), ("--presence-grace", "soon")):
            self.assertRaises(UsageError, self.parse, option, bad)


class RedisOptionsTests(OptionsTestCase):
    """
    --redis and its options.
    """

    def test_default_is_sqlite(self):
        """
        Without --redis or --store the state is in SQLite, and no Redis is
        configured.
        """
        config = self.parse()
        self.assertEqual((config.store, config.redis), ("sqlite", None))

    def test_node_heartbeat(self):
        """
        --node-heartbeat SECONDS is 5 by default, and must be more than 0.
        """
        self.assertEqual(self.parse().node_heartbeat, 5.0)
        self.assertEqual(self.parse("--redis", "redis://127.0.0.1:6379/0", "--node-heartbeat", "0.5").node_heartbeat,
                         0.5)
        for bad in ("0", "-1", "soon"):
            with self.assertRaises(UsageError) as raised:
                self.parse("--node-heartbeat", bad)
            self.assertIn("--node-heartbeat", str(raised.exception))

    def test_redis_with_password_from_environment(self):
        """
        --redis makes Redis the store; the password comes from
        LEELOO_REDIS_PASSWORD in the environment and never shows in the
        configuration's repr.
        """
        config = self.parse("--redis", "rediss://relay@redis.example.org:6380/2", "--redis-timeout", "2",
                            environ={"LEELOO_REDIS_PASSWORD": "pw-from-env"})
        self.assertEqual(config.store, "redis")
        r = config.redis
        self.assertEqual((r.host, r.port, r.db, r.username, r.tls, r.password, r.reply_timeout),
                         ("redis.example.org", 6380, 2, "relay", True, "pw-from-env", 2.0))
        self.assertNotIn("pw-from-env", repr(config))

    def test_password_from_env_file(self):
        """
        LEELOO_REDIS_PASSWORD may come from the env file (no unknown-setting
        warning); the environment wins over it.
        """
        path = self.env_file("LEELOO_REDIS_PASSWORD=pw-from-file\n")
        os.chmod(path, 0o600)
        config = self.parse("--env-file", path, "--redis", "redis://127.0.0.1:6379/0")
        self.assertEqual((config.redis.password, config.warnings), ("pw-from-file", ()))
        config = self.parse("--env-file", path, "--redis", "redis://127.0.0.1:6379/0",
                            environ={"LEELOO_REDIS_PASSWORD": "env"})
        self.assertEqual(config.redis.password, "env")

    def test_refused_combinations(self):
        """
        --store or --fsync with --redis, a password in the URL, a bad URL,
        and --redis-ca without rediss:// are refused in one line each.
        """
        cases = [
            (("--redis", "redis://h:1/0", "--store", "sqlite"), "--store sqlite and --redis"),
            (("--redis", "redis://h:1/0", "--store", "memory"), "--store memory and --redis"),
            (("--redis", "redis://h:1/0", "--fsync"), "--fsync is the SQLite store's"),
            (("--redis", "redis://u:secret@h:1/0"), "LEELOO_REDIS_PASSWORD"),
            (("--redis", "http://h:1/0"), "redis:// or rediss://"),
            (("--redis", "redis://h:1/0", "--redis-ca", __file__), "--redis-ca is for rediss://"),
            (("--redis-ca", __file__), "give --redis too"),
        ]
        for argv, says in cases:
            with self.assertRaises(UsageError) as raised:
                self.parse(*argv)
            self.assertIn(says, str(raised.exception), argv)
            self.assertNotIn("secret", str(raised.exception))
            self.assertEqual(len(str(raised.exception).splitlines()), 1)

    def test_unreachable_redis_is_a_startup_error(self):
        """
        A Redis that cannot be reached at start is one StartupError line
        naming where, not a traceback.
        """
        from leeloo.service import StartupError

        config = self.parse("--redis", "redis://127.0.0.1:1/0")
        with self.assertRaises(StartupError) as raised:
            build_service(config, MemoryReactorClock(), notify=lambda state: True)
        self.assertIn("cannot open the Redis store", str(raised.exception))
        self.assertIn("127.0.0.1:1", str(raised.exception))

    def test_sqlite_path_does_not_load_the_redis_client(self):
        """
        Building the SQLite relay never imports txredisapi (nor the Redis
        store): the single-node path is as it was.
        """
        import subprocess

        code = ("import sys; from leeloo.tap import Options, build_service; "
                "o = Options(environ={}); o.parseOptions(['--data-dir', sys.argv[1]]); "
                "from twisted.internet.testing import MemoryReactorClock; "
                "build_service(o.config, MemoryReactorClock(), notify=lambda s: True); "
                "print('txredisapi' in sys.modules, 'leeloo.redisstore' in sys.modules)")
        from .support import CHECKOUT

        env = dict(os.environ, PYTHONPATH=CHECKOUT)
        done = subprocess.run([sys.executable, "-c", code, self.data_dir], capture_output=True, text=True,
                              env=env, timeout=60)
        self.assertEqual(done.stdout.split(), ["False", "False"], done.stderr)
