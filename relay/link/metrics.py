"""Metric families of the relay link that are not plain counters (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from relay.ops.snapshots import LedgerSnapshot, OutputSnapshot


def link_families(
    prefix: str, outputs: Mapping[str, OutputSnapshot], ledger: LedgerSnapshot | None = None
) -> Iterator[Metric]:
    """Link outputs' ack latency and batches in flight; the receiver's ledger (relay.link.
    service.LinkState, once a link+tls listener exists)."""
    if ledger is not None:
        yield GaugeMetricFamily(
            prefix + "link_ledger_senders",
            "Relay link: sending relays (and spool epochs) the ledger remembers.",
            value=ledger.senders,
        )
        yield CounterMetricFamily(
            prefix + "link_ledger_write_errors",
            "Relay link: ledger appends that failed (disk full, I/O error; retried, and "
            "the batches they were for are not acknowledged until they succeed).",
            value=ledger.write_errors,
        )
    links = {n: o.link for n, o in sorted(outputs.items()) if o.link is not None}
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
    for name, link in links.items():
        latency.add_metric([name], list(link.latency_buckets), link.latency_sum)
        in_flight.add_metric([name], link.batches_in_flight)
    yield latency
    yield in_flight
