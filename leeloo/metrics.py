"""
The relay's figures in Prometheus' text format, for ``GET /metrics``.

Nothing is updated per message here: the WebSocket factory and the sites
keep plain integer counters, and the collector reads them (and the relay's
sizes) only when Prometheus scrapes.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from leeloo.access import CONNECTING_TOO_FAST, TOO_MANY_CONNECTIONS, TOO_MANY_FROM_ADDRESS
from leeloo.relay import Relay
from leeloo.websocket import REFUSED_ORIGIN

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _by_code(name: str, documentation: str, counts: Any) -> CounterMetricFamily:
    """
    A counter labelled by code, from a Counter of counts.
    """
    family = CounterMetricFamily(name, documentation, labels=["code"])
    for code, count in sorted(counts.items()):
        family.add_metric([str(code)], count)
    return family


class RelayCollector:
    """
    Reads the relay's gauges and counters at scrape time.
    """

    def __init__(self, relay: Relay, ws_factory: Any) -> None:
        self.relay = relay
        self.ws_factory = ws_factory
        self.sites: list[Any] = []

    def collect(self) -> Iterator[Metric]:
        relay, factory = self.relay, self.ws_factory
        yield GaugeMetricFamily("leeloo_websocket_connections", "WebSocket connections open now.",
                                value=factory.caps.total)
        yield GaugeMetricFamily("leeloo_websocket_client_addresses",
                                "Client addresses with a WebSocket open now.",
                                value=len(factory.caps.by_address))
        yield GaugeMetricFamily("leeloo_devices", "Devices connected now.", value=len(relay.devices))
        yield GaugeMetricFamily("leeloo_crews", "Crews the relay knows.", value=len(relay.crews))
        yield GaugeMetricFamily("leeloo_crews_online", "Crews with a member connected now.",
                                value=relay.crews_online)
        yield GaugeMetricFamily("leeloo_pending_spotify_tokens",
                                "Spotify tokens kept for devices that were offline.",
                                value=len(relay.pending_tokens))
        yield GaugeMetricFamily("leeloo_uptime_seconds", "Seconds since the relay started.",
                                value=relay.clock.seconds() - relay.started)
        yield CounterMetricFamily("leeloo_websocket_messages_received",
                                  "WebSocket messages received from devices.",
                                  value=factory.messages_received)
        yield CounterMetricFamily("leeloo_websocket_messages_sent",
                                  "WebSocket messages sent to devices (one per device reached).",
                                  value=factory.messages_sent)
        refused = CounterMetricFamily(
            "leeloo_websocket_refused", "WebSocket handshakes refused, by reason.", labels=["reason"])
        for reason in (REFUSED_ORIGIN, TOO_MANY_FROM_ADDRESS, TOO_MANY_CONNECTIONS):
            refused.add_metric([reason], factory.refused[reason])
        yield refused
        yield _by_code("leeloo_websocket_errors_sent",
                       "Error messages sent to devices, by code (rate_limited...).", factory.errors_sent)
        yield _by_code("leeloo_websocket_closed_by_relay",
                       "WebSockets the relay closed, by close code.", factory.closed_by_relay)
        yield CounterMetricFamily("leeloo_slow_readers_disconnected",
                                  "Connections cut off for falling too far behind reading.",
                                  value=factory.slow_readers)
        pending = GaugeMetricFamily("leeloo_http_connections_waiting",
                                    "HTTP connections that have not finished a request yet.",
                                    labels=["site"])
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
        gates = {id(site.gate): site.gate for site in self.sites if getattr(site, "gate", None) is not None}
        for reason in (TOO_MANY_FROM_ADDRESS, CONNECTING_TOO_FAST):
            gate_refused.add_metric([reason], sum(gate.refused[reason] for gate in gates.values()))
        yield gate_refused
        for site in self.sites:
            pending.add_metric([site.name], len(site.deadlines))
            timeouts.add_metric([site.name], site.deadlines.expired)
            too_large.add_metric([site.name], site.bodies_refused)
            for code, count in sorted(site.responses.items()):
                responses.add_metric([site.name, str(code)], count)
        yield pending
        yield timeouts
        yield too_large
        yield responses


class Metrics:
    """
    One relay's metrics registry: its own figures and the process's (memory,
    CPU, file descriptors).  L{leeloo.web.make_site} adds each site.
    """

    def __init__(self, relay: Relay, ws_factory: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.collector = RelayCollector(relay, ws_factory)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)

    def add_site(self, site: Any) -> None:
        self.collector.sites.append(site)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
