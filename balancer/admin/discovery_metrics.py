"""Metrics of discovery: each pool's registries, fresh or stale, and what they answered."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from balancer.admin import surface


def discovery_families(discoveries: Mapping[str, surface.Discovery]) -> Iterator[Metric]:
    """The families of every pool's registries, read from their status at scrape time."""
    labels = ["pool", "source"]
    stale = GaugeMetricFamily(
        "balancer_discovery_stale",
        "1 while the pool's registry cannot be reached (its last backends keep serving).",
        labels=labels,
    )
    since = GaugeMetricFamily(
        "balancer_discovery_state_since_seconds",
        "Unix time the registry's state (fresh or stale) began.",
        labels=labels,
    )
    records = GaugeMetricFamily(
        "balancer_discovery_backends",
        "Backends in the registry's latest answer (malformed entries not counted).",
        labels=labels,
    )
    skipped = GaugeMetricFamily(
        "balancer_discovery_skipped",
        "Malformed entries in the registry's latest answer, left out.",
        labels=labels,
    )
    updates = CounterMetricFamily(
        "balancer_discovery_updates", "Answers received from the registry.", labels=labels
    )
    failures = CounterMetricFamily(
        "balancer_discovery_failures",
        "Times the registry could not be reached.",
        labels=labels,
    )
    held = GaugeMetricFamily(
        "balancer_discovery_held",
        "Registered backends held back by flap damping.",
        labels=["pool"],
    )
    for pool, running in sorted(discoveries.items()):
        st = running.status()
        held.add_metric([pool], len(st["held"]))
        for kind, src in sorted(st["sources"].items()):
            key = [pool, kind]
            stale.add_metric(key, 1 if src["state"] == "stale" else 0)
            since.add_metric(key, src["since"])
            records.add_metric(key, src["backends"])
            skipped.add_metric(key, src["skipped"])
            updates.add_metric(key, src["updates"])
            failures.add_metric(key, src["failures"])
    yield from (stale, since, records, skipped, updates, failures, held)
