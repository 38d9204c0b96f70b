"""Each model's daily positive and abstention rates, from the job store, against the band the
site expects ([drift]): the queue page's chart (pacs_ai.ops.drift_chart) and /api/queue's `drift`.

A day is a UTC day (the queue page's times are UTC), the day the film was received. Of the
films a model assessed that day, `classified` got a finding, `positive` of them pneumonia, and
`abstained` are those it declined (out-of-distribution). The rates are those the Prometheus
rules compute (deploy/prometheus/): positive rate = positive / classified, abstention rate =
abstained / (classified + abstained). A day with fewer than [drift] min_films films assessed is
shown but not judged: a rate over a handful of films says little.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from pacs_ai.config import DriftConfig
from pacs_ai.queue.jobs import JobStore

SECONDS_PER_DAY = 86400
EPOCH = datetime.date(1970, 1, 1)
NOT_RECORDED = "model not recorded"  # abstentions from before pacs-ai kept the model


@dataclass(frozen=True)
class Day:
    day: datetime.date
    classified: int  # films that got a finding
    positive: int  # of those, found pneumonia
    abstained: int  # films the model declined (out-of-distribution)

    @property
    def assessed(self) -> int:
        return self.classified + self.abstained

    @property
    def positive_rate(self) -> float | None:
        return self.positive / self.classified if self.classified else None

    @property
    def abstention_rate(self) -> float | None:
        return self.abstained / self.assessed if self.assessed else None


@dataclass(frozen=True)
class ModelDays:
    model: str  # name and version, or NOT_RECORDED
    role: str  # "live"; "shadow" for a candidate
    days: tuple[Day, ...]  # only days with films, in order


@dataclass(frozen=True)
class Judgement:
    judged: bool  # enough films to judge the day by
    out_of_band: tuple[str, ...]  # positive-rate-low/-high, abstention-rate-high


def window(drift: DriftConfig, now: float) -> tuple[datetime.date, datetime.date]:
    """The first and last UTC day the chart covers: [drift] days, today included."""
    today = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).date()
    return today - datetime.timedelta(days=drift.days - 1), today


def model_days(store: JobStore, drift: DriftConfig, now: float) -> list[ModelDays]:
    """Each model's days in the window; the live model most recently seen first."""
    first, _last = window(drift, now)
    since = (first - EPOCH).days * SECONDS_PER_DAY
    per_model: dict[tuple[str, str], list[Day]] = {}
    for day, model, role, classified, positive, abstained in store.daily_results(since):
        per_model.setdefault((model or NOT_RECORDED, role), []).append(
            Day(EPOCH + datetime.timedelta(days=day), classified, positive, abstained))
    models = [ModelDays(model, role, tuple(days)) for (model, role), days in per_model.items()]
    return sorted(models, key=lambda m: (m.role != "live", m.model == NOT_RECORDED,
                                         -m.days[-1].day.toordinal(), m.model))


def judge(day: Day, drift: DriftConfig) -> Judgement:
    if day.assessed < drift.min_films:
        return Judgement(False, ())
    low, high = drift.expected_positive_rate
    out = []
    rate = day.positive_rate
    if rate is not None and rate < low:
        out.append("positive-rate-low")
    if rate is not None and rate > high:
        out.append("positive-rate-high")
    if day.abstention_rate is not None and day.abstention_rate > drift.max_abstention_rate:
        out.append("abstention-rate-high")
    return Judgement(True, tuple(out))


def _rate(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def as_json(models: list[ModelDays], drift: DriftConfig, now: float) -> dict[str, Any]:
    """/api/queue's `drift`: the band, the window, and per model its days with films."""
    first, last = window(drift, now)
    entries = []
    for model in models:
        days = []
        for day in model.days:
            judgement = judge(day, drift)
            days.append({"day": day.day.isoformat(), "assessed": day.assessed,
                         "classified": day.classified, "positive": day.positive,
                         "abstained": day.abstained, "positive_rate": _rate(day.positive_rate),
                         "abstention_rate": _rate(day.abstention_rate),
                         "judged": judgement.judged,
                         "out_of_band": list(judgement.out_of_band)})
        entries.append({"model": model.model, "role": model.role, "days": days,
                        "days_out_of_band": sum(bool(d["out_of_band"]) for d in days)})
    return {"expected_positive_rate": list(drift.expected_positive_rate),
            "max_abstention_rate": drift.max_abstention_rate, "min_films": drift.min_films,
            "from": first.isoformat(), "to": last.isoformat(), "models": entries}
