"""The job queue's vocabulary and the records it reads back: job states and stages, delivery
states and objects, `Job`, `Delivery` and the like, and what a failure's reason says about it
(`reason_code`, `retry_can_fix`). The store is pacs_ai.queue.jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pacs_ai.finding import Finding


# The job vocabulary. The values are what the queue stores and what `pacs-ai status`, the queue
# page and the metrics show: a StrEnum member equals its string, so rows read back as plain
# strings compare equal to these.
class JobState(StrEnum):
    PENDING = "pending"
    CLASSIFYING = "classifying"
    DELIVERING = "delivering"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class Stage(StrEnum):
    """Where a failed job failed (jobs.stage, the `stage` label of pacs_ai_failed_total)."""

    CLASSIFY = "classify"  # the pixels could not be decoded or the model failed
    REPORT = "report"  # the SR could not be built
    DELIVER = "deliver"  # a delivery was given up


class DeliveryState(StrEnum):
    PENDING = "pending"  # never tried yet, or retrying
    DONE = "done"
    FAILED = "failed"  # given up


class DeliveryObject(StrEnum):
    """What a delivery sends (deliveries.object)."""

    REPORT = "report"  # the SR
    HEATMAP = "heatmap"  # its heat-map image (pacs_ai.report.heatmap_image)


@dataclass(frozen=True)
class Job:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    calling_ae_title: str | None
    image_file: str
    state: JobState
    stage: Stage | None
    reason: str | None
    probability: float | None
    finding: Finding | None
    report_uid: str | None
    report_file: str | None
    classify_ms: float | None
    received_at: float
    updated_at: float
    peer_address: str | None = None
    modality: str | None = None
    station_name: str | None = None
    accession_number: str | None = None
    route: str | None = None
    model: str | None = None
    age_known: bool | None = None
    dismissed_at: float | None = None

    def __post_init__(self) -> None:
        # read back from SQLite as plain strings and 1 or 0: the vocabulary's own types
        object.__setattr__(self, "state", JobState(self.state))
        if self.stage is not None:
            object.__setattr__(self, "stage", Stage(self.stage))
        if self.finding is not None:
            object.__setattr__(self, "finding", Finding(self.finding))
        if self.age_known is not None:
            object.__setattr__(self, "age_known", bool(self.age_known))


@dataclass(frozen=True)
class Delivery:
    job_id: int
    destination: str
    attempts: int
    first_attempt_at: float | None
    report_file: str
    report_uid: str
    sop_instance_uid: str
    received_at: float
    # "report": report_file and report_uid are the SR's; "heatmap": the heat-map image's
    object: str = DeliveryObject.REPORT


@dataclass(frozen=True)
class DestinationDeliveries:
    """How deliveries to one destination are going (pacs_ai.ops.health turns it into a report)."""

    destination: str
    last_success_at: float | None  # the latest report it stored
    pending: int  # deliveries waiting (never tried yet, or retrying)
    oldest_pending_received_at: float | None  # when the image of the oldest of them arrived
    # The first failed attempt of the deliveries still open or given up on that failed after the
    # last success: the destination has stored nothing since (None: not failing).
    failing_since: float | None
    last_error: str | None  # of the most recently failed delivery among those


@dataclass(frozen=True)
class NewInstance:
    """What the C-STORE handler knows about a received instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str | None
    calling_ae_title: str | None
    # what [[routes]] match on, besides the calling AE title (and the accession number)
    peer_address: str | None = None
    modality: str | None = None
    station_name: str | None = None
    accession_number: str | None = None


JOB_COLUMNS = ", ".join(Job.__dataclass_fields__)


def accepts_resend(job: Job) -> bool:
    """A job a re-sent copy of its image should run again: it failed before a report existed,
    or it failed and its files were purged since ([storage] keep_failed_days)."""
    return job.state == JobState.FAILED and (job.stage in (Stage.CLASSIFY, Stage.REPORT)
                                             or is_purged(job))


def is_purged(job: Job) -> bool:
    """Its files were deleted after [storage] keep_failed_days (JobStore.purge_files)."""
    return job.image_file == "" and job.report_file is None


# Codes of classify failures that come from the image itself: `pacs-ai retry` would run the same
# bytes through the same code and fail the same way. A corrected image sent again runs the job
# again; otherwise an admin dismisses the failure (`pacs-ai dismiss`).
IMAGE_FAILURE_CODES = frozenset({
    "no-pixel-data", "bad-pixel-header", "too-large", "multi-frame", "colour", "not-monochrome",
    "unsupported-bit-depth", "unsupported-transfer-syntax", "truncated-pixel-data",
    "decode-failed", "decode-crashed"})


# The reason code of a film the model abstained on (model.abstain_reason's "code: detail").
ABSTAINED_REASON_CODE = "out-of-distribution"


def reason_code(reason: str | None) -> str:
    """The code of a "code: detail" reason ("" for none)."""
    return (reason or "").split(":", 1)[0].strip()


def retry_can_fix(stage: str | None, code: str) -> bool:
    """Whether `pacs-ai retry`, once the cause is fixed, can turn a failure (its stage and the
    code of its "code: detail" reason) into a report: a delivery (the PACS), the report, an
    internal or model error; not a failure that is in the image (IMAGE_FAILURE_CODES)."""
    return not (stage == Stage.CLASSIFY and code in IMAGE_FAILURE_CODES)


@dataclass(frozen=True)
class PurgedJob:
    sop_instance_uid: str
    state: str
    files: tuple[str, ...]  # spool-relative, to delete
