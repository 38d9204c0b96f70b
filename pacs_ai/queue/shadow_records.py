"""The shadow model's rows (shadow_results, pacs_ai.classify.shadow): both models' assessment
of one film's model input, and their conversion to and from the table's columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pacs_ai.finding import Finding


class ShadowStatus(StrEnum):
    """shadow_results.status: whether the shadow assessed the film, or why not."""

    ASSESSED = "assessed"
    BUSY = "busy"  # its queue was full: the shadow is slower than the films arrive
    MODEL_FAILED = "model-failed"
    STOPPED = "stopped"  # the service stopped before the shadow got to it
    # the patient's age is outside the shadow model's own intended range: promoted, it would
    # skip the film, so it gives no assessment (the reason names the age and the range)
    OUTSIDE_INTENDED_AGE = "outside-intended-age"


@dataclass(frozen=True)
class Assessment:
    """One model's assessment of one film's model input."""

    probability: float | None
    ood_score: float | None
    abstained: bool | None
    finding: Finding | None  # None when it abstained (or did not assess)

    def __post_init__(self) -> None:
        if self.finding is not None:  # a plain string when read back
            object.__setattr__(self, "finding", Finding(self.finding))


@dataclass(frozen=True)
class ShadowResult:
    """A row of shadow_results, with the film's job facts compare needs."""

    job_id: int
    model_name: str
    model_version: str
    model_sha256: str
    threshold: float
    status: ShadowStatus
    shadow: Assessment
    live_model_name: str
    live_model_version: str
    live_model_sha256: str
    live_threshold: float
    live: Assessment
    reason: str | None
    assessed_at: float
    sop_instance_uid: str | None = None  # from the job, when read back
    accession_number: str | None = None
    received_at: float | None = None


SHADOW_COLUMNS = ("job_id, model_name, model_version, model_sha256, threshold, status, "
                   "probability, ood_score, abstained, finding, live_model_name, "
                   "live_model_version, live_model_sha256, live_threshold, live_probability, "
                   "live_ood_score, live_abstained, live_finding, reason, assessed_at")


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(bool(value))


def shadow_row(result: ShadowResult) -> tuple:
    s, live = result.shadow, result.live
    return (result.job_id, result.model_name, result.model_version, result.model_sha256,
            result.threshold, str(result.status), s.probability, s.ood_score, _flag(s.abstained),
            s.finding, result.live_model_name, result.live_model_version,
            result.live_model_sha256, result.live_threshold, live.probability, live.ood_score,
            _flag(live.abstained), live.finding, result.reason, result.assessed_at)


def shadow_result_from_row(row: tuple) -> ShadowResult:
    (job_id, name, version, sha256, threshold, status, probability, ood, abstained, finding,
     live_name, live_version, live_sha256, live_threshold, live_probability, live_ood,
     live_abstained, live_finding, reason, assessed_at, uid, accession, received_at) = row

    def flag(value: int | None) -> bool | None:
        return None if value is None else bool(value)
    return ShadowResult(
        job_id, name, version, sha256, threshold, ShadowStatus(status),
        Assessment(probability, ood, flag(abstained), finding), live_name, live_version,
        live_sha256, live_threshold,
        Assessment(live_probability, live_ood, flag(live_abstained), live_finding), reason,
        assessed_at, uid, accession, received_at)
