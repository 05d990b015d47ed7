"""enigma plugin ``prometheus``: the /metrics route and the observers that feed it."""

from __future__ import annotations

from enigma import hookimpl


@hookimpl
def enigma_register_transports(register):
    register("prometheus", "enigma_prometheus.metrics:MetricsTransport",
             summary="/metrics: request, token, latency and KV-cache metrics in Prometheus' format")


@hookimpl
def enigma_plugin_settings():
    from enigma_prometheus.settings import PrometheusSettings

    return PrometheusSettings


@hookimpl
def enigma_request_finished(event):
    from enigma_prometheus.metrics import metrics

    metrics().observe_finished(event)
