"""
Tests for L{leeloo.metrics} and where ``/metrics`` is served: on the admin
site to anyone who reaches it, on the public site to loopback clients only.
"""

from __future__ import annotations

import txaio
from prometheus_client.parser import text_string_to_metric_families

from leeloo.metrics import Metrics
from leeloo.testing import MemoryWebSocketClients
from leeloo.web import HTTPLimits, make_admin_site, make_site
from leeloo.websocket import RelayServerFactory, WebSocketLimits

from .test_site import SiteTestCase

txaio.use_twisted()


def samples(body: bytes) -> dict:
    """
    The samples of a Prometheus exposition, by name and labels.
    """
    found = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTestCase(SiteTestCase):
    def make_site(self):
        self.factory = RelayServerFactory(self.relay, WebSocketLimits(max_connections_per_address=2))
        self.metrics = Metrics(self.relay, self.factory)
        self.recorder = None
        return make_site(self.relay, self.factory, None, None, reactor=self.clock, metrics=self.metrics)


class PublicSiteTests(MetricsTestCase):
    def test_loopback_served(self):
        """
        A loopback client gets the metrics in Prometheus' text format.
        """
        status, headers, body = self.get("/metrics", host="127.0.0.1")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/plain; version=0.0.4"))
        self.assertIn(("leeloo_devices", ()), samples(body))

    def test_remote_gets_404(self):
        """
        Anyone else gets the same 404 as for a path that does not exist.
        """
        refused = self.get("/metrics", host="203.0.113.9")
        missing = self.get("/no-such-path", host="203.0.113.9")
        self.assertEqual(refused[0], 404)
        self.assertEqual(refused[2], missing[2])

    def test_proxied_gets_404(self):
        """
        A request forwarded by a proxy on this host is not a loopback
        client's.
        """
        for header in ("X-Forwarded-For: 203.0.113.9", "Forwarded: for=203.0.113.9", "X-Real-IP: 203.0.113.9"):
            self.assertEqual(self.get("/metrics", header, host="127.0.0.1")[0], 404, header)

    def test_not_served_without_metrics(self):
        """
        A public site made without metrics has no /metrics at all.
        """
        site = make_site(self.relay, self.factory, None, None, reactor=self.clock)
        self.site = site
        self.assertEqual(self.get("/metrics", host="127.0.0.1")[0], 404)


class AdminSiteTests(MetricsTestCase):
    def setUp(self):
        super().setUp()
        self.public = self.site
        self.site = make_admin_site(self.relay, self.metrics, reactor=self.clock)

    def test_served_to_anyone(self):
        """
        The admin site serves /metrics to any address that reaches it.
        """
        status, _, body = self.get("/metrics", host="203.0.113.9")
        self.assertEqual(status, 200)
        self.assertIn(("leeloo_crews", ()), samples(body))

    def test_nothing_else(self):
        """
        The admin site has /metrics and /health, and nothing of the public
        site.
        """
        self.assertEqual(self.get("/health")[0], 200)
        for path in ("/", "/ws", "/api/telegram/crew/status", "/spotify/callback"):
            self.assertEqual(self.get(path)[0], 404, path)

    def test_figures(self):
        """
        The figures follow the relay: connections, devices and crews now,
        messages in and out, refusals by reason, waiting HTTP connections.
        """
        net = MemoryWebSocketClients(self.public)
        a, b = net.connect(), net.connect()
        for client, device in ((a, "d0"), (b, "d1")):
            client.send_json({"type": "register", "device_id": device, "crew_code": "ALPHA"})
        net.flush()
        net.connect()  # a third from 127.0.0.1: refused
        a.send_json({"type": "message", "payload": {"text": "hi"}})
        net.flush()
        self.connect()  # an HTTP connection to the admin site that sends nothing yet
        found = samples(self.get("/metrics")[2])
        self.assertEqual(found[("leeloo_websocket_connections", ())], 2)
        self.assertEqual(found[("leeloo_devices", ())], 2)
        self.assertEqual(found[("leeloo_crews", ())], 1)
        self.assertEqual(found[("leeloo_crews_online", ())], 1)
        self.assertEqual(found[("leeloo_websocket_messages_received_total", ())], 3)
        self.assertEqual(found[("leeloo_websocket_messages_sent_total", ())], 3)
        self.assertEqual(found[("leeloo_websocket_refused_total", (("reason", "per_address"),))], 1)
        self.assertEqual(found[("leeloo_http_connections_waiting", (("site", "admin"),))], 1)
        self.assertEqual(found[("leeloo_http_connections_waiting", (("site", "public"),))], 0)
        self.assertIn(("process_resident_memory_bytes", ()), found)


class RefusalFigureTests(MetricsTestCase):
    def test_rate_limited_and_abuse_close(self):
        """
        Error messages the relay sends are counted by code (the core's rate
        limit among them), and the connections it closes by close code.
        """
        net = MemoryWebSocketClients(self.site)
        client = net.connect()
        burst = int(self.relay.limits.messages.burst)
        strikes = self.relay.limits.abuse_strikes
        for _ in range(burst + strikes):
            client.send_json({"type": "ping"})
        net.flush()
        self.assertEqual(client.close_code, 4029)
        found = samples(self.get("/metrics", host="127.0.0.1")[2])
        self.assertEqual(found[("leeloo_websocket_errors_sent_total", (("code", "rate_limited"),))], strikes)
        self.assertEqual(found[("leeloo_websocket_closed_by_relay_total", (("code", "4029"),))], 1)

    def test_http_responses_by_status(self):
        """
        HTTP responses are counted by status per site (the bot API's 429
        and 401 among them).
        """
        self.get("/health")
        self.get("/no-such-path")
        self.get("/no-such-path")
        found = samples(self.get("/metrics", host="127.0.0.1")[2])
        self.assertEqual(found[("leeloo_http_responses_total", (("code", "200"), ("site", "public")))], 1)
        self.assertEqual(found[("leeloo_http_responses_total", (("code", "404"), ("site", "public")))], 2)


class GateFigureTests(MetricsTestCase):
    def make_site(self):
        site = super().make_site()
        site.gate = HTTPLimits(max_connections_per_address=1, connect_rate=1).gate(self.clock)
        return site

    def test_connections_refused_by_reason(self):
        """
        Connections the gate refused are counted by reason, and their
        answers with the site's responses by status, as are twisted.web's
        own refusals (400, 414, 431).
        """
        self.connect()
        self.connect()  # over the cap
        self.connect()  # past the burst of 2
        self.connect(host="198.51.100.7")[0].dataReceived(b"NONSENSE\r\n\r\n")
        found = samples(self.get("/metrics", host="127.0.0.1")[2])
        self.assertEqual(found[("leeloo_connections_refused_total", (("reason", "per_address"),))], 1)
        self.assertEqual(found[("leeloo_connections_refused_total", (("reason", "connect_rate"),))], 1)
        self.assertEqual(found[("leeloo_http_responses_total", (("code", "503"), ("site", "public")))], 1)
        self.assertEqual(found[("leeloo_http_responses_total", (("code", "429"), ("site", "public")))], 1)
        self.assertEqual(found[("leeloo_http_responses_total", (("code", "400"), ("site", "public")))], 1)


class LifecycleFigureTests(MetricsTestCase):
    def scrape(self):
        return samples(self.get("/metrics", host="127.0.0.1")[2])

    def test_connect_share_leave(self):
        """
        /metrics moves as devices connect, one shares a song and leaves:
        devices and connections, messages received by kind, deliveries, a
        timed fan-out, the store's batches.
        """
        before = self.scrape()
        self.assertEqual(before[("leeloo_devices", ())], 0)
        self.assertEqual(before[("leeloo_messages_received_total", (("kind", "song_push"),))], 0)
        self.assertEqual(before[("leeloo_fanout_seconds_count", ())], 0)
        net = MemoryWebSocketClients(self.site)
        a, b = net.connect(), net.connect(host="127.0.0.2")
        for client, device in ((a, "leeloo_00000000000a"), (b, "leeloo_00000000000b")):
            client.send_json({"type": "register", "device_id": device, "crew_code": "ALPHA"})
        net.flush()
        joined = self.scrape()
        self.assertEqual((joined[("leeloo_devices", ())], joined[("leeloo_websocket_connections", ())]), (2, 2))
        a.send_json({"type": "share_music", "spotify_uri": "spotify:track:1", "artist": "A", "track": "T",
                     "album": "B"})
        net.flush()
        shared = self.scrape()
        self.assertEqual(shared[("leeloo_messages_received_total", (("kind", "song_push"),))], 1)
        self.assertEqual(shared[("leeloo_messages_received_total", (("kind", "text"),))], 0)
        self.assertEqual(shared[("leeloo_deliveries_total", ())], 1)
        self.assertEqual(shared[("leeloo_fanout_seconds_count", ())], 1)
        self.assertEqual(shared[("leeloo_fanout_seconds_bucket", (("le", "+Inf"),))], 1)
        self.assertGreater(shared[("leeloo_store_batch_seconds_count", ())], 0)
        self.assertEqual(shared[("leeloo_store_queue_depth", ())], 0)
        self.assertEqual(shared[("leeloo_replayed_messages_total", ())], 0)
        a.sendClose()
        net.flush()
        left = self.scrape()
        self.assertEqual((left[("leeloo_devices", ())], left[("leeloo_websocket_connections", ())]), (1, 1))

    def test_kinds_bounded(self):
        """
        A msg_type devices do not send is counted as other: the labels stay
        the known msg_types and other, whatever devices send.
        """
        net = MemoryWebSocketClients(self.site)
        a = net.connect()
        a.send_json({"type": "register", "device_id": "leeloo_00000000000a", "crew_code": "ALPHA"})
        for n in range(5):
            a.send_json({"type": "message", "msg_type": f"invented-{n}", "payload": {}})
        net.flush()
        found = self.scrape()
        kinds = {dict(labels)["kind"] for name, labels in found if name == "leeloo_messages_received_total"}
        self.assertEqual(kinds, {"text", "reaction", "song_push", "nudge", "hang_propose", "hang_confirm", "other"})
        self.assertEqual(found[("leeloo_messages_received_total", (("kind", "other"),))], 5)

    def test_replayed(self):
        """
        A device coming back is replayed what it missed, and the replayed
        messages are counted.
        """
        net = MemoryWebSocketClients(self.site)
        a, b = net.connect(), net.connect(host="127.0.0.2")
        for client, device in ((a, "leeloo_00000000000a"), (b, "leeloo_00000000000b")):
            client.send_json({"type": "register", "device_id": device, "crew_code": "ALPHA"})
        net.flush()
        [registered] = [m for m in b.take() if m["type"] == "registered"]
        b.send_json({"type": "ack", "seq": 0})
        b.sendClose()
        net.flush()
        a.send_json({"type": "message", "payload": {"text": "while away"}})
        net.flush()
        back = net.connect(host="127.0.0.2")
        back.send_json({"type": "register", "device_id": "leeloo_00000000000b", "crew_code": "ALPHA",
                        **({"device_key": registered["device_key"]} if registered.get("device_key") else {})})
        net.flush()
        self.assertIn("while away", [m["payload"]["text"] for m in back.take() if m["type"] == "message"])
        self.assertEqual(self.scrape()[("leeloo_replayed_messages_total", ())], 1)


class CertificateFigureTests(MetricsTestCase):
    def test_expiry_by_domain(self):
        """
        Each served domain's certificate expiry is a gauge labelled by
        domain; a domain waiting for its first certificate has none.
        """
        import datetime

        from leeloo.testca import LetsEncryptDirectory, ThrowawayCA
        from leeloo.tls import CertificateStore
        from leeloo.tls_acme import placeholder_certificate

        from .test_tls import FixedClock, temporary_directory

        path = temporary_directory(self)
        issued = ThrowawayCA().issue(["relay.leeloo.test"])
        LetsEncryptDirectory(path).install("relay.leeloo.test", issued)
        clock = FixedClock()
        served = CertificateStore(path, ["relay.leeloo.test"], clock)
        pending = CertificateStore(path, ["new.leeloo.test"], clock,
                                   placeholder=lambda name: placeholder_certificate(name, (name,), clock.seconds()))
        self.metrics.add_certificates([served, pending])
        found = samples(self.get("/metrics", host="127.0.0.1")[2])
        expiry = issued.cert.not_valid_after_utc.replace(tzinfo=datetime.timezone.utc).timestamp()
        self.assertEqual(found[("leeloo_certificate_expiry_timestamp_seconds", (("domain", "relay.leeloo.test"),))],
                         expiry)
        self.assertNotIn(("leeloo_certificate_expiry_timestamp_seconds", (("domain", "new.leeloo.test"),)), found)
