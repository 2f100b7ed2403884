"""
The relay's figures in Prometheus' text format, for ``GET /metrics``.

Nothing is updated per message here: the relay's parts (the core's
delivery, replay and store journal, the WebSocket factory, the sites, the
certificate stores) keep plain integer counters and expose them through
their C{stats()}; the collector reads those only when Prometheus scrapes.
README.rst's "Metrics" section says what each one means.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from leeloo.access import CONNECTING_TOO_FAST, TOO_MANY_CONNECTIONS, TOO_MANY_FROM_ADDRESS
from leeloo.core.delivery import FANOUT_SAMPLE_EVERY, MESSAGE_KINDS
from leeloo.figures import HistogramFigures
from leeloo.relay import Relay
from leeloo.websocket import REFUSED_ORIGIN

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _by_code(name: str, documentation: str, counts: Any) -> CounterMetricFamily:
    """
    A counter labelled by code, from a mapping of counts.
    """
    family = CounterMetricFamily(name, documentation, labels=["code"])
    for code, count in sorted(counts.items()):
        family.add_metric([str(code)], count)
    return family


def _histogram(name: str, documentation: str, figures: HistogramFigures) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=figures.cumulative(), sum_value=figures.sum)


class RelayCollector:
    """
    Reads the figures of the relay's parts at scrape time.
    """

    def __init__(self, relay: Relay, ws_factory: Any) -> None:
        self.relay = relay
        self.ws_factory = ws_factory
        self.sites: list[Any] = []
        # Objects with expiry(): domain -> its certificate's notAfter.
        self.certificates: list[Any] = []

    def collect(self) -> Iterator[Metric]:
        stats = self.relay.stats()
        ws = self.ws_factory.stats()
        yield GaugeMetricFamily("leeloo_websocket_connections", "WebSocket connections open now.",
                                value=ws.connections)
        yield GaugeMetricFamily("leeloo_websocket_client_addresses",
                                "Client addresses with a WebSocket open now.", value=ws.client_addresses)
        yield GaugeMetricFamily("leeloo_devices", "Devices connected now.", value=stats.devices)
        yield GaugeMetricFamily("leeloo_crews", "Crews the relay knows.", value=stats.crews)
        yield GaugeMetricFamily("leeloo_crews_online", "Crews with a member connected now.",
                                value=stats.crews_online)
        yield GaugeMetricFamily("leeloo_pending_spotify_tokens",
                                "Spotify tokens kept for devices that were offline.", value=stats.pending_tokens)
        yield GaugeMetricFamily("leeloo_uptime_seconds", "Seconds since the relay started.", value=stats.uptime)
        yield from self._core(stats)
        yield CounterMetricFamily("leeloo_websocket_messages_received",
                                  "WebSocket messages received from devices.", value=ws.messages_received)
        yield CounterMetricFamily("leeloo_websocket_messages_sent",
                                  "WebSocket messages sent to devices (one per device reached).",
                                  value=ws.messages_sent)
        refused = CounterMetricFamily(
            "leeloo_websocket_refused", "WebSocket handshakes refused, by reason.", labels=["reason"])
        for reason in (REFUSED_ORIGIN, TOO_MANY_FROM_ADDRESS, TOO_MANY_CONNECTIONS):
            refused.add_metric([reason], ws.refused.get(reason, 0))
        yield refused
        yield _by_code("leeloo_websocket_errors_sent",
                       "Error messages sent to devices, by code (rate_limited...).", ws.errors_sent)
        yield _by_code("leeloo_websocket_closed_by_relay",
                       "WebSockets the relay closed, by close code.", ws.closed_by_relay)
        yield CounterMetricFamily("leeloo_slow_readers_disconnected",
                                  "Connections cut off for falling too far behind reading.", value=ws.slow_readers)
        yield from self._http()
        yield from self._tls()

    @staticmethod
    def _core(stats: Any) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "leeloo_messages_received",
            "Crew messages received from devices and the bot, by kind: the msg_type devices send "
            "(share_music counts as song_push, reaction frames as reaction), or other.",
            labels=["kind"])
        for kind in MESSAGE_KINDS:
            received.add_metric([kind], stats.messages_received.get(kind, 0))
        yield received
        yield CounterMetricFamily("leeloo_deliveries",
                                  "Crew messages fanned out live, one per device each went to.",
                                  value=stats.deliveries)
        yield _histogram("leeloo_fanout_seconds",
                         "Seconds from a crew message's receipt to its last member's write (the store "
                         f"commit included), for one message in {FANOUT_SAMPLE_EVERY}.", stats.fanout_seconds)
        yield CounterMetricFamily("leeloo_replayed_messages",
                                  "Messages sent from crews' logs to devices coming back.", value=stats.replayed)
        yield _histogram("leeloo_store_batch_seconds", "Seconds each store batch (group commit) took.",
                         stats.store.batch_seconds)
        yield GaugeMetricFamily("leeloo_store_queue_depth",
                                "Store operations waiting: queued, or in the batch being committed.",
                                value=stats.store.queue_depth)
        yield GaugeMetricFamily("leeloo_store_queue_bytes",
                                "Bytes of messages waiting for the store (senders pause past "
                                "--store-queue-bytes).", value=stats.store.queue_bytes)

    def _http(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily("leeloo_http_connections_waiting",
                                    "HTTP connections that have not finished a request yet.", labels=["site"])
        timeouts = CounterMetricFamily("leeloo_http_request_timeouts",
                                       "HTTP connections aborted for not finishing a request in time.",
                                       labels=["site"])
        too_large = CounterMetricFamily("leeloo_http_bodies_refused",
                                        "HTTP requests refused with 413 for a body over the limit.",
                                        labels=["site"])
        responses = CounterMetricFamily("leeloo_http_responses", "HTTP responses, by status.",
                                        labels=["site", "code"])
        gate_refused = CounterMetricFamily(
            "leeloo_connections_refused",
            "TCP connections refused before a byte was read, by reason (per_address, connect_rate).",
            labels=["reason"])
        sites = [site.stats() for site in self.sites]
        # The public and redirect sites share one gate: count it once.
        gates = {id(site.gate): figures.gate_refused for site, figures in zip(self.sites, sites)
                 if figures.gate_refused is not None}
        for reason in (TOO_MANY_FROM_ADDRESS, CONNECTING_TOO_FAST):
            gate_refused.add_metric([reason], sum(refused.get(reason, 0) for refused in gates.values()))
        yield gate_refused
        for figures in sites:
            pending.add_metric([figures.name], figures.waiting)
            timeouts.add_metric([figures.name], figures.timeouts)
            too_large.add_metric([figures.name], figures.bodies_refused)
            for code, count in sorted(figures.responses.items()):
                responses.add_metric([figures.name, str(code)], count)
        yield pending
        yield timeouts
        yield too_large
        yield responses

    def _tls(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "leeloo_certificate_expiry_timestamp_seconds",
            "When the TLS certificate served for each domain expires (its notAfter), in seconds since "
            "the epoch; a domain still waiting for its first certificate has none.", labels=["domain"])
        seen: dict[str, float] = {}
        for store in self.certificates:
            seen.update(store.expiry())
        for domain, when in sorted(seen.items()):
            expiry.add_metric([domain], when)
        yield expiry


class Metrics:
    """
    One relay's metrics registry: its own figures and the process's (memory,
    CPU, file descriptors).  L{leeloo.web.make_site} adds each site, and
    the service wiring the certificate stores.
    """

    def __init__(self, relay: Relay, ws_factory: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.collector = RelayCollector(relay, ws_factory)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)

    def add_site(self, site: Any) -> None:
        self.collector.sites.append(site)

    def add_certificates(self, stores: Iterable[Any]) -> None:
        """
        Report the expiry of the certificates C{stores} serve
        (L{leeloo.tls.CertificateStore}s).
        """
        self.collector.certificates.extend(stores)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
