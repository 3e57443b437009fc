"""Metric families of the relay link that are not plain counters (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric


def link_families(prefix: str, outputs: Mapping[str, Any]) -> Iterator[Metric]:
    links = {n: o for n, o in sorted(outputs.items()) if hasattr(o, "latency")}
    if not links:
        return
    latency = HistogramMetricFamily(
        prefix + "link_ack_latency_seconds",
        "Relay link: from a batch written to the connection to its acknowledgement "
        "(after fsync at the peer).",
        labels=["output"],
    )
    in_flight = GaugeMetricFamily(
        prefix + "link_batches_in_flight",
        "Relay link: batches sent and not yet acknowledged.",
        labels=["output"],
    )
    for name, out in links.items():
        stats = out.latency
        latency.add_metric([name], stats.cumulative(), stats.sum)
        in_flight.add_metric([name], out.batches_in_flight)
    yield latency
    yield in_flight
