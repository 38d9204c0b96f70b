"""The service's configuration: one TOML file, validated at start-up.

Every problem (unknown table or key, wrong type, bad value) raises :class:`ConfigError`, a
UserError whose message names the key and says how to fix it, so `pacs-ai serve` stops with one
clear line instead of a traceback. `deploy/pacs-ai.toml` documents every key.

Relative paths in a config file are resolved against the file's folder; the built-in default
(no file) resolves them against the working folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pacs_ai.dicom_constants import DEFAULT_SR_KIND, FILM_SOP_CLASSES, SOP_CLASS_KEYWORDS, SR_KINDS
from pacs_ai.errors import UserError

T = TypeVar("T")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
LOG_PRIORITY_PREFIXES = ("auto", "on", "off")
DEFAULT_PORT = 11112
DEFAULT_AE_TITLE = "PACS_AI"
DEFAULT_METRICS_PORT = 9108

# --- Defaults the stages share, kept here so the config needs none of them ---------------------
# A 43 x 43 cm detector at 0.1 mm pixels is ~18.5 Mpx; 50 Mpx leaves room and bounds memory
# (float64 intermediate: 400 MB). [limits] max_pixels; pacs_ai.film.pixels' guard.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_AGE_YEARS = 150  # an upper bound for age ranges; older stated ages are not believed
# [model] unknown_age: what to do with a film whose header gives no usable age
UNKNOWN_AGE_CLASSIFY = "classify"  # the default: the out-of-distribution gate alone decides
UNKNOWN_AGE_SKIP = "skip"  # recorded as skipped, reason `unknown-age`, no report
UNKNOWN_AGE_CHOICES = (UNKNOWN_AGE_CLASSIFY, UNKNOWN_AGE_SKIP)
SHIPPED_MODEL_FILENAME = "pacs-ai-pneumonia.pt"


def default_model_path() -> Path:
    """[model] path's default, the shipped model: $PACS_AI_MODEL, the source checkout, or the
    installed copy."""
    override = os.environ.get("PACS_AI_MODEL")
    if override:
        return Path(override)
    candidates = [
        Path(__file__).resolve().parent.parent / "deploy" / "models" / SHIPPED_MODEL_FILENAME,
        Path(sys.prefix) / "share" / "pacs-ai" / "models" / SHIPPED_MODEL_FILENAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


class ConfigError(UserError):
    """The config file cannot be used; the message names the key and the fix."""


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


AUTO = "auto"  # [workers] count / processes: derived at start-up (pacs_ai.classify.capacity)


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


PNEUMONIA_PRIORITIES = ("s", "a", "none")
DESTINATION_KINDS = ("dimse", "dicomweb", "hl7", "fhir")
# The keys a [[destinations]] block of each kind takes (parse_destinations reads them).
DIMSE_DESTINATION_KEYS = ("kind", "name", "ae_title", "host", "port", "calling_ae_title",
                          "timeout_seconds", "echo_interval_seconds", "tls")
DICOMWEB_DESTINATION_KEYS = ("kind", "name", "url", "auth", "username", "password_file",
                             "token_file", "ca_file", "timeout_seconds")
HL7_DESTINATION_KEYS = ("kind", "name", "host", "port", "tls", "timeout_seconds",
                        "sending_facility", "receiving_application", "receiving_facility",
                        "processing_id", "charset")
FHIR_DESTINATION_KEYS = DICOMWEB_DESTINATION_KEYS + ("patient_id_system",)
DESTINATION_KEYS = {"dimse": DIMSE_DESTINATION_KEYS, "dicomweb": DICOMWEB_DESTINATION_KEYS,
                    "hl7": HL7_DESTINATION_KEYS, "fhir": FHIR_DESTINATION_KEYS}
DICOMWEB_AUTH = ("none", "basic", "bearer")
HL7_PROCESSING_IDS = ("p", "t", "d")  # MSH-11: production, training, debugging
# The character sets an HL7 destination's messages can be sent in: the `charset` a config names
# -> the MSH-18 value (HL7 table 0211) and the Python codec. Many RIS (older ones, much of
# Europe) take only ISO 8859-1 or ASCII: UTF-8 bytes would show "Müller" as "MÃ¼ller".
HL7_CHARSETS = {"UTF-8": ("UNICODE UTF-8", "utf-8"), "8859/1": ("8859/1", "iso-8859-1"),
                "ASCII": ("ASCII", "ascii")}


@dataclass(frozen=True)
class HttpTarget:
    """Where and how an HTTP destination (DICOMweb, FHIR) takes reports."""

    url: str  # the root: DICOMweb reports are POSTed to {url}/studies, FHIR bundles to {url}
    auth: str = "none"  # none, basic (username + password_file) or bearer (token_file)
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None  # None: the system CAs (https only)


@dataclass(frozen=True)
class DicomWebTarget(HttpTarget):
    """A kind = "dicomweb" destination: STOW-RS (pacs_ai.deliver.stow_transport)."""


@dataclass(frozen=True)
class FhirTarget(HttpTarget):
    """A kind = "fhir" destination: a DiagnosticReport and its Observation (pacs_ai.deliver.fhir_report)
    in one transaction Bundle POSTed to the FHIR base URL (pacs_ai.deliver.fhir_transport)."""

    # The system of the patient identifiers the EHR knows (its MRN system URI); None: the
    # patient is named by the Patient ID's value alone.
    patient_id_system: str | None = None


@dataclass(frozen=True)
class Hl7Target:
    """A kind = "hl7" destination: ORU^R01 over MLLP (pacs_ai.deliver.hl7_message, hl7_transport); the
    MSH fields a RIS interface routes on. Host, port, TLS and timeout are the Destination's."""

    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    processing_id: str = "P"  # MSH-11: P production, T training, D debugging
    charset: str = "UTF-8"  # a key of HL7_CHARSETS: how the messages are encoded (MSH-18)

    @property
    def msh_18(self) -> str:
        """The character set as MSH-18 names it (HL7 table 0211)."""
        return HL7_CHARSETS[self.charset][0]

    @property
    def codec(self) -> str:
        """The Python codec the messages are encoded (and the ACKs decoded) with."""
        return HL7_CHARSETS[self.charset][1]


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str  # C-STORE destinations only ("" for DICOMweb ones), like host and port
    host: str
    port: int
    calling_ae_title: str = DEFAULT_AE_TITLE
    timeout_seconds: float = 30.0
    tls: TLSFiles | None = None  # None: plain TCP; TLSFiles(): TLS with the system CAs
    # A C-ECHO every this many seconds, its result in status, /healthz and metrics; 0: none.
    echo_interval_seconds: float = 0.0
    dicomweb: DicomWebTarget | None = None  # set for kind = "dicomweb": STOW-RS, not C-STORE
    hl7: Hl7Target | None = None  # set for kind = "hl7": ORU^R01 over MLLP to host:port
    fhir: FhirTarget | None = None  # set for kind = "fhir": a transaction Bundle to its url

    @property
    def kind(self) -> str:
        if self.dicomweb is not None:
            return "dicomweb"
        if self.hl7 is not None:
            return "hl7"
        return "fhir" if self.fhir is not None else "dimse"

    @property
    def takes_images(self) -> bool:
        """A DICOM destination: it stores the SR and the heat-map image. HL7 and FHIR
        destinations get a result message made from the SR, and no image."""
        return self.hl7 is None and self.fhir is None

    @property
    def http(self) -> HttpTarget | None:
        return self.dicomweb or self.fhir

    @property
    def where(self) -> str:
        """The peer in words, for logs and status."""
        if self.http is not None:
            return self.http.url
        if self.hl7 is not None:
            return f"mllp://{self.host}:{self.port}"
        return f"{self.ae_title}@{self.host}:{self.port}"


ROUTE_MATCH_KEYS = ("calling_ae_title", "source_address", "modality", "station_name")
DEFAULT_ROUTE = "default"  # the route name of films that match no [[routes]]


@dataclass(frozen=True)
class Route:
    """One [[routes]] block: films whose every given key matches (any of its values) have their
    reports sent to `destinations`. Keys left out match anything."""

    name: str
    destinations: tuple[str, ...]
    calling_ae_title: tuple[str, ...] = ()
    source_address: tuple[str, ...] = ()  # IP addresses or CIDR networks
    modality: tuple[str, ...] = ()  # upper case
    station_name: tuple[str, ...] = ()  # compared without case


@dataclass(frozen=True)
class RoutingConfig:
    routes: tuple[Route, ...] = ()  # in file order: the first that matches wins
    # Where films that match no route go: None (no [routing] default) = every destination.
    default: tuple[str, ...] | None = None


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


@dataclass(frozen=True)
class Config:
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    filters: FilterPolicy = field(default_factory=FilterPolicy)
    report: ReportConfig = field(default_factory=ReportConfig)
    destinations: tuple[Destination, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tls: ListenerTLSConfig = field(default_factory=ListenerTLSConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    routing: "RoutingConfig" = field(default_factory=lambda: RoutingConfig())
    web: WebConfig = field(default_factory=WebConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    source: Path | None = None  # the file it was read from

    def model_path(self) -> Path:
        return self.model.path if self.model.path is not None else default_model_path()


def default_config(base_dir: Path | None = None) -> Config:
    """The configuration without a file: port 11112, AE PACS_AI, spool ./spool, no destination.

    It is the README's local try-out (`pacs-ai serve`), so it takes any calling AE title, with
    the start-up warning that says so; a config file takes none until it names them or sets
    [listener] accept_any_calling_ae = true, the one difference from an empty file."""
    base = (base_dir or Path.cwd()).resolve()
    return Config(listener=ListenerConfig(accept_any_calling_ae=True),
                  storage=StorageConfig(spool_dir=base / "spool"))


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; None gives :func:`default_config`."""
    if path is None:
        return default_config()
    config_path = Path(path)
    try:
        raw = config_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {config_path}: {error.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{config_path}: not UTF-8 text; save the file as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{config_path}: not valid TOML: {error}") from None
    try:
        return parse_config(data, base_dir=config_path.resolve().parent, source=config_path)
    except ConfigError as error:
        raise ConfigError(f"{config_path}: {error}") from None


# --- parsing ---------------------------------------------------------------------------------

class _Table:
    """One TOML table being read: typed getters that remember which keys were used."""

    def __init__(self, data: Any, name: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{name} must be a table, e.g. {name} on its own line "
                              f"followed by key = value lines, got {_describe(data)}")
        self.data = data
        self.name = name
        self.known: list[str] = []

    def _key(self, key: str) -> str:
        return f"{self.name} {key}"

    def _raw(self, key: str) -> tuple[bool, Any]:
        self.known.append(key)
        return (key in self.data, self.data.get(key))

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self._key(key)}: {problem}")

    def string(self, key: str, default: str, *, choices: tuple[str, ...] = (),
               check: Callable[[str], str | None] | None = None) -> str:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, str):
            raise self.fail(key, f"expected a quoted string, got {_describe(value)}; "
                                 f'write {key} = "..."')
        if choices and value.lower() not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(key, problem)
        return value.lower() if choices else value

    def optional_string(self, key: str, *,
                        check: Callable[[str], str | None] | None = None) -> str | None:
        """A non-empty string (stripped), or None when the key is absent."""
        present, _ = self._raw(key)
        if not present:
            return None
        value = self.string(key, "", check=check).strip()
        if not value:
            raise self.fail(key, "is empty; give a value or remove the key")
        return value

    def integer(self, key: str, default: int, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        present, value = self._raw(key)
        if not present:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected a whole number without quotes, got {_describe(value)}")
        _check_range(self, key, value, minimum, maximum)
        return value

    def integer_or_auto(self, key: str, *, minimum: int, maximum: int) -> int | str:
        """A whole number, or "auto" (the default) for the service to derive."""
        present, value = self._raw(key)
        if not present or (isinstance(value, str) and value.strip().lower() == AUTO):
            return AUTO
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f'expected "auto" or a whole number without quotes, got '
                                 f"{_describe(value)}")
        _check_range(self, key, value, minimum, maximum)
        return value

    def number(self, key: str, default: float, *, minimum: float | None = None,
               maximum: float | None = None, exclusive_minimum: bool = False) -> float:
        present, value = self._raw(key)
        if not present:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, f"expected a number without quotes, got {_describe(value)}")
        if exclusive_minimum and minimum is not None and value <= minimum:
            raise self.fail(key, f"must be greater than {minimum}, got {value}")
        _check_range(self, key, value, minimum, maximum)
        return float(value)

    def optional_number(self, key: str, *, minimum: float, maximum: float) -> float | None:
        """A number in [minimum, maximum], or None when the key is absent."""
        present, _ = self._raw(key)
        return self.number(key, math.nan, minimum=minimum, maximum=maximum) if present else None

    def number_range(self, key: str, default: tuple[float, float], *, minimum: float,
                     maximum: float, example: str) -> tuple[float, float]:
        """[low, high]: two numbers with minimum <= low <= high <= maximum."""
        present, value = self._raw(key)
        if not present:
            return default
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in value)):
            raise self.fail(key, f"expected [low, high], two numbers without quotes such as "
                                 f"{example}, got {_describe(value)}")
        low, high = float(value[0]), float(value[1])
        if not minimum <= low <= high <= maximum:
            raise self.fail(key, f"[{low:g}, {high:g}]: expected {minimum:g} <= low <= high <= "
                                 f"{maximum:g}")
        return low, high

    def boolean(self, key: str, default: bool) -> bool:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false (no quotes), got {_describe(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...],
                check: Callable[[str], str | None] | None = None) -> tuple[str, ...]:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(key, f'expected a list of quoted strings like ["A", "B"], '
                                 f"got {_describe(value)}")
        if check is not None:
            for item in value:
                if (problem := check(item)) is not None:
                    raise self.fail(key, f"{item!r}: {problem}")
        return tuple(value)

    def path(self, key: str, default: Path | None, base_dir: Path, *,
             must_exist: bool = False) -> Path | None:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f'expected a file path as a quoted string, got {_describe(value)}')
        resolved = (base_dir / Path(value).expanduser()).resolve()
        if must_exist and not resolved.is_file():
            raise self.fail(key, f"file not found: {resolved}; fix the path or remove the key")
        return resolved

    def finish(self) -> None:
        unknown = sorted(set(self.data) - set(self.known))
        if unknown:
            raise unknown_key(self.name, unknown[0], self.known)

    def check_keys(self, accepted: Iterable[str], listed: Iterable[str]) -> None:
        """Refuse a key outside `accepted` before any other check, so a misspelt key is named
        as such, not as the required key it was meant to be; the message lists `listed`."""
        unknown = sorted(set(self.data) - set(accepted))
        if unknown:
            raise unknown_key(self.name, unknown[0], listed)


def unknown_key(where: str, key: str, known: Iterable[str]) -> ConfigError:
    """The error for a key `where` does not take, with the closest known key if one is close
    (`ae_tile`: did you mean 'ae_title'?)."""
    known = list(dict.fromkeys(known))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; the keys of {where} are: "
                       f"{', '.join(known)} (see deploy/pacs-ai.toml)")


def _check_range(table: _Table, key: str, value: float, minimum: float | None,
                 maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise table.fail(key, f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise table.fail(key, f"must be at most {maximum}, got {value}")


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def check_ae_title(value: str) -> str | None:
    """DICOM AE titles: 1 to 16 printable ASCII characters, no backslash, not only spaces."""
    if not value.strip():
        return "an AE title must not be empty"
    if len(value) > 16:
        return f"an AE title has at most 16 characters, this one has {len(value)}"
    if not all(32 <= ord(ch) < 127 for ch in value) or "\\" in value:
        return "an AE title may hold only printable ASCII characters and no backslash"
    return None


def check_network(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return 'not an IP address or network, e.g. "10.1.2.3" or "10.1.0.0/16"'
    return None


def _calling_ae_titles(t: _Table) -> tuple[str | BoundAETitle, ...]:
    """[listener] allowed_calling_ae_titles: plain AE titles, or inline tables
    { ae_title = "CR1", address = "10.1.2.0/24" } binding a title to an IP address or network
    (one title may have several entries; it cannot also be listed plain)."""
    key = "allowed_calling_ae_titles"
    present, value = t._raw(key)
    if not present:
        return ()
    example = ('expected a list of quoted AE titles or { ae_title = "CR1", address = '
               '"10.1.2.0/24" } tables, like ["A", { ae_title = "B", address = "10.0.0.5" }]')
    if not isinstance(value, list):
        raise t.fail(key, f"{example}, got {_describe(value)}")
    entries: list[str | BoundAETitle] = []
    for item in value:
        if isinstance(item, str):
            title = item
            entries.append(title)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"ae_title", "address"})
            if unknown:
                raise t.fail(key, f"unknown key {unknown[0]!r} in {item!r}; an entry's keys are "
                                  "ae_title and address")
            title, address = item.get("ae_title"), item.get("address")
            if not isinstance(title, str):
                raise t.fail(key, f"{item!r}: ae_title must be a quoted AE title, "
                                  f"got {_describe(title)}")
            if not isinstance(address, str):
                raise t.fail(key, f"{item!r}: address must be a quoted IP address or network "
                                  f'like "10.1.2.0/24", got {_describe(address)}')
            if (problem := check_network(address)) is not None:
                raise t.fail(key, f"{title!r} address {address!r}: {problem}")
            entries.append(BoundAETitle(title, address))
        else:
            raise t.fail(key, f"{example}, got the entry {_describe(item)}")
        if (problem := check_ae_title(title)) is not None:
            raise t.fail(key, f"{title!r}: {problem}")
    plain = {entry for entry in entries if isinstance(entry, str)}
    if both := sorted(plain & {e.ae_title for e in entries if isinstance(e, BoundAETitle)}):
        raise t.fail(key, f"{both[0]!r} is listed both plain (any address) and bound to an "
                          "address; keep one form")
    return tuple(entries)


def check_sop_class(value: str) -> str | None:
    if value in SOP_CLASS_KEYWORDS or _is_dotted_uid(value):
        return None
    return (f"not a SOP class UID or one of {', '.join(SOP_CLASS_KEYWORDS)}")


def _is_dotted_uid(value: str) -> bool:
    parts = value.split(".")
    return 0 < len(value) <= 64 and all(p.isdigit() and (p == "0" or not p.startswith("0"))
                                        for p in parts)


def _check_host(value: str) -> str | None:
    if not value.strip() or any(ch.isspace() for ch in value):
        return "expected a host name or IP address without spaces"
    return None


TOP_LEVEL_TABLES = ("listener", "limits", "storage", "model", "shadow", "workers", "filters",
                    "report", "destinations", "retry", "log", "metrics", "tls", "status", "audit",
                    "routes", "routing", "web", "drift")


def parse_config(data: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    """Build a Config from parsed TOML; raise ConfigError naming the first problem.

    One reader per table; each key's default is its dataclass field's default (the one source,
    which `default_config` uses too)."""
    unknown = sorted(set(data) - set(TOP_LEVEL_TABLES))
    if unknown:
        close = difflib.get_close_matches(unknown[0], TOP_LEVEL_TABLES, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        raise ConfigError(f"unknown table or key {unknown[0]!r} at the top level{hint}; the "
                          f"tables are {', '.join(f'[{name}]' for name in TOP_LEVEL_TABLES)}")

    def read(name: str, reader: Callable[..., T], *args: Any) -> T:
        t = _Table(data.get(name, {}), f"[{name}]")
        value = reader(t, *args)
        t.finish()
        return value

    # read in this order, so the first problem reported is the first table's
    listener = read("listener", _read_listener)
    limits = read("limits", _read_limits)
    storage = read("storage", _read_storage, base_dir)
    model = read("model", _read_model, base_dir)
    shadow = read("shadow", _read_shadow, base_dir)
    workers = read("workers", _read_workers)
    filters = parse_filter_policy(data.get("filters", {}))
    report = read("report", _read_report)
    destinations = parse_destinations(data.get("destinations", []), base_dir, listener.ae_title)
    retry = read("retry", _read_retry)
    log = read("log", _read_log)
    metrics = read("metrics", _read_metrics)
    tls = read("tls", _read_tls, base_dir)
    status = read("status", _read_status)
    audit = read("audit", _read_audit, base_dir)
    routing = parse_routing(data.get("routes", []), data.get("routing", {}), destinations)
    web = read("web", _read_web, base_dir)
    drift = read("drift", _read_drift)
    return Config(listener=listener, limits=limits, storage=storage, model=model, shadow=shadow,
                  workers=workers,
                  filters=filters, report=report, destinations=destinations, retry=retry,
                  log=log, metrics=metrics, tls=tls, status=status, audit=audit, routing=routing,
                  web=web, drift=drift, source=source)


def _read_listener(t: _Table) -> ListenerConfig:
    d = ListenerConfig
    listener = ListenerConfig(
        ae_title=t.string("ae_title", d.ae_title, check=check_ae_title),
        host=t.string("host", d.host, check=_check_host),
        port=t.integer("port", d.port, minimum=1, maximum=65535),
        allowed_calling_ae_titles=_calling_ae_titles(t),
        accept_any_calling_ae=t.boolean("accept_any_calling_ae", d.accept_any_calling_ae),
        check_called_ae_title=t.boolean("check_called_ae_title", d.check_called_ae_title),
        allowed_peer_addresses=t.strings("allowed_peer_addresses", d.allowed_peer_addresses,
                                         check=check_network),
        sop_classes=tuple(SOP_CLASS_KEYWORDS.get(v, v) for v in
                          t.strings("sop_classes", d.sop_classes, check=check_sop_class)),
    )
    if listener.accept_any_calling_ae and listener.allowed_calling_ae_titles:
        raise t.fail("accept_any_calling_ae", "true, yet allowed_calling_ae_titles names callers; "
                                              "keep the list (only those may store) or remove "
                                              "it (any caller may)")
    if not listener.sop_classes:
        raise t.fail("sop_classes", "must list at least one SOP class, e.g. "
                                    '["ComputedRadiographyImageStorage"]')
    return listener


def _read_limits(t: _Table) -> LimitsConfig:
    d = LimitsConfig
    limits = LimitsConfig(
        max_associations=t.integer("max_associations", d.max_associations, minimum=1,
                                   maximum=1000),
        max_pdu_bytes=t.integer("max_pdu_bytes", d.max_pdu_bytes, minimum=0, maximum=2**32 - 1),
        max_pixels=t.integer("max_pixels", d.max_pixels, minimum=4),
        acse_timeout_seconds=t.number("acse_timeout_seconds", d.acse_timeout_seconds, minimum=0,
                                      exclusive_minimum=True),
        dimse_timeout_seconds=t.number("dimse_timeout_seconds", d.dimse_timeout_seconds,
                                       minimum=0, exclusive_minimum=True),
        network_timeout_seconds=t.number("network_timeout_seconds", d.network_timeout_seconds,
                                         minimum=0, exclusive_minimum=True),
        shutdown_grace_seconds=t.number("shutdown_grace_seconds", d.shutdown_grace_seconds,
                                        minimum=0),
        association_request_timeout_seconds=t.number(
            "association_request_timeout_seconds", d.association_request_timeout_seconds,
            minimum=0, exclusive_minimum=True),
        max_dataset_bytes=t.integer("max_dataset_bytes", d.max_dataset_bytes,
                                    minimum=1024 * 1024, maximum=2**32 - 1),
    )
    # the per-address cap follows max_associations unless set
    limits = dataclasses.replace(limits, max_connections_per_address=t.integer(
        "max_connections_per_address", limits.max_associations, minimum=1, maximum=2000))
    if 0 < limits.max_pdu_bytes < 4096:
        raise t.fail("max_pdu_bytes", "must be 0 (no limit) or at least 4096")
    return limits


def _read_storage(t: _Table, base_dir: Path) -> StorageConfig:
    d = StorageConfig
    spool_dir = base_dir / d.spool_dir  # relative to the config file's folder
    return StorageConfig(
        spool_dir=t.path("spool_dir", spool_dir, base_dir) or spool_dir,
        min_free_bytes=t.integer("min_free_bytes", d.min_free_bytes, minimum=0),
        keep_source_images=t.boolean("keep_source_images", d.keep_source_images),
        keep_reports=t.boolean("keep_reports", d.keep_reports),
        keep_failed_days=t.number("keep_failed_days", d.keep_failed_days, minimum=0),
    )


def _read_model(t: _Table, base_dir: Path) -> ModelConfig:
    # every key's default but unknown_age's is None: the model file's own value
    # (pacs_ai.model.intended_use)
    model = ModelConfig(
        path=t.path("path", ModelConfig.path, base_dir, must_exist=True),
        **_read_threshold(t),
        min_age_years=t.optional_number("min_age_years", minimum=0, maximum=MAX_AGE_YEARS),
        max_age_years=t.optional_number("max_age_years", minimum=0, maximum=MAX_AGE_YEARS),
        unknown_age=t.string("unknown_age", ModelConfig.unknown_age,
                             choices=UNKNOWN_AGE_CHOICES),
    )
    if (model.min_age_years is not None and model.max_age_years is not None
            and model.min_age_years > model.max_age_years):
        raise t.fail("min_age_years", f"{model.min_age_years:g} is above max_age_years "
                                      f"{model.max_age_years:g}")
    return model


def _read_shadow(t: _Table, base_dir: Path) -> ShadowConfig:
    shadow = ShadowConfig(model=t.path("model", None, base_dir, must_exist=True),
                          **_read_threshold(t))
    if shadow.model is None and t.data:
        t.finish()  # a misspelt key is named as such first
        key = next(iter(t.data))
        raise t.fail(key, 'is set but model is not: [shadow] model = "PATH" names the '
                          "candidate model file to run in shadow; add it, or remove the table")
    return shadow


def _read_threshold(t: _Table) -> dict[str, Any]:
    """threshold, ood_threshold and the keys that bind them to a model file
    (pacs_ai.model.site_threshold), checked for consistency here; whether they name the loaded
    file is checked once it is loaded."""
    values = {
        "threshold": t.optional_number("threshold", minimum=0.0, maximum=1.0),
        "ood_threshold": t.optional_number("ood_threshold", minimum=1e-9, maximum=1e9),
        "threshold_model_version": t.optional_string(VERSION_KEY),
        "threshold_model_sha256": t.optional_string(SHA256_KEY, check=_check_sha256),
        "threshold_for_any_model": t.boolean(ANY_MODEL_KEY, False),
    }
    if values["threshold_model_sha256"] is not None:
        values["threshold_model_sha256"] = values["threshold_model_sha256"].lower()
    bound = (values["threshold_model_version"] is not None,
             values["threshold_model_sha256"] is not None)
    thresholds = values["threshold"] is not None or values["ood_threshold"] is not None
    if any(bound) and not thresholds:
        key = VERSION_KEY if bound[0] else SHA256_KEY
        raise t.fail(key, "is set but neither threshold nor ood_threshold is: it says which "
                          "model file they were chosen for; remove it, or add them")
    if bound[0] != bound[1]:
        missing = SHA256_KEY if bound[0] else VERSION_KEY
        raise t.fail(missing, f"missing: {VERSION_KEY} and {SHA256_KEY} go together (the "
                              "lines `pacs-ai evaluate` proposes set both)")
    if values["threshold_for_any_model"] and any(bound):
        raise t.fail(ANY_MODEL_KEY, f"true, yet {SHA256_KEY} binds the thresholds to one "
                                    "model file; keep one of them")
    if values["threshold_for_any_model"] and not thresholds:
        raise t.fail(ANY_MODEL_KEY, "is set but neither threshold nor ood_threshold is; remove "
                                    "it, or add them")
    return values


def _check_sha256(value: str) -> str | None:
    if SHA256_HEX.match(value.strip().lower()) is None:
        return ("expected the model file's SHA-256 as 64 hexadecimal digits (the line "
                "`pacs-ai evaluate` proposes, or `sha256sum FILE`)")
    return None


def _read_workers(t: _Table) -> WorkersConfig:
    d = WorkersConfig
    return WorkersConfig(
        count=t.integer_or_auto("count", minimum=1, maximum=64),
        processes=t.integer_or_auto("processes", minimum=0, maximum=64),
        batch_size=t.integer("batch_size", d.batch_size, minimum=1, maximum=512),
        torch_threads=t.integer("torch_threads", d.torch_threads, minimum=0, maximum=256),
    )


def _read_report(t: _Table) -> ReportConfig:
    d = ReportConfig
    priority = t.string("pneumonia_priority", d.pneumonia_priority, choices=PNEUMONIA_PRIORITIES)
    return ReportConfig(sr_kind=t.string("sr_kind", d.sr_kind, choices=tuple(SR_KINDS)),
                        heatmap=t.boolean("heatmap", d.heatmap),
                        heatmap_for_normal=t.boolean("heatmap_for_normal", d.heatmap_for_normal),
                        pneumonia_priority=priority if priority == "none" else priority.upper())


def _read_retry(t: _Table) -> RetryPolicy:
    d = RetryPolicy
    retry = RetryPolicy(
        initial_delay_seconds=t.number("initial_delay_seconds", d.initial_delay_seconds,
                                       minimum=0, exclusive_minimum=True),
        max_delay_seconds=t.number("max_delay_seconds", d.max_delay_seconds, minimum=0,
                                   exclusive_minimum=True),
        max_attempts=t.integer("max_attempts", d.max_attempts, minimum=0),
        max_age_seconds=t.number("max_age_seconds", d.max_age_seconds, minimum=0),
    )
    if retry.max_delay_seconds < retry.initial_delay_seconds:
        raise t.fail("max_delay_seconds", "must be at least initial_delay_seconds")
    if retry.max_attempts == 0 and retry.max_age_seconds == 0:
        raise t.fail("max_attempts", "max_attempts and max_age_seconds are both 0, so a report "
                                     "for a destination that never comes back would be retried "
                                     "forever; set at least one of them")
    return retry


def _read_log(t: _Table) -> LogConfig:
    d = LogConfig
    return LogConfig(level=t.string("level", d.level, choices=LOG_LEVELS),
                     format=t.string("format", d.format, choices=LOG_FORMATS),
                     priority_prefix=t.string("priority_prefix", d.priority_prefix,
                                              choices=LOG_PRIORITY_PREFIXES))


def _read_metrics(t: _Table) -> MetricsConfig:
    d = MetricsConfig
    return MetricsConfig(enabled=t.boolean("enabled", d.enabled),
                         host=t.string("host", d.host, check=_check_host),
                         port=t.integer("port", d.port, minimum=0, maximum=65535))


def _read_tls(t: _Table, base_dir: Path) -> ListenerTLSConfig:
    tls = ListenerTLSConfig(
        cert_file=t.path("cert_file", None, base_dir, must_exist=True),
        key_file=t.path("key_file", None, base_dir, must_exist=True),
        ca_file=t.path("ca_file", None, base_dir, must_exist=True),
        require_client_cert=t.boolean("require_client_cert",
                                      ListenerTLSConfig.require_client_cert),
    )
    if (tls.cert_file is None) != (tls.key_file is None):
        raise t.fail("cert_file", "cert_file and key_file go together: set both to enable TLS, "
                                  "or neither")
    if tls.require_client_cert and tls.ca_file is None:
        raise t.fail("require_client_cert", "needs ca_file, the CA that signs client certificates")
    if (tls.ca_file is not None or tls.require_client_cert) and tls.cert_file is None:
        raise t.fail("ca_file", "TLS settings without cert_file and key_file; set both to enable "
                                "TLS")
    return tls


def _read_status(t: _Table) -> StatusConfig:
    d = StatusConfig
    return StatusConfig(
        destination_failing_seconds=t.number(
            "destination_failing_seconds", d.destination_failing_seconds, minimum=0),
        failed_jobs_within_seconds=t.number(
            "failed_jobs_within_seconds", d.failed_jobs_within_seconds, minimum=0),
    )


def _read_audit(t: _Table, base_dir: Path) -> AuditConfig:
    d = AuditConfig
    audit = AuditConfig(
        enabled=t.boolean("enabled", d.enabled),
        path=t.path("path", d.path, base_dir),
        max_bytes=t.integer("max_bytes", d.max_bytes, minimum=0),
        backup_count=t.integer("backup_count", d.backup_count, minimum=0, maximum=1000),
        include_patient_id=t.boolean("include_patient_id", d.include_patient_id),
    )
    if 0 < audit.max_bytes < 64 * 1024:
        raise t.fail("max_bytes", "must be 0 (never rotate) or at least 65536 (64 KiB)")
    if audit.max_bytes and not audit.backup_count:
        raise t.fail("backup_count", "must be at least 1 when max_bytes is set (the rotated "
                                     "files kept); for no rotation set max_bytes = 0")
    return audit


def _read_web(t: _Table, base_dir: Path) -> WebConfig:
    d = WebConfig
    return WebConfig(
        enabled=t.boolean("enabled", d.enabled),
        token_file=t.path("token_file", d.token_file, base_dir, must_exist=True),
        show_accession_number=t.boolean("show_accession_number", d.show_accession_number),
        recent_films=t.integer("recent_films", d.recent_films, minimum=1, maximum=1000),
        refresh_seconds=t.integer("refresh_seconds", d.refresh_seconds, minimum=0,
                                  maximum=3600))


def _read_drift(t: _Table) -> DriftConfig:
    d = DriftConfig
    return DriftConfig(
        expected_positive_rate=t.number_range("expected_positive_rate",
                                              d.expected_positive_rate, minimum=0.0, maximum=1.0,
                                              example="[0.1, 0.3]"),
        max_abstention_rate=t.number("max_abstention_rate", d.max_abstention_rate, minimum=0.0,
                                     maximum=1.0),
        min_films=t.integer("min_films", d.min_films, minimum=1, maximum=1_000_000),
        days=t.integer("days", d.days, minimum=1, maximum=366))


def parse_filter_policy(data: Any) -> FilterPolicy:
    """[filters] -> FilterPolicy(**table), checked against the dataclass's own fields.

    Types are checked against each field's default, so a new FilterPolicy field needs no code
    here: lists become tuples, integers are accepted where a float is expected.
    """
    t = _Table(data, "[filters]")
    fields = {f.name: f for f in dataclasses.fields(FilterPolicy)
              if f.name in FilterPolicy.field_names()}  # not the model's intended age
    t.check_keys(fields, fields)
    values: dict[str, Any] = {}
    for name, value in t.data.items():
        values[name] = _coerce_like_default(name, value, fields[name])
    try:
        return FilterPolicy(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[filters]: {error}") from None


def _coerce_like_default(name: str, value: Any, spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        default = spec.default
    elif spec.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = spec.default_factory()  # type: ignore[misc]
    else:
        return value
    where = f"[filters] {name}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {_describe(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a quoted string, got {_describe(value)}")
    elif isinstance(default, (tuple, list, frozenset, set)):
        if not isinstance(value, list):
            raise ConfigError(f'{where}: expected a list like ["A", "B"], got {_describe(value)}')
        sample = next(iter(default), None)
        if sample is not None and not all(isinstance(item, type(sample)) for item in value):
            raise ConfigError(f"{where}: every item must be {_describe(sample).split(' (')[1][:-1]}"
                              f", got {value!r}")
        return type(default)(value)
    return value


def parse_destinations(data: Any, base_dir: Path, listener_ae_title: str) -> tuple[Destination, ...]:
    if not isinstance(data, list):
        raise ConfigError("destinations must be written as [[destinations]] blocks, one per PACS")
    destinations: list[Destination] = []
    for index, item in enumerate(data, start=1):
        t = _Table(item, f"[[destinations]] #{index}")
        kind = t.string("kind", "dimse", choices=DESTINATION_KINDS)
        # a misspelt key first: `ae_tile` is named, not reported as ae_title missing
        t.check_keys(sum(DESTINATION_KEYS.values(), ()), DESTINATION_KEYS[kind])
        if kind in ("dicomweb", "fhir"):
            destinations.append(_parse_http_destination(t, base_dir, kind))
            continue
        if kind == "hl7":
            destinations.append(_parse_hl7_destination(t, base_dir))
            continue
        ae_title = t.string("ae_title", "", check=check_ae_title)
        host = t.string("host", "", check=_check_host)
        port = t.integer("port", 0, minimum=1, maximum=65535)
        for key, value in (("ae_title", ae_title), ("host", host), ("port", port)):
            if not value:
                raise t.fail(key, "is required: every destination needs ae_title, host and port")
        name = t.string("name", f"{ae_title}@{host}:{port}", check=_check_name)
        calling = t.string("calling_ae_title", listener_ae_title, check=check_ae_title)
        timeout = t.number("timeout_seconds", 30.0, minimum=0, exclusive_minimum=True)
        echo_interval = t.number("echo_interval_seconds", 0.0, minimum=0)
        if 0 < echo_interval < 10:
            raise t.fail("echo_interval_seconds", "must be 0 (no C-ECHO) or at least 10 seconds")
        tls = _parse_destination_tls(t, base_dir)
        t.finish()
        destinations.append(Destination(name=name, ae_title=ae_title, host=host, port=port,
                                        calling_ae_title=calling, timeout_seconds=timeout, tls=tls,
                                        echo_interval_seconds=echo_interval))
    names = [d.name for d in destinations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"[[destinations]]: two destinations are named {duplicates[0]!r}; give "
                          "each a distinct name = \"...\"")
    return tuple(destinations)


def parse_routing(routes: Any, routing: Any, destinations: tuple[Destination, ...]
                  ) -> RoutingConfig:
    """[[routes]] blocks and [routing] default, checked against the destinations' names."""
    known = [d.name for d in destinations]

    def destination_names(t: _Table, key: str) -> tuple[str, ...]:
        present, _ = t._raw(key)
        names = t.strings(key, ())
        if not present:
            raise t.fail(key, 'is required: the destinations that get these reports, e.g. '
                              f'["{known[0] if known else "main-pacs"}"] ([] for none)')
        for name in names:
            if name not in known:
                raise t.fail(key, f"{name!r} is not the name of a [[destinations]] block; "
                                  f"the destinations are {', '.join(map(repr, known)) or 'none'}")
        return tuple(dict.fromkeys(names))

    def values(t: _Table, key: str, check=None) -> tuple[str, ...]:
        present, value = t._raw(key)
        if not present:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(
                isinstance(item, str) and item.strip() for item in value):
            raise t.fail(key, f'expected a quoted string or a list of them like ["A", "B"], '
                              f"got {_describe(value)}")
        for item in value:
            if check is not None and (problem := check(item)) is not None:
                raise t.fail(key, f"{item!r}: {problem}")
        return tuple(item.strip() for item in value)

    if not isinstance(routes, list):
        raise ConfigError("routes must be written as [[routes]] blocks, one per rule")
    parsed: list[Route] = []
    for index, item in enumerate(routes, start=1):
        t = _Table(item, f"[[routes]] #{index}")
        name = t.string("name", f"route-{index}", check=_check_name)
        if name == DEFAULT_ROUTE:
            raise t.fail("name", f"{DEFAULT_ROUTE!r} is the name of films that match no route; "
                                 "choose another")
        route = Route(
            name=name, destinations=destination_names(t, "destinations"),
            calling_ae_title=values(t, "calling_ae_title", check=check_ae_title),
            source_address=values(t, "source_address", check=check_network),
            modality=tuple(v.upper() for v in values(t, "modality")),
            station_name=values(t, "station_name"))
        t.finish()
        if not any(getattr(route, key) for key in ROUTE_MATCH_KEYS):
            raise ConfigError(f"[[routes]] #{index} ({name}): give at least one of "
                              f"{', '.join(ROUTE_MATCH_KEYS)}; a route that matches every "
                              "film is [routing] default")
        parsed.append(route)
    names = [route.name for route in parsed]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"[[routes]]: two routes are named {duplicates[0]!r}; give each a "
                          'distinct name = "..."')
    t = _Table(routing, "[routing]")
    present, _ = t._raw("default")
    default = destination_names(t, "default") if present else None
    t.finish()
    return RoutingConfig(routes=tuple(parsed), default=default)


def _parse_http_destination(t: _Table, base_dir: Path, kind: str) -> Destination:
    """A kind = "dicomweb" or "fhir" [[destinations]] block: url, auth and its files, ca_file
    (and for FHIR the patient identifier system)."""
    example = ("https://pacs.example.org/dicom-web" if kind == "dicomweb"
               else "https://ehr.example.org/fhir/r4")
    what = "the DICOMweb root" if kind == "dicomweb" else "the FHIR base URL"
    url = t.string("url", "", check=_check_http_url)
    if not url:
        raise t.fail("url", f'is required for kind = "{kind}": {what}, e.g. "{example}"')
    auth = t.string("auth", "none", choices=DICOMWEB_AUTH)
    username = t.string("username", "") or None
    password_file = t.path("password_file", None, base_dir, must_exist=True)
    token_file = t.path("token_file", None, base_dir, must_exist=True)
    ca_file = t.path("ca_file", None, base_dir, must_exist=True)
    needs = {"basic": ("username", "password_file"), "bearer": ("token_file",), "none": ()}
    given = {"username": username, "password_file": password_file, "token_file": token_file}
    for key in needs[auth]:
        if given[key] is None:
            raise t.fail(key, f'is required with auth = "{auth}"')
    for key, value in given.items():
        if value is not None and key not in needs[auth]:
            raise t.fail(key, f'is not used with auth = "{auth}"; remove it or set auth = '
                              f'"{"bearer" if key == "token_file" else "basic"}"')
    if ca_file is not None and not url.lower().startswith("https://"):
        raise t.fail("ca_file", "is only used with an https:// url")
    for key in ("ae_title", "host", "port", "tls", "calling_ae_title", "echo_interval_seconds"):
        if key in t.data:
            raise t.fail(key, f'is for C-STORE destinations; a kind = "{kind}" destination '
                              "takes url (and auth, ca_file)")
    name = t.string("name", url, check=_check_name)
    timeout = t.number("timeout_seconds", 30.0, minimum=0, exclusive_minimum=True)
    target = dict(url=url.rstrip("/"), auth=auth, username=username,
                  password_file=password_file, token_file=token_file, ca_file=ca_file)
    if kind == "fhir":
        system = t.optional_string("patient_id_system", check=_check_uri)
        t.finish()
        return Destination(name=name, ae_title="", host="", port=0, timeout_seconds=timeout,
                           fhir=FhirTarget(**target, patient_id_system=system))
    t.finish()
    return Destination(name=name, ae_title="", host="", port=0, timeout_seconds=timeout,
                       dicomweb=DicomWebTarget(**target))


def _parse_hl7_destination(t: _Table, base_dir: Path) -> Destination:
    """A kind = "hl7" [[destinations]] block: the RIS's MLLP host and port, TLS, the MSH
    application and facility names its interface expects."""
    for key in ("ae_title", "calling_ae_title", "echo_interval_seconds", "url"):
        if key in t.data:
            raise t.fail(key, 'is not used by a kind = "hl7" destination; it takes host, port '
                              "(and tls, receiving_application, receiving_facility, "
                              "sending_facility, processing_id, charset)")
    host = t.string("host", "", check=_check_host)
    port = t.integer("port", 0, minimum=1, maximum=65535)
    for key, value in (("host", host), ("port", port)):
        if not value:
            raise t.fail(key, 'is required: a kind = "hl7" destination needs the host and port '
                              "the RIS takes HL7 messages on (MLLP)")
    name = t.string("name", f"hl7@{host}:{port}", check=_check_name)
    timeout = t.number("timeout_seconds", 30.0, minimum=0, exclusive_minimum=True)
    tls = _parse_destination_tls(t, base_dir)
    charset = _hl7_charset(t.string("charset", "UTF-8", check=_check_hl7_charset))
    names = {key: t.string(key, "", check=_check_hl7_name)
             for key in ("sending_facility", "receiving_application", "receiving_facility")}
    for key, value in names.items():
        if not fits_charset(value, HL7_CHARSETS[charset][1]):
            raise t.fail(key, f"has characters outside {charset}, the destination's charset")
    target = Hl7Target(**names, charset=charset,
                       processing_id=t.string("processing_id", "p",
                                              choices=HL7_PROCESSING_IDS).upper())
    t.finish()
    return Destination(name=name, ae_title="", host=host, port=port, timeout_seconds=timeout,
                       tls=tls, hl7=target)


# Other spellings of the HL7_CHARSETS keys a RIS's interface specification may use
_HL7_CHARSET_ALIASES = {"UNICODE UTF-8": "UTF-8"}


def _hl7_charset(value: str) -> str:
    """The HL7_CHARSETS key `value` names (any case; "UNICODE UTF-8" as MSH-18 spells it)."""
    value = value.strip().upper()
    return _HL7_CHARSET_ALIASES.get(value, value)


def _check_hl7_charset(value: str) -> str | None:
    if _hl7_charset(value) in HL7_CHARSETS:
        return None
    return (f"{value!r} is not one of 'UTF-8', '8859/1' (ISO 8859-1, Latin-1), 'ASCII' "
            "(as HL7 table 0211 names them in MSH-18)")


def fits_charset(value: str, codec: str) -> bool:
    """Whether `value` can be encoded with `codec` (a name of HL7_CHARSETS' codecs)."""
    try:
        value.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _check_hl7_name(value: str) -> str | None:
    """An MSH application or facility name (HD namespace ID: IS, at most 20 characters)."""
    if len(value) > 20:
        return f"at most 20 characters (HL7 HD namespace ID), got {len(value)}"
    if any(character in value for character in "|^~\\&") or not value.isprintable():
        return "must not contain the HL7 delimiters | ^ ~ \\ & or control characters"
    return None


def _check_uri(value: str) -> str | None:
    from urllib.parse import urlsplit

    if not urlsplit(value).scheme or any(character.isspace() for character in value):
        return ('expected a URI without spaces, e.g. "urn:oid:1.2.3.4" or '
                '"https://hospital.example.org/mrn"')
    return None


def _check_http_url(value: str) -> str | None:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return 'expected an http:// or https:// URL, e.g. "https://pacs.example.org/dicom-web"'
    if parts.query or parts.fragment:
        return "the URL takes no ?query or #fragment (the DICOMweb root or FHIR base)"
    return None


def _parse_destination_tls(t: _Table, base_dir: Path) -> TLSFiles | None:
    present, value = t._raw("tls")
    if not present or value is False:
        return None
    if value is True:
        return TLSFiles()
    sub = _Table(value, f"{t.name} tls")
    files = TLSFiles(cert_file=sub.path("cert_file", None, base_dir, must_exist=True),
                     key_file=sub.path("key_file", None, base_dir, must_exist=True),
                     ca_file=sub.path("ca_file", None, base_dir, must_exist=True))
    if (files.cert_file is None) != (files.key_file is None):
        raise sub.fail("cert_file", "cert_file and key_file go together (client certificate)")
    sub.finish()
    return files


def _check_name(value: str) -> str | None:
    if not value.strip() or len(value) > 100:
        return "a destination name must be 1 to 100 characters"
    return None
