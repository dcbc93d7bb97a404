"""Reading a scrape of tapsign's ``/metrics`` (Prometheus's own parser): every series is
labelled with its worker process (api/exposition.py), so values are summed over them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[str, float]:
    """Every sample name, summed over its workers and labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def metric(text: str, name: str, **labels: str) -> float:
    """The sample ``name`` with ``labels`` (any others summed over: the workers…)."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]
    if not values:
        raise KeyError(f"no sample {name} {labels or ''} in the scrape")
    return sum(values)
