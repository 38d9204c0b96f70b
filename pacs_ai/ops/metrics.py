"""Prometheus metrics: the counters, histograms and gauges, and the helpers that set them.

All metrics live on a dedicated `REGISTRY` (not prometheus-client's global one), so importing this
module twice in a process, or starting several services in one test process, never collides on
metric names. The listener, workers and senders increment the objects below;
`pacs_ai.ops.http_server` serves them on `/metrics` (Prometheus text format).

Across replicas (several `pacs-ai serve` behind a load balancer), every series is one replica's
whole: its main process does all the counting (helper processes decode and render, and count
nothing), so counters and histogram buckets add up with `sum`, and each gauge's help says how to
combine it. prometheus-client's `*_created` series (a per-process start time, which adds up to
nothing) are not exported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from pacs_ai.finding import Finding
from pacs_ai.queue import job_records
from pacs_ai.queue.job_records import Stage

if TYPE_CHECKING:
    from pacs_ai.config import DriftConfig
    from pacs_ai.model.model import ModelInfo

REGISTRY = CollectorRegistry(auto_describe=True)
disable_created_metrics()

RECEIVED = Counter(
    "pacs_ai_received", "Instances received by C-STORE and acknowledged (durably spooled).",
    registry=REGISTRY)
SKIPPED = Counter(
    "pacs_ai_skipped", "Instances not classified because a filter excluded them, by reason code.",
    ["reason"], registry=REGISTRY)
CLASSIFIED = Counter(
    "pacs_ai_classified", "Instances classified by the model, by finding.",
    ["finding"], registry=REGISTRY)
CLASSIFIED_WITHOUT_AGE = Counter(
    "pacs_ai_classified_without_age", "Instances classified whose header gave no usable patient "
    "age, so the age check could not apply (a subset of pacs_ai_classified_total; [model] "
    'unknown_age = "skip" skips them instead).', registry=REGISTRY)
REPORTED = Counter(
    "pacs_ai_reported", "Structured reports delivered, by destination.",
    ["destination"], registry=REGISTRY)
FAILED = Counter(
    "pacs_ai_failed", f"Jobs that failed, by pipeline stage ({', '.join(Stage)}).",
    ["stage"], registry=REGISTRY)
for _stage in Stage:  # at 0 from the start, so increase() counts the first failure
    FAILED.labels(stage=_stage)
REJECTED = Counter(
    "pacs_ai_rejected", "Associations or C-STOREs refused, by reason.",
    ["reason"], registry=REGISTRY)
AUDIT_RECORDS_LOST = Counter(
    "pacs_ai_audit_records_lost", "Audit records that could not be written to the audit log "
    "(disk full, file unwritable, writer stalled); the first loss is logged (audit_write_failed).",
    registry=REGISTRY)
# What the drift alerts watch (deploy/prometheus/): each model's results, by its role. "live"
# is the model whose reports go out; "shadow" a candidate run beside it whose results are only
# recorded ([shadow]). Count them with count_assessment, never by hand, so both roles agree.
ROLE_LIVE = "live"
ROLE_SHADOW = "shadow"
RESULT_ABSTAINED = "abstained"  # the model's out-of-distribution score above its threshold
MODEL_RESULT_VALUES = (*Finding, RESULT_ABSTAINED)  # its findings (model.finding), or none
MODEL_RESULTS = Counter(
    "pacs_ai_model_results", "Films a model assessed, by model name, version, role (live: its "
    "reports go out; shadow: recorded only) and result: its finding (pneumonia, normal) or "
    "abstained (out-of-distribution score above the threshold: no finding).",
    ["name", "version", "role", "result"], registry=REGISTRY)
# Bounds for both kinds of score a model file may give: a gate's probability in (0, 1) (1.3.0's
# threshold is 0.0107 and its children's films score near 0, so fine steps at the bottom show
# a drift towards the threshold; and up to 1), and the older Mahalanobis distance per feature,
# ~0.9 on training-like films with a threshold near 2 (the buckets from 0.5 up that this
# histogram always had, so queries on them keep working). By model: the scales do not mix.
OOD_SCORE_BUCKETS = (0.0001, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                     0.7, 0.8, 0.9, 0.95, 0.99, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0, 10.0, 20.0, 50.0)
OOD_SCORE = Histogram(
    "pacs_ai_ood_score", "Out-of-distribution (gate) score of each film a model assessed, by "
    "model name, version and role (models with an abstention threshold only; above the "
    "threshold the model abstains).",
    ["name", "version", "role"], buckets=OOD_SCORE_BUCKETS, registry=REGISTRY)
# What arrives, to see the population change (pacs_ai.receive.arrivals keeps each label's values to a
# bounded set: no free text, nothing about the patient).
ARRIVALS = Counter(
    "pacs_ai_arrivals", "Films newly received and acknowledged (a re-sent copy is not counted), "
    "by manufacturer (a known vendor, 'other' or 'none'), modality, photometric interpretation, "
    "transfer syntax and pixel spacing band in mm.",
    ["manufacturer", "modality", "photometric_interpretation", "transfer_syntax",
     "pixel_spacing_mm"], registry=REGISTRY)
# Inference on CPU takes tens of milliseconds to seconds; delivery waits on retries, so minutes.
CLASSIFY_SECONDS = Histogram(
    "pacs_ai_classify_seconds", "Time to decode, preprocess and classify one instance.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY)
SHADOW_SECONDS = Histogram(
    "pacs_ai_shadow_seconds", "Time the [shadow] model took per film it assessed (in its own "
    "thread, after the live model's reports were written).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=REGISTRY)
SHADOW_NOT_ASSESSED = Counter(
    "pacs_ai_shadow_not_assessed", "Films the live model assessed that the [shadow] model did "
    "not, by reason (busy: its queue was full; model-failed; stopped: the service stopped "
    "first; outside-intended-age: the patient's age is outside the shadow model's own range; "
    "not-recorded: its results could not be written).", ["reason"], registry=REGISTRY)
RECEIVE_TO_DELIVERY_SECONDS = Histogram(
    "pacs_ai_receive_to_delivery_seconds",
    "Time from acknowledging an instance to delivering its report to a destination.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0),
    registry=REGISTRY)
BACKLOG = Gauge(
    "pacs_ai_backlog_jobs", "Jobs received but not yet finished (queued or being retried); "
    "across replicas: sum.", registry=REGISTRY)

# Set at each scrape (Service.refresh_gauges), from the spool and the job queue.
READY = Gauge(
    "pacs_ai_ready", "1 when the service can take films (what /readyz answers 200 for), else 0; "
    "across replicas: sum, the replicas taking films.", registry=REGISTRY)
SPOOL_FREE_BYTES = Gauge(
    "pacs_ai_spool_free_bytes", "Free bytes on the spool's file system; below [storage] "
    "min_free_bytes new images are refused; across replicas: min (replicas may share a disk).",
    registry=REGISTRY)
OLDEST_PENDING_DELIVERY_SECONDS = Gauge(
    "pacs_ai_oldest_pending_delivery_seconds", "Age of the oldest report waiting for delivery "
    "to a destination, since its image was received (0: none waiting); across replicas: max.",
    ["destination"], registry=REGISTRY)
LAST_DELIVERY_TIMESTAMP = Gauge(
    "pacs_ai_last_delivery_timestamp_seconds", "When a destination last stored a report (Unix "
    "time; 0: never); across replicas: max.", ["destination"], registry=REGISTRY)
DESTINATION_FAILING_SECONDS = Gauge(
    "pacs_ai_destination_failing_seconds", "How long a destination has stored nothing while "
    "deliveries to it fail (0: not failing); across replicas: min, failing for all of them, "
    "or max, for one.", ["destination"], registry=REGISTRY)
DESTINATION_ECHO_OK = Gauge(
    "pacs_ai_destination_echo_ok", "1 when the latest C-ECHO to a destination succeeded, 0 "
    "when it failed (destinations with echo_interval_seconds only); across replicas: min.",
    ["destination"], registry=REGISTRY)
DESTINATION_ECHO_TIMESTAMP = Gauge(
    "pacs_ai_destination_echo_timestamp_seconds", "When the latest C-ECHO to a destination ran "
    "(Unix time); across replicas: max.", ["destination"], registry=REGISTRY)
MODEL_INFO = Gauge(
    "pacs_ai_model_info", "The models in use: always 1, their name, version and role (live, "
    "shadow) as labels; across replicas: sum by (name, version, role), the replicas running "
    "each.", ["name", "version", "role"], registry=REGISTRY)
MODEL_THRESHOLD = Gauge(
    "pacs_ai_model_threshold", "The thresholds a model works with (the site's where [model] "
    "sets them): kind=finding, pneumonia at or above it; kind=abstention, the out-of-"
    "distribution score above which it abstains; across replicas: max.",
    ["name", "version", "role", "kind"], registry=REGISTRY)
# The band the site expects ([drift]), so the alert rules need no copy of it.
DRIFT_EXPECTED_POSITIVE_RATE = Gauge(
    "pacs_ai_drift_expected_positive_rate", "[drift] expected_positive_rate: the share of "
    "classified films found pneumonia that the site expects, bound=low and bound=high; across "
    "replicas: max (the same config).", ["bound"], registry=REGISTRY)
DRIFT_MAX_ABSTENTION_RATE = Gauge(
    "pacs_ai_drift_max_abstention_rate", "[drift] max_abstention_rate: the largest share of "
    "assessed films a model should abstain on; across replicas: max.", registry=REGISTRY)
DRIFT_MIN_FILMS = Gauge(
    "pacs_ai_drift_min_films", "[drift] min_films: fewer films assessed in a window are too few "
    "to judge a rate by; across replicas: max.", registry=REGISTRY)
WORKERS = Gauge(
    "pacs_ai_workers", "Classification worker threads (kind=threads) and their helper processes "
    "for decoding and reports (kind=helper_processes) this replica runs; across replicas: sum.",
    ["kind"], registry=REGISTRY)

def count_assessment(info: ModelInfo, role: str, result: str,
                     ood_score: float | None = None) -> None:
    """One film a model assessed: its result (its finding, or RESULT_ABSTAINED) and its
    out-of-distribution score where it has one."""
    labels = {"name": info.name, "version": info.version, "role": role}
    MODEL_RESULTS.labels(result=result, **labels).inc()
    if ood_score is not None:
        OOD_SCORE.labels(**labels).observe(ood_score)


def set_models(models: Iterable[tuple[ModelInfo, str]]) -> None:
    """pacs_ai_model_info and pacs_ai_model_threshold for the models in use, (info, role) each
    (models no longer in use disappear), and their pacs_ai_model_results_total at 0."""
    MODEL_INFO.clear()
    MODEL_THRESHOLD.clear()
    for info, role in models:
        labels = {"name": info.name, "version": info.version, "role": role}
        for result in MODEL_RESULT_VALUES:  # at 0: increase() counts
            MODEL_RESULTS.labels(result=result, **labels)  # the first film of each
        MODEL_INFO.labels(**labels).set(1)
        MODEL_THRESHOLD.labels(kind="finding", **labels).set(info.threshold)
        if info.ood_threshold is not None:
            MODEL_THRESHOLD.labels(kind="abstention", **labels).set(info.ood_threshold)


def set_drift_band(drift: DriftConfig) -> None:
    low, high = drift.expected_positive_rate
    DRIFT_EXPECTED_POSITIVE_RATE.labels(bound="low").set(low)
    DRIFT_EXPECTED_POSITIVE_RATE.labels(bound="high").set(high)
    DRIFT_MAX_ABSTENTION_RATE.set(drift.max_abstention_rate)
    DRIFT_MIN_FILMS.set(drift.min_films)


def reason_code(reason: str) -> str:
    """The label value for a skip/reject reason: the code before the colon ('modality: MR' -> 'modality').

    Keeps label cardinality bounded: the free text after the colon varies per instance.
    """
    return job_records.reason_code(reason) or "unknown"
