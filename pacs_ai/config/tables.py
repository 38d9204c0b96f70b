"""The service tables of the config file, one frozen dataclass each ([listener], [limits],
[storage], [model], [shadow], [workers], [filters], [report], [tls], [retry], [log], [web],
[drift], [metrics], [status], [audit]): their keys, defaults and what a stage asks of them. Each
field's default is the key's default; config_file reads the tables into them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_ai.config.defaults import (AUTO, DEFAULT_AE_TITLE, DEFAULT_MAX_PIXELS,
                                     DEFAULT_METRICS_PORT, DEFAULT_PORT, UNKNOWN_AGE_CHOICES,
                                     UNKNOWN_AGE_CLASSIFY)
from pacs_ai.dicom_constants import DEFAULT_SR_KIND, FILM_SOP_CLASSES


@dataclass(frozen=True)
class BoundAETitle:
    """An allowed calling AE title bound to an IP address or network ([listener]
    allowed_calling_ae_titles entry { ae_title = "CR1", address = "10.1.2.0/24" })."""
    ae_title: str
    address: str


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # The calling AE titles that may associate; a BoundAETitle entry only from its address.
    # Empty refuses every caller unless accept_any_calling_ae says otherwise: an installed
    # service listens on every interface, so being open to any host must be a stated choice.
    allowed_calling_ae_titles: tuple[str | BoundAETitle, ...] = ()
    accept_any_calling_ae: bool = False  # True: any calling AE title (a warning at each start)
    check_called_ae_title: bool = True  # reject associations addressed to another AE title
    allowed_peer_addresses: tuple[str, ...] = ()  # IPs or CIDR networks; empty: any address
    # dotted UIDs; the config accepts SOP_CLASS_KEYWORDS' keywords too
    sop_classes: tuple[str, ...] = FILM_SOP_CLASSES

    @property
    def refuses_every_caller(self) -> bool:
        """No calling AE title is allowed and any-caller was not asked for: every association
        is rejected until the admin names the modalities (or sets accept_any_calling_ae)."""
        return not self.allowed_calling_ae_titles and not self.accept_any_calling_ae

    @property
    def calling_ae_titles(self) -> tuple[str, ...]:
        """Every allowed calling AE title, bound or not, once each."""
        return tuple(dict.fromkeys(entry if isinstance(entry, str) else entry.ae_title
                                   for entry in self.allowed_calling_ae_titles))

    @property
    def calling_ae_addresses(self) -> dict[str, tuple[str, ...]]:
        """Bound AE title -> the addresses or networks it may call from."""
        bound: dict[str, tuple[str, ...]] = {}
        for entry in self.allowed_calling_ae_titles:
            if isinstance(entry, BoundAETitle):
                bound[entry.ae_title] = bound.get(entry.ae_title, ()) + (entry.address,)
        return bound


@dataclass(frozen=True)
class LimitsConfig:
    max_associations: int = 10
    max_pdu_bytes: int = 1048576  # 0: no limit
    max_pixels: int = DEFAULT_MAX_PIXELS
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    shutdown_grace_seconds: float = 10.0
    # A connection that sends no A-ASSOCIATE-RQ within this many seconds (TLS handshake
    # included) is dropped: modalities send it at once, idle and half-open connections do not.
    association_request_timeout_seconds: float = 5.0
    # Open connections one peer address may hold (the global cap is 2 x max_associations);
    # parse_config's default is max_associations.
    max_connections_per_address: int = 10
    # Largest dataset received, in bytes, as sent and once inflated (a deflated one).
    max_dataset_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class StorageConfig:
    spool_dir: Path = Path("spool")
    min_free_bytes: int = 256 * 1024 * 1024
    keep_source_images: bool = False
    keep_reports: bool = False
    # Days failed and skipped jobs keep their image and report files; 0: for ever.
    keep_failed_days: float = 7.0


# A table's site thresholds (threshold, ood_threshold) bound to the model file they were chosen for
# (pacs_ai.model.site_threshold checks it): key names, as the config file and the lines
# `pacs-ai evaluate` proposes spell them
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
VERSION_KEY = "threshold_model_version"
SHA256_KEY = "threshold_model_sha256"
ANY_MODEL_KEY = "threshold_for_any_model"


@dataclass(frozen=True)
class SiteThreshold:
    """What a config table says about its thresholds (all None: the model file's own). The
    binding covers both: a threshold on a score belongs to one file's score, as the decision
    threshold does (a gate's probability is not a Mahalanobis distance)."""

    table: str  # "[model]" or "[shadow]", for messages
    value: float | None = None  # the decision threshold
    model_version: str | None = None  # the version they were chosen for (read by people)
    model_sha256: str | None = None  # the file they were chosen for (what is checked)
    for_any_model: bool = False  # the admin keeps them whatever the file
    ood_value: float | None = None  # the out-of-distribution (abstention) threshold


@dataclass(frozen=True)
class ModelConfig:
    path: Path | None = None  # None: the shipped model (default_model_path)
    # The site's settings over the model file's own; None: the file's (pacs_ai.model.intended_use).
    threshold: float | None = None
    # The model file the threshold and ood_threshold were chosen for
    # (pacs_ai.model.site_threshold): start-up refuses them for another file unless
    # threshold_for_any_model
    threshold_model_version: str | None = None
    threshold_model_sha256: str | None = None
    threshold_for_any_model: bool = False
    min_age_years: float | None = None
    max_age_years: float | None = None
    ood_threshold: float | None = None  # abstain above this out-of-distribution score (bound)
    # A film whose header gives no usable age: "classify" (the out-of-distribution gate alone
    # decides) or "skip" (pacs_ai.film.filters). Not the model file's: a site choice, default classify.
    unknown_age: str = UNKNOWN_AGE_CLASSIFY

    @property
    def site_threshold(self) -> SiteThreshold:
        return SiteThreshold("[model]", self.threshold, self.threshold_model_version,
                             self.threshold_model_sha256, self.threshold_for_any_model,
                             self.ood_threshold)


@dataclass(frozen=True)
class ShadowConfig:
    """[shadow]: a candidate model run on every film the live model assesses, its results
    kept in the job store only (pacs_ai.classify.shadow); never reported."""

    model: Path | None = None  # None: no shadow
    # over the shadow file's own values, bound to it as [model]'s are (pacs_ai.model.site_threshold)
    threshold: float | None = None
    threshold_model_version: str | None = None
    threshold_model_sha256: str | None = None
    threshold_for_any_model: bool = False
    ood_threshold: float | None = None

    @property
    def site_threshold(self) -> SiteThreshold:
        return SiteThreshold("[shadow]", self.threshold, self.threshold_model_version,
                             self.threshold_model_sha256, self.threshold_for_any_model,
                             self.ood_threshold)


@dataclass(frozen=True)
class WorkersConfig:
    count: int | str = AUTO  # an int, or AUTO until the service has sized it
    processes: int | str = AUTO  # helpers per worker for decoding and SRs; 0: in the worker thread
    batch_size: int = 4  # peak memory of a model call: +25 MB at 4, +90 MB at 16; ms/image alike
    torch_threads: int = 0  # 0: the CPUs the helpers leave, one at least (pacs_ai.classify.capacity)


def _text_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"filter {name} must be a list of strings, not {value!r}")
    items = tuple(value)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"filter {name} must be a list of strings, not {value!r}")
    return tuple(item.strip().upper() for item in items)


@dataclass(frozen=True)
class FilterPolicy:
    """[filters]: what to classify (pacs_ai.film.filters applies it). Every field but the last two
    is a TOML-friendly type, so a config table maps straight onto it:
    ``FilterPolicy(**config["filters"])``. Lists are accepted and stored as tuples; text values
    are compared case-insensitively. An empty tuple means "no restriction". The last two, `intended_age_years` and `unknown_age`, come from the model and
    [model], not from [filters]: see :meth:`with_intended_age`."""

    # SOP Class UIDs to classify: CR Image, DX For Presentation, DX For Processing.
    sop_class_uids: tuple[str, ...] = FILM_SOP_CLASSES
    # Modality (0008,0060) values to classify.
    modalities: tuple[str, ...] = ("CR", "DX")
    # Body Part Examined (0018,0015) values meaning chest. "CHEST" is the DICOM term;
    # "THORAX" is what several vendors write.
    body_parts: tuple[str, ...] = ("CHEST", "THORAX")
    # SNOMED CT Code Values in Anatomic Region Sequence (0008,2218) meaning chest:
    # 816094009 "Chest" (current CID 4031) and 51185008 "Thoracic structure" (its older code).
    anatomic_region_codes: tuple[str, ...] = ("816094009", "51185008")
    # Classify an image that has neither Body Part Examined nor Anatomic Region Sequence.
    # Off by default: the model is not applied on a guess.
    allow_missing_body_part: bool = False
    # View Position (0018,5101) values of a frontal film.
    view_positions: tuple[str, ...] = ("PA", "AP")
    # Code Values in View Code Sequence (0054,0220) of a frontal film: SNOMED CT 272479007
    # postero-anterior and 399348003 antero-posterior, and their SNOMED RT forms R-10214, R-10206.
    view_codes: tuple[str, ...] = ("272479007", "399348003", "R-10214", "R-10206")
    # Classify an image that has neither View Position nor View Code Sequence (several CR
    # readers leave both empty). Off by default, as for the body part.
    allow_missing_view_position: bool = False
    # The effective age range of the model in use, [min, max] years (min <= age < max + 1), or
    # None: no age check. Not a [filters] key: start-up sets it from the model file and
    # [model] min_age_years/max_age_years (pacs_ai.model.intended_use.site_model_info).
    intended_age_years: tuple[float, float] | None = field(default=None,
                                                            metadata={"config": False})
    # A film without a usable age: "classify" (the out-of-distribution gate alone decides) or
    # "skip" (reason unknown-age), with or without an age range. Not a [filters] key either:
    # [model] unknown_age.
    unknown_age: str = field(default=UNKNOWN_AGE_CLASSIFY, metadata={"config": False})

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not item.metadata.get("config", True):
                continue
            if item.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"filter {item.name} must be true or false, not {value!r}")
            else:
                object.__setattr__(self, item.name, _text_tuple(item.name, value))
        if self.intended_age_years is not None:
            low, high = (float(v) for v in self.intended_age_years)
            object.__setattr__(self, "intended_age_years", (low, high))
        if self.unknown_age not in UNKNOWN_AGE_CHOICES:
            raise ValueError(f"unknown_age must be one of {', '.join(UNKNOWN_AGE_CHOICES)}, "
                             f"not {self.unknown_age!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The [filters] keys."""
        return tuple(item.name for item in dataclasses.fields(cls)
                     if item.metadata.get("config", True))

    def with_intended_age(self, age_years: tuple[float, float] | None,
                          unknown_age: str | None = None) -> "FilterPolicy":
        """This policy with the model's effective age range (ModelInfo.intended_age_years) and,
        when given, [model] unknown_age (else the policy's own)."""
        return dataclasses.replace(self, intended_age_years=age_years,
                                   unknown_age=unknown_age or self.unknown_age)


@dataclass(frozen=True)
class ReportConfig:
    sr_kind: str = DEFAULT_SR_KIND
    # the heat-map image (Secondary Capture) sent with the report of a film reported as
    # pneumonia, when the model gives saliency maps; for normal findings too when asked
    heatmap: bool = True
    heatmap_for_normal: bool = False
    # The priority an HL7 or FHIR destination's result carries when the finding is pneumonia,
    # for the RIS worklist to sort on: "S" (stat), "A" (ASAP), or "none". HL7 table 0485 and
    # FHIR's v3-ActPriority share both codes. A normal finding carries none (never "routine":
    # that could lower the priority of an order a clinician marked urgent).
    pneumonia_priority: str = "A"


@dataclass(frozen=True)
class TLSFiles:
    """Certificate files of one TLS end point; None where not given."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class ListenerTLSConfig(TLSFiles):
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff of deliveries; a delivery fails once either limit is reached."""

    initial_delay_seconds: float = 10.0
    max_delay_seconds: float = 900.0
    max_attempts: int = 0  # 0: no limit on attempts
    max_age_seconds: float = 7 * 24 * 3600.0  # 0: no limit on age

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
        exponent = min(max(attempts - 1, 0), 60)
        return min(self.initial_delay_seconds * (2.0 ** exponent), self.max_delay_seconds)

    def exhausted(self, attempts: int, age_seconds: float) -> bool:
        return ((self.max_attempts > 0 and attempts >= self.max_attempts)
                or (self.max_age_seconds > 0 and age_seconds >= self.max_age_seconds))


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"
    priority_prefix: str = "auto"  # "<N>" syslog priority before each line: auto = under systemd


@dataclass(frozen=True)
class WebConfig:
    """The queue page (/queue) and its JSON (/api/queue), on the [metrics] server."""

    enabled: bool = True
    token_file: Path | None = None  # the retry button's token; None: the page is read-only
    show_accession_number: bool = False
    recent_films: int = 50
    refresh_seconds: int = 15  # the page reloads itself this often (0: never)


# [drift] defaults: the model card's validation split, 585 pneumonia of 787 films (prevalence
# 0.74), +-0.15, where a day of 50 films at that rate spreads about +-0.06 (binomial); and its
# abstention, 1.5 % of the validation films, well below 10 %. A site sets its own rates.
DEFAULT_EXPECTED_POSITIVE_RATE = (0.59, 0.89)
DEFAULT_MAX_ABSTENTION_RATE = 0.10


@dataclass(frozen=True)
class DriftConfig:
    """What a model's results should look like at this site (pacs_ai.ops.drift): the queue page's
    chart and the /metrics gauges the Prometheus alerts compare against
    (deploy/prometheus/)."""

    # Share of the films a model classifies that it finds pneumonia in: [low, high].
    expected_positive_rate: tuple[float, float] = DEFAULT_EXPECTED_POSITIVE_RATE
    # Share of the films a model assesses that it abstains on (out-of-distribution).
    max_abstention_rate: float = DEFAULT_MAX_ABSTENTION_RATE
    # A day (the chart) or window (the alerts) with fewer films assessed is shown, not judged.
    min_films: int = 20
    days: int = 28  # the days the queue page's chart covers, today included


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = DEFAULT_METRICS_PORT


@dataclass(frozen=True)
class StatusConfig:
    """When `pacs-ai status` (exit status 1) and /healthz's needs_admin call for an admin."""

    # A destination that has stored nothing for this long while its deliveries fail.
    destination_failing_seconds: float = 900.0
    # Failed jobs count for this long after they failed (0: as long as they are failed).
    failed_jobs_within_seconds: float = 86400.0


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail (pacs_ai.ops.audit): a JSON-lines file, apart from the operational log."""

    enabled: bool = True
    path: Path | None = None  # None: <spool_dir>/audit/audit.log
    max_bytes: int = 50 * 1024 * 1024  # rotate past this size; 0: never rotate
    backup_count: int = 20  # rotated files kept (audit.log.1 ... .20)
    include_patient_id: bool = False  # the Patient ID in transfer records (never the name)

    def file(self, spool_dir: Path) -> Path:
        return self.path if self.path is not None else spool_dir / "audit" / "audit.log"
