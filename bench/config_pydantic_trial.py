"""Issue 25 item 4's trial: pacs_ai.config with its schema validated by pydantic 2.

The same dataclasses, keys, defaults and messages as pacs_ai.config (copied from it at
13ac651), the hand-written readers replaced by pydantic validation of the dataclasses
themselves (TypeAdapter over stdlib dataclasses with annotated fields) and a translation of
pydantic's errors into the one line pacs_ai.config prints. Not used by the service: evidence
for docs/architecture.md "Why the config is validated by hand"; bench/config_library_trial.py
runs the tests' error cases through both. Needs pydantic 2 on the path (see that script).

pacs_ai.config's own docstring follows.

The service's configuration: one TOML file, validated at start-up.

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
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import (AfterValidator, BeforeValidator, ConfigDict, Discriminator, Field,
                      PlainValidator, Strict, StrictBool, StrictInt, StrictStr, Tag, TypeAdapter,
                      ValidationError, ValidationInfo)
from pydantic_core import PydanticCustomError

from pacs_ai.dicom_constants import DEFAULT_SR_KIND, FILM_SOP_CLASSES, SOP_CLASS_KEYWORDS, SR_KINDS
from pacs_ai.errors import UserError

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


def unknown_key(where: str, key: str, known: Iterable[str]) -> ConfigError:
    """The error for a key `where` does not take, with the closest known key if one is close
    (`ae_tile`: did you mean 'ae_title'?)."""
    known = list(dict.fromkeys(known))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; the keys of {where} are: "
                       f"{', '.join(known)} (see deploy/pacs-ai.toml)")



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



def _check_sha256(value: str) -> str | None:
    if SHA256_HEX.match(value.strip().lower()) is None:
        return ("expected the model file's SHA-256 as 64 hexadecimal digits (the line "
                "`pacs-ai evaluate` proposes, or `sha256sum FILE`)")
    return None



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


def _check_name(value: str) -> str | None:
    if not value.strip() or len(value) > 100:
        return "a destination name must be 1 to 100 characters"
    return None


# --- what pydantic checks a value with ---------------------------------------------------------
# Every table: no unknown key, no nan or inf. Types are strict (no "11112" for 11112, no 1 for
# true); an int is taken where a float is expected.
TABLE = ConfigDict(extra="forbid", allow_inf_nan=False)


def _problem(text: str) -> PydanticCustomError:
    """A problem with the value being validated, in our words (braces in `text` are safe)."""
    return PydanticCustomError("config", "{text}", {"text": text})


def _key_problem(key: str, text: str) -> PydanticCustomError:
    """A problem a table-wide rule finds, naming the key to fix."""
    return PydanticCustomError("config_key", "{text}", {"key": key, "text": text})


def checked(check: Callable[[str], str | None]) -> AfterValidator:
    """One of the check_* functions (problem or None) as a pydantic validator."""
    def validate(value: str) -> str:
        if (problem := check(value)) is not None:
            raise _problem(problem)
        return value
    return AfterValidator(validate)


def choice(*options: str) -> Any:
    """A string compared without case, read as lower case."""
    def validate(value: str) -> str:
        if value.lower() not in options:
            raise _problem(f"{value!r} is not one of {', '.join(map(repr, options))}")
        return value.lower()
    return Annotated[StrictStr, AfterValidator(validate)]


def file_path(must_exist: bool) -> BeforeValidator:
    """A path relative to the config file's folder (context base_dir)."""
    def validate(value: Any, info: ValidationInfo) -> Path:
        if not isinstance(value, (str, Path)) or not str(value).strip():
            raise _problem(f"expected a file path as a quoted string, got {_describe(value)}")
        resolved = (info.context["base_dir"] / Path(value).expanduser()).resolve()
        if must_exist and not resolved.is_file():
            raise _problem(f"file not found: {resolved}; fix the path or remove the key")
        return resolved
    return BeforeValidator(validate)


def auto_or_count(minimum: int, maximum: int) -> PlainValidator:
    def validate(value: Any) -> int | str:
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if isinstance(value, bool) or not isinstance(value, int):
            raise _problem(f'expected "auto" or a whole number without quotes, got '
                           f"{_describe(value)}")
        if not minimum <= value <= maximum:
            bound = "at least" if value < minimum else "at most"
            raise _problem(f"must be {bound} {min(max(value, minimum), maximum)}, got {value}")
        return value
    return PlainValidator(validate)


def one_or_more(item: Any) -> Any:
    """[[routes]] match values: a string or a list of them, none empty, stripped."""
    def listed(value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def stripped(values: tuple[str, ...]) -> tuple[str, ...]:
        if not values or not all(v.strip() for v in values):
            raise _problem('expected a quoted string or a list of them like ["A", "B"]')
        return tuple(v.strip() for v in values)
    return Annotated[tuple[item, ...], BeforeValidator(listed), AfterValidator(stripped)]


def _filled(value: str) -> str:
    if not value.strip():
        raise _problem("is empty; give a value or remove the key")
    return value.strip()


def _sop_uids(values: tuple[str, ...]) -> tuple[str, ...]:
    if not values:
        raise _problem('must list at least one SOP class, e.g. ["ComputedRadiographyImageStorage"]')
    return tuple(SOP_CLASS_KEYWORDS.get(v, v) for v in values)


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise _problem(f"[{pair[0]:g}, {pair[1]:g}]: expected 0 <= low <= high <= 1")
    return pair


AETitle = Annotated[StrictStr, checked(check_ae_title)]
Host = Annotated[StrictStr, checked(_check_host)]
Network = Annotated[StrictStr, checked(check_network)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Positive = Annotated[float, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Age = Annotated[float, Strict(), Field(ge=0, le=MAX_AGE_YEARS)]
File = Annotated[Path, file_path(must_exist=True)]
AnyFile = Annotated[Path, file_path(must_exist=False)]
Filled = Annotated[StrictStr, AfterValidator(_filled)]
Sha256 = Annotated[StrictStr, checked(_check_sha256), AfterValidator(str.lower)]
SopClasses = Annotated[tuple[Annotated[StrictStr, checked(check_sop_class)], ...],
                       AfterValidator(_sop_uids)]
Name = Annotated[StrictStr, checked(_check_name)]
Hl7Name = Annotated[StrictStr, checked(_check_hl7_name)]
HttpUrl = Annotated[StrictStr, checked(_check_http_url)]
Uri = Annotated[StrictStr, checked(_check_uri)]



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
    __pydantic_config__ = TABLE
    ae_title: AETitle = DEFAULT_AE_TITLE
    host: Host = "0.0.0.0"
    port: Port = DEFAULT_PORT
    # The calling AE titles that may associate; a BoundAETitle entry only from its address.
    # Empty refuses every caller unless accept_any_calling_ae says otherwise: an installed
    # service listens on every interface, so being open to any host must be a stated choice.
    allowed_calling_ae_titles: Annotated[tuple[str | BoundAETitle, ...],
                                         PlainValidator(_calling_ae_titles)] = ()
    accept_any_calling_ae: StrictBool = False  # True: any calling AE title (a warning at each start)
    check_called_ae_title: StrictBool = True  # reject associations addressed to another AE title
    allowed_peer_addresses: tuple[Network, ...] = ()  # IPs or CIDR networks; empty: any address
    # dotted UIDs; the config accepts SOP_CLASS_KEYWORDS' keywords too
    sop_classes: SopClasses = FILM_SOP_CLASSES

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
    __pydantic_config__ = TABLE
    max_associations: Annotated[StrictInt, Field(ge=1, le=1000)] = 10
    max_pdu_bytes: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] = 1048576  # 0: no limit
    max_pixels: Annotated[StrictInt, Field(ge=4)] = DEFAULT_MAX_PIXELS
    acse_timeout_seconds: Positive = 30.0
    dimse_timeout_seconds: Positive = 60.0
    network_timeout_seconds: Positive = 60.0
    shutdown_grace_seconds: NonNegative = 10.0
    # A connection that sends no A-ASSOCIATE-RQ within this many seconds (TLS handshake
    # included) is dropped: modalities send it at once, idle and half-open connections do not.
    association_request_timeout_seconds: Positive = 5.0
    # Open connections one peer address may hold (the global cap is 2 x max_associations);
    # parse_config's default is max_associations.
    max_connections_per_address: Annotated[StrictInt, Field(ge=1, le=2000)] = 10
    # Largest dataset received, in bytes, as sent and once inflated (a deflated one).
    max_dataset_bytes: Annotated[StrictInt, Field(ge=1024 * 1024, le=2**32 - 1)] = (
        256 * 1024 * 1024)


@dataclass(frozen=True)
class StorageConfig:
    __pydantic_config__ = TABLE
    spool_dir: Annotated[AnyFile, Field(validate_default=True)] = Path("spool")
    min_free_bytes: Annotated[StrictInt, Field(ge=0)] = 256 * 1024 * 1024
    keep_source_images: StrictBool = False
    keep_reports: StrictBool = False
    # Days failed and skipped jobs keep their image and report files; 0: for ever.
    keep_failed_days: NonNegative = 7.0


# A threshold's binding to the model file it was chosen for (pacs_ai.model.site_threshold checks it):
# key names, as the config file and the lines `pacs-ai evaluate` proposes spell them
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
VERSION_KEY = "threshold_model_version"
SHA256_KEY = "threshold_model_sha256"
ANY_MODEL_KEY = "threshold_for_any_model"


@dataclass(frozen=True)
class SiteThreshold:
    """What a config table says about its threshold (all None: the model file's own)."""

    table: str  # "[model]" or "[shadow]", for messages
    value: float | None = None
    model_version: str | None = None  # the version it was chosen for (read by people)
    model_sha256: str | None = None  # the file it was chosen for (what is checked)
    for_any_model: bool = False  # the admin keeps it whatever the file


@dataclass(frozen=True)
class ModelConfig:
    __pydantic_config__ = TABLE
    path: File | None = None  # None: the shipped model (default_model_path)
    # The site's settings over the model file's own; None: the file's (pacs_ai.model.intended_use).
    threshold: Fraction | None = None
    # The model file the threshold was chosen for (pacs_ai.model.site_threshold): start-up refuses
    # it for another file unless threshold_for_any_model
    threshold_model_version: Filled | None = None
    threshold_model_sha256: Sha256 | None = None
    threshold_for_any_model: StrictBool = False
    min_age_years: Age | None = None
    max_age_years: Age | None = None
    ood_threshold: Annotated[float, Strict(), Field(ge=1e-9, le=1e9)] | None = None  # abstain above this out-of-distribution score
    # A film whose header gives no usable age: "classify" (the out-of-distribution gate alone
    # decides) or "skip" (pacs_ai.film.filters). Not the model file's: a site choice, default classify.
    unknown_age: choice(*UNKNOWN_AGE_CHOICES) = UNKNOWN_AGE_CLASSIFY

    @property
    def site_threshold(self) -> SiteThreshold:
        return SiteThreshold("[model]", self.threshold, self.threshold_model_version,
                             self.threshold_model_sha256, self.threshold_for_any_model)


@dataclass(frozen=True)
class ShadowConfig:
    """[shadow]: a candidate model run on every film the live model assesses, its results
    kept in the job store only (pacs_ai.classify.shadow); never reported."""

    __pydantic_config__ = TABLE
    model: File | None = None  # None: no shadow
    # over the shadow file's own values, bound to it as [model]'s are (pacs_ai.model.site_threshold)
    threshold: Fraction | None = None
    threshold_model_version: Filled | None = None
    threshold_model_sha256: Sha256 | None = None
    threshold_for_any_model: StrictBool = False
    ood_threshold: Annotated[float, Strict(), Field(ge=1e-9, le=1e9)] | None = None

    @property
    def site_threshold(self) -> SiteThreshold:
        return SiteThreshold("[shadow]", self.threshold, self.threshold_model_version,
                             self.threshold_model_sha256, self.threshold_for_any_model)


AUTO = "auto"  # [workers] count / processes: derived at start-up (pacs_ai.classify.capacity)


@dataclass(frozen=True)
class WorkersConfig:
    __pydantic_config__ = TABLE
    count: Annotated[int | str, auto_or_count(1, 64)] = AUTO  # an int, or AUTO until the service has sized it
    processes: Annotated[int | str, auto_or_count(0, 64)] = AUTO  # helpers per worker for decoding and SRs; 0: in the worker thread
    batch_size: Annotated[StrictInt, Field(ge=1, le=512)] = 4  # peak memory of a model call: +25 MB at 4, +90 MB at 16; ms/image alike
    torch_threads: Annotated[StrictInt, Field(ge=0, le=256)] = 0  # 0: torch's default


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
    __pydantic_config__ = TABLE
    sop_class_uids: tuple[StrictStr, ...] = FILM_SOP_CLASSES
    # Modality (0008,0060) values to classify.
    modalities: tuple[StrictStr, ...] = ("CR", "DX")
    # Body Part Examined (0018,0015) values meaning chest. "CHEST" is the DICOM term;
    # "THORAX" is what several vendors write.
    body_parts: tuple[StrictStr, ...] = ("CHEST", "THORAX")
    # SNOMED CT Code Values in Anatomic Region Sequence (0008,2218) meaning chest:
    # 816094009 "Chest" (current CID 4031) and 51185008 "Thoracic structure" (its older code).
    anatomic_region_codes: tuple[StrictStr, ...] = ("816094009", "51185008")
    # Classify an image that has neither Body Part Examined nor Anatomic Region Sequence.
    # Off by default: the model is not applied on a guess.
    allow_missing_body_part: StrictBool = False
    # View Position (0018,5101) values of a frontal film.
    view_positions: tuple[StrictStr, ...] = ("PA", "AP")
    # Code Values in View Code Sequence (0054,0220) of a frontal film: SNOMED CT 272479007
    # postero-anterior and 399348003 antero-posterior, and their SNOMED RT forms R-10214, R-10206.
    view_codes: tuple[StrictStr, ...] = ("272479007", "399348003", "R-10214", "R-10206")
    # Classify an image that has neither View Position nor View Code Sequence (several CR
    # readers leave both empty). Off by default, as for the body part.
    allow_missing_view_position: StrictBool = False
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
            if item.type in ("bool", bool, "StrictBool"):
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
    __pydantic_config__ = TABLE
    sr_kind: choice(*SR_KINDS) = DEFAULT_SR_KIND
    # the heat-map image (Secondary Capture) sent with the report of a film reported as
    # pneumonia, when the model gives saliency maps; for normal findings too when asked
    heatmap: StrictBool = True
    heatmap_for_normal: StrictBool = False
    # The priority an HL7 or FHIR destination's result carries when the finding is pneumonia,
    # for the RIS worklist to sort on: "S" (stat), "A" (ASAP), or "none". HL7 table 0485 and
    # FHIR's v3-ActPriority share both codes. A normal finding carries none (never "routine":
    # that could lower the priority of an order a clinician marked urgent).
    pneumonia_priority: Annotated[choice(*PNEUMONIA_PRIORITIES), AfterValidator(
        lambda code: code if code == "none" else code.upper())] = "A"


@dataclass(frozen=True)
class TLSFiles:
    """Certificate files of one TLS end point; None where not given."""

    __pydantic_config__ = TABLE
    cert_file: File | None = None
    key_file: File | None = None
    ca_file: File | None = None


@dataclass(frozen=True)
class ListenerTLSConfig(TLSFiles):
    require_client_cert: StrictBool = False

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
                        "processing_id")
FHIR_DESTINATION_KEYS = DICOMWEB_DESTINATION_KEYS + ("patient_id_system",)
DESTINATION_KEYS = {"dimse": DIMSE_DESTINATION_KEYS, "dicomweb": DICOMWEB_DESTINATION_KEYS,
                    "hl7": HL7_DESTINATION_KEYS, "fhir": FHIR_DESTINATION_KEYS}
DICOMWEB_AUTH = ("none", "basic", "bearer")
HL7_PROCESSING_IDS = ("p", "t", "d")  # MSH-11: production, training, debugging


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

    __pydantic_config__ = TABLE
    initial_delay_seconds: Positive = 10.0
    max_delay_seconds: Positive = 900.0
    max_attempts: Annotated[StrictInt, Field(ge=0)] = 0  # 0: no limit on attempts
    max_age_seconds: NonNegative = 7 * 24 * 3600.0  # 0: no limit on age

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
        exponent = min(max(attempts - 1, 0), 60)
        return min(self.initial_delay_seconds * (2.0 ** exponent), self.max_delay_seconds)

    def exhausted(self, attempts: int, age_seconds: float) -> bool:
        return ((self.max_attempts > 0 and attempts >= self.max_attempts)
                or (self.max_age_seconds > 0 and age_seconds >= self.max_age_seconds))


@dataclass(frozen=True)
class LogConfig:
    __pydantic_config__ = TABLE
    level: choice(*LOG_LEVELS) = "info"
    format: choice(*LOG_FORMATS) = "auto"
    priority_prefix: choice(*LOG_PRIORITY_PREFIXES) = "auto"  # "<N>" syslog priority before each line: auto = under systemd


@dataclass(frozen=True)
class WebConfig:
    """The queue page (/queue) and its JSON (/api/queue), on the [metrics] server."""

    __pydantic_config__ = TABLE
    enabled: StrictBool = True
    token_file: File | None = None  # the retry button's token; None: the page is read-only
    show_accession_number: StrictBool = False
    recent_films: Annotated[StrictInt, Field(ge=1, le=1000)] = 50
    refresh_seconds: Annotated[StrictInt, Field(ge=0, le=3600)] = 15  # the page reloads itself this often (0: never)


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
    __pydantic_config__ = TABLE
    expected_positive_rate: Annotated[tuple[Fraction, Fraction], AfterValidator(_ordered)] = (
        DEFAULT_EXPECTED_POSITIVE_RATE)
    # Share of the films a model assesses that it abstains on (out-of-distribution).
    max_abstention_rate: Fraction = DEFAULT_MAX_ABSTENTION_RATE
    # A day (the chart) or window (the alerts) with fewer films assessed is shown, not judged.
    min_films: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 20
    days: Annotated[StrictInt, Field(ge=1, le=366)] = 28  # the days the queue page's chart covers, today included


@dataclass(frozen=True)
class MetricsConfig:
    __pydantic_config__ = TABLE
    enabled: StrictBool = True
    host: Host = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = DEFAULT_METRICS_PORT


@dataclass(frozen=True)
class StatusConfig:
    """When `pacs-ai status` (exit status 1) and /healthz's needs_admin call for an admin."""

    # A destination that has stored nothing for this long while its deliveries fail.
    __pydantic_config__ = TABLE
    destination_failing_seconds: NonNegative = 900.0
    # Failed jobs count for this long after they failed (0: as long as they are failed).
    failed_jobs_within_seconds: NonNegative = 86400.0


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail (pacs_ai.ops.audit): a JSON-lines file, apart from the operational log."""

    __pydantic_config__ = TABLE
    enabled: StrictBool = True
    path: AnyFile | None = None  # None: <spool_dir>/audit/audit.log
    max_bytes: Annotated[StrictInt, Field(ge=0)] = 50 * 1024 * 1024  # rotate past this size; 0: never rotate
    backup_count: Annotated[StrictInt, Field(ge=0, le=1000)] = 20  # rotated files kept (audit.log.1 ... .20)
    include_patient_id: StrictBool = False  # the Patient ID in transfer records (never the name)

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


# --- parsing: the file's shape, the rules across keys, pydantic's errors as our one line -------

def _calling_ae_titles(value: Any) -> tuple[str | BoundAETitle, ...]:
    """[listener] allowed_calling_ae_titles: plain AE titles, or inline tables
    { ae_title = "CR1", address = "10.1.2.0/24" } binding a title to an IP address or network
    (one title may have several entries; it cannot also be listed plain)."""
    example = ('expected a list of quoted AE titles or { ae_title = "CR1", address = '
               '"10.1.2.0/24" } tables, like ["A", { ae_title = "B", address = "10.0.0.5" }]')
    if not isinstance(value, (list, tuple)):
        raise _problem(f"{example}, got {_describe(value)}")
    entries: list[str | BoundAETitle] = []
    for item in value:
        if isinstance(item, str):
            title = item
            entries.append(title)
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"ae_title", "address"})
            if unknown:
                raise _problem(f"unknown key {unknown[0]!r} in {item!r}; an entry's keys are "
                               "ae_title and address")
            title, address = item.get("ae_title"), item.get("address")
            if not isinstance(title, str):
                raise _problem(f"{item!r}: ae_title must be a quoted AE title, "
                               f"got {_describe(title)}")
            if not isinstance(address, str):
                raise _problem(f"{item!r}: address must be a quoted IP address or network "
                               f'like "10.1.2.0/24", got {_describe(address)}')
            if (problem := check_network(address)) is not None:
                raise _problem(f"{title!r} address {address!r}: {problem}")
            entries.append(BoundAETitle(title, address))
        else:
            raise _problem(f"{example}, got the entry {_describe(item)}")
        if (problem := check_ae_title(title)) is not None:
            raise _problem(f"{title!r}: {problem}")
    plain = {entry for entry in entries if isinstance(entry, str)}
    if both := sorted(plain & {e.ae_title for e in entries if isinstance(e, BoundAETitle)}):
        raise _problem(f"{both[0]!r} is listed both plain (any address) and bound to an "
                       "address; keep one form")
    return tuple(entries)


def _listener_rules(listener: ListenerConfig) -> ListenerConfig:
    if listener.accept_any_calling_ae and listener.allowed_calling_ae_titles:
        raise _key_problem("accept_any_calling_ae", "true, yet allowed_calling_ae_titles names "
                           "callers; keep the list (only those may store) or remove it (any "
                           "caller may)")
    return listener


def _connections_follow_associations(table: Any) -> Any:
    """The per-address cap follows max_associations unless set."""
    if isinstance(table, dict) and "max_associations" in table:
        return {"max_connections_per_address": table["max_associations"], **table}
    return table


def _limits_rules(limits: LimitsConfig) -> LimitsConfig:
    if 0 < limits.max_pdu_bytes < 4096:
        raise _key_problem("max_pdu_bytes", "must be 0 (no limit) or at least 4096")
    return limits


def _threshold_rules(table: ModelConfig | ShadowConfig) -> None:
    """threshold and the keys that bind it to a model file (pacs_ai.model.site_threshold)."""
    bound = (table.threshold_model_version is not None, table.threshold_model_sha256 is not None)
    if any(bound) and table.threshold is None:
        key = VERSION_KEY if bound[0] else SHA256_KEY
        raise _key_problem(key, "is set but threshold is not: it says which model file a "
                                "threshold was chosen for; remove it, or add the threshold")
    if bound[0] != bound[1]:
        missing = SHA256_KEY if bound[0] else VERSION_KEY
        raise _key_problem(missing, f"missing: {VERSION_KEY} and {SHA256_KEY} go together (the "
                                    "lines `pacs-ai evaluate` proposes set both)")
    if table.threshold_for_any_model and any(bound):
        raise _key_problem(ANY_MODEL_KEY, f"true, yet {SHA256_KEY} binds the threshold to one "
                                          "model file; keep one of them")
    if table.threshold_for_any_model and table.threshold is None:
        raise _key_problem(ANY_MODEL_KEY, "is set but threshold is not; remove it, or add the "
                                          "threshold")


def _model_rules(model: ModelConfig) -> ModelConfig:
    _threshold_rules(model)
    if (model.min_age_years is not None and model.max_age_years is not None
            and model.min_age_years > model.max_age_years):
        raise _key_problem("min_age_years", f"{model.min_age_years:g} is above max_age_years "
                                            f"{model.max_age_years:g}")
    return model


def _shadow_rules(shadow: ShadowConfig) -> ShadowConfig:
    _threshold_rules(shadow)
    if shadow.model is None and shadow != ShadowConfig():
        key = next(f.name for f in dataclasses.fields(shadow)
                   if getattr(shadow, f.name) != f.default)
        raise _key_problem(key, 'is set but model is not: [shadow] model = "PATH" names the '
                                "candidate model file to run in shadow; add it, or remove the "
                                "table")
    return shadow


def _retry_rules(retry: RetryPolicy) -> RetryPolicy:
    if retry.max_delay_seconds < retry.initial_delay_seconds:
        raise _key_problem("max_delay_seconds", "must be at least initial_delay_seconds")
    if retry.max_attempts == 0 and retry.max_age_seconds == 0:
        raise _key_problem("max_attempts", "max_attempts and max_age_seconds are both 0, so a "
                           "report for a destination that never comes back would be retried "
                           "forever; set at least one of them")
    return retry


def _tls_rules(tls: ListenerTLSConfig) -> ListenerTLSConfig:
    if (tls.cert_file is None) != (tls.key_file is None):
        raise _key_problem("cert_file", "cert_file and key_file go together: set both to enable "
                                        "TLS, or neither")
    if tls.require_client_cert and tls.ca_file is None:
        raise _key_problem("require_client_cert", "needs ca_file, the CA that signs client "
                                                  "certificates")
    if (tls.ca_file is not None or tls.require_client_cert) and tls.cert_file is None:
        raise _key_problem("ca_file", "TLS settings without cert_file and key_file; set both "
                                      "to enable TLS")
    return tls


def _audit_rules(audit: AuditConfig) -> AuditConfig:
    if 0 < audit.max_bytes < 64 * 1024:
        raise _key_problem("max_bytes", "must be 0 (never rotate) or at least 65536 (64 KiB)")
    if audit.max_bytes and not audit.backup_count:
        raise _key_problem("backup_count", "must be at least 1 when max_bytes is set (the "
                                           "rotated files kept); for no rotation set max_bytes = 0")
    return audit


def _only_filter_keys(table: Any) -> Any:
    """[filters] takes FilterPolicy's config fields, not the model's intended age."""
    if isinstance(table, dict):
        for key in sorted(set(table) - set(FilterPolicy.field_names())):
            raise PydanticCustomError("unknown_key", "unknown key", {"key": key})
    return table


def _client_pair(files: TLSFiles) -> TLSFiles:
    if (files.cert_file is None) != (files.key_file is None):
        raise _key_problem("cert_file", "cert_file and key_file go together (client "
                                        "certificate)")
    return files


DestinationTLS = Annotated[
    Annotated[StrictBool, Tag("flag")] | Annotated[TLSFiles, AfterValidator(_client_pair),
                                                   Tag("files")],
    Discriminator(lambda value: "flag" if isinstance(value, bool) else "files")]


@dataclass(frozen=True)
class DimseDestination:
    __pydantic_config__ = TABLE
    ae_title: AETitle
    host: Host
    port: Port
    kind: StrictStr = "dimse"
    name: Name | None = None
    calling_ae_title: AETitle | None = None
    timeout_seconds: Positive = 30.0
    echo_interval_seconds: NonNegative = 0.0
    tls: DestinationTLS | None = None


@dataclass(frozen=True)
class HttpDestination:
    __pydantic_config__ = TABLE
    url: HttpUrl
    kind: StrictStr = "dicomweb"
    name: Name | None = None
    auth: choice(*DICOMWEB_AUTH) = "none"
    username: StrictStr | None = None
    password_file: File | None = None
    token_file: File | None = None
    ca_file: File | None = None
    timeout_seconds: Positive = 30.0


@dataclass(frozen=True)
class FhirDestination(HttpDestination):
    patient_id_system: Annotated[Uri, AfterValidator(_filled)] | None = None


@dataclass(frozen=True)
class Hl7Destination:
    __pydantic_config__ = TABLE
    host: Host
    port: Port
    kind: StrictStr = "hl7"
    name: Name | None = None
    timeout_seconds: Positive = 30.0
    tls: DestinationTLS | None = None
    sending_facility: Hl7Name = ""
    receiving_application: Hl7Name = ""
    receiving_facility: Hl7Name = ""
    processing_id: Annotated[choice(*HL7_PROCESSING_IDS), AfterValidator(str.upper)] = "P"


def _echo_rules(entry: DimseDestination) -> DimseDestination:
    if 0 < entry.echo_interval_seconds < 10:
        raise _key_problem("echo_interval_seconds", "must be 0 (no C-ECHO) or at least 10 "
                                                    "seconds")
    return entry


def _auth_rules(entry: HttpDestination) -> HttpDestination:
    needs = {"basic": ("username", "password_file"), "bearer": ("token_file",), "none": ()}
    for key in needs[entry.auth]:
        if getattr(entry, key) is None:
            raise _key_problem(key, f'is required with auth = "{entry.auth}"')
    for key in ("username", "password_file", "token_file"):
        if getattr(entry, key) is not None and key not in needs[entry.auth]:
            raise _key_problem(key, f'is not used with auth = "{entry.auth}"; remove it or set '
                                    f'auth = "{"bearer" if key == "token_file" else "basic"}"')
    if entry.ca_file is not None and not entry.url.lower().startswith("https://"):
        raise _key_problem("ca_file", "is only used with an https:// url")
    return entry


def _kind(entry: Any) -> str | None:
    return str(entry.get("kind", "dimse")).lower() if isinstance(entry, dict) else None


AnyDestination = Annotated[
    Annotated[DimseDestination, AfterValidator(_echo_rules), Tag("dimse")]
    | Annotated[HttpDestination, AfterValidator(_auth_rules), Tag("dicomweb")]
    | Annotated[FhirDestination, AfterValidator(_auth_rules), Tag("fhir")]
    | Annotated[Hl7Destination, Tag("hl7")],
    Discriminator(_kind)]


def _not_default_route(name: str) -> str | None:
    if name == DEFAULT_ROUTE:
        return f"{DEFAULT_ROUTE!r} is the name of films that match no route; choose another"
    return _check_name(name)


@dataclass(frozen=True)
class RouteTable:
    __pydantic_config__ = TABLE
    destinations: tuple[StrictStr, ...]
    name: Annotated[StrictStr, checked(_not_default_route)] | None = None
    calling_ae_title: one_or_more(AETitle) = ()
    source_address: one_or_more(Network) = ()
    modality: one_or_more(StrictStr) = ()
    station_name: one_or_more(StrictStr) = ()


@dataclass(frozen=True)
class RoutingTable:
    __pydantic_config__ = TABLE
    default: tuple[StrictStr, ...] | None = None


@dataclass(frozen=True)
class ConfigFile:
    """The file as written: the tables in TOP_LEVEL_TABLES order (the first problem reported
    is the first table's)."""

    __pydantic_config__ = TABLE
    listener: Annotated[ListenerConfig, AfterValidator(_listener_rules)]
    limits: Annotated[LimitsConfig, BeforeValidator(_connections_follow_associations),
                      AfterValidator(_limits_rules)]
    storage: StorageConfig
    model: Annotated[ModelConfig, AfterValidator(_model_rules)]
    shadow: Annotated[ShadowConfig, AfterValidator(_shadow_rules)]
    workers: WorkersConfig
    filters: Annotated[FilterPolicy, BeforeValidator(_only_filter_keys)]
    report: ReportConfig
    destinations: tuple[AnyDestination, ...]
    retry: Annotated[RetryPolicy, AfterValidator(_retry_rules)]
    log: LogConfig
    metrics: MetricsConfig
    tls: Annotated[ListenerTLSConfig, AfterValidator(_tls_rules)]
    status: StatusConfig
    audit: Annotated[AuditConfig, AfterValidator(_audit_rules)]
    routes: tuple[RouteTable, ...]
    routing: RoutingTable
    web: WebConfig
    drift: DriftConfig


TOP_LEVEL_TABLES = tuple(f.name for f in dataclasses.fields(ConfigFile))
EMPTY_FILE = {name: [] if name in ("destinations", "routes") else {} for name in TOP_LEVEL_TABLES}
_FILE = TypeAdapter(ConfigFile)


def parse_config(data: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    """Build a Config from parsed TOML; raise ConfigError naming the first problem."""
    try:
        file = _FILE.validate_python({**EMPTY_FILE, **data}, context={"base_dir": base_dir})
    except ValidationError as error:
        raise ConfigError(_first_problem(error)) from None
    destinations = tuple(_destination(entry, file.listener.ae_title)
                         for entry in file.destinations)
    _refuse_duplicates("destinations", [d.name for d in destinations])
    tables = {f.name: getattr(file, f.name) for f in dataclasses.fields(file)}
    tables.update(destinations=destinations, routing=_routing(file, destinations))
    del tables["routes"]
    return Config(**tables, source=source)


def _destination(entry: Any, listener_ae_title: str) -> Destination:
    if isinstance(entry, HttpDestination):
        target = dict(url=entry.url.rstrip("/"), auth=entry.auth, username=entry.username or None,
                      password_file=entry.password_file, token_file=entry.token_file,
                      ca_file=entry.ca_file)
        http = (dict(fhir=FhirTarget(**target, patient_id_system=entry.patient_id_system))
                if isinstance(entry, FhirDestination) else dict(dicomweb=DicomWebTarget(**target)))
        return Destination(name=entry.name or entry.url, ae_title="", host="", port=0,
                           timeout_seconds=entry.timeout_seconds, **http)
    tls = TLSFiles() if entry.tls is True else entry.tls or None
    if isinstance(entry, Hl7Destination):
        hl7 = Hl7Target(entry.sending_facility, entry.receiving_application,
                        entry.receiving_facility, entry.processing_id)
        return Destination(name=entry.name or f"hl7@{entry.host}:{entry.port}", ae_title="",
                           host=entry.host, port=entry.port, timeout_seconds=entry.timeout_seconds,
                           tls=tls, hl7=hl7)
    return Destination(name=entry.name or f"{entry.ae_title}@{entry.host}:{entry.port}",
                       ae_title=entry.ae_title, host=entry.host, port=entry.port,
                       calling_ae_title=entry.calling_ae_title or listener_ae_title,
                       timeout_seconds=entry.timeout_seconds, tls=tls,
                       echo_interval_seconds=entry.echo_interval_seconds)


def _routing(file: ConfigFile, destinations: tuple[Destination, ...]) -> RoutingConfig:
    """[[routes]] and [routing] default, checked against the destinations' names."""
    known = [d.name for d in destinations]

    def named(where: str, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if name not in known:
                raise ConfigError(f"{where}: {name!r} is not the name of a [[destinations]] "
                                  f"block; the destinations are "
                                  f"{', '.join(map(repr, known)) or 'none'}")
        return tuple(dict.fromkeys(names))

    routes = []
    for index, table in enumerate(file.routes, start=1):
        name = table.name or f"route-{index}"
        route = Route(name=name, destinations=named(f"[[routes]] #{index} destinations",
                                                    table.destinations),
                      calling_ae_title=table.calling_ae_title,
                      source_address=table.source_address,
                      modality=tuple(v.upper() for v in table.modality),
                      station_name=table.station_name)
        if not any(getattr(route, key) for key in ROUTE_MATCH_KEYS):
            raise ConfigError(f"[[routes]] #{index} ({name}): give at least one of "
                              f"{', '.join(ROUTE_MATCH_KEYS)}; a route that matches every "
                              "film is [routing] default")
        routes.append(route)
    _refuse_duplicates("routes", [route.name for route in routes])
    default = file.routing.default
    return RoutingConfig(routes=tuple(routes), default=None if default is None
                         else named("[routing] default", default))


def _refuse_duplicates(table: str, names: list[str]) -> None:
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"[[{table}]]: two {table} are named {duplicates[0]!r}; give each a "
                          'distinct name = "..."')


# pydantic's error types, in the words pacs_ai.config uses ({got}: the value and its TOML type)
WORDS = {
    "int_type": "expected a whole number without quotes, got {got}",
    "float_type": "expected a number without quotes, got {got}",
    "finite_number": "expected a number without quotes, got {got}",
    "bool_type": "expected true or false (no quotes), got {got}",
    "string_type": 'expected a quoted string, got {got}; write {key} = "..."',
    "tuple_type": 'expected a list of quoted strings like ["A", "B"], got {got}',
    "too_short": "expected [low, high], two numbers without quotes, got {got}",
    "too_long": "expected [low, high], two numbers without quotes, got {got}",
    "greater_than_equal": "must be at least {ge}, got {input}",
    "less_than_equal": "must be at most {le}, got {input}",
    "greater_than": "must be greater than {gt}, got {input}",
    "value_error": "{error}",
    "config": "{text}",
    "config_key": "{text}",
}
UNKNOWN = ("unexpected_keyword_argument", "unknown_key")
TAGS = ("dimse", "dicomweb", "fhir", "hl7", "flag", "files")
REQUIRED = {
    "dimse": "is required: every destination needs ae_title, host and port",
    "hl7": 'is required: a kind = "hl7" destination needs the host and port the RIS takes HL7 '
           "messages on (MLLP)",
    "dicomweb": 'is required for kind = "dicomweb": the DICOMweb root, e.g. '
                '"https://pacs.example.org/dicom-web"',
    "fhir": 'is required for kind = "fhir": the FHIR base URL, e.g. '
            '"https://ehr.example.org/fhir/r4"',
    "routes": "is required: the destinations that get these reports ([] for none)",
}
C_STORE_ONLY = ("ae_title", "host", "port", "tls", "calling_ae_title", "echo_interval_seconds")
HTTP_TAKES = 'is for C-STORE destinations; a kind = "{}" destination takes url (and auth, ca_file)'
NOT_FOR = {  # keys of another kind of destination: what to say instead of "unknown key"
    "dicomweb": (C_STORE_ONLY, HTTP_TAKES.format("dicomweb")),
    "fhir": (C_STORE_ONLY, HTTP_TAKES.format("fhir")),
    "hl7": (("ae_title", "calling_ae_title", "echo_interval_seconds", "url"),
            'is not used by a kind = "hl7" destination; it takes host, port (and tls, '
            "receiving_application, receiving_facility, sending_facility, processing_id)"),
}


def _first_problem(error: ValidationError) -> str:
    """The first problem (tables in file order, an unknown key before the others in its table)
    as the one line pacs_ai.config prints."""
    def rank(e: Any) -> tuple[int, int, bool]:
        loc = e["loc"]
        table = TOP_LEVEL_TABLES.index(loc[0]) if loc and loc[0] in TOP_LEVEL_TABLES else -1
        entry = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        return table, entry, e["type"] not in UNKNOWN
    return _message(min(error.errors(), key=rank))


def _message(e: Any) -> str:
    kind, given, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    loc = [part for part in e["loc"] if part not in TAGS]
    if kind in UNKNOWN and len(loc) == 1 and "key" not in ctx:
        close = difflib.get_close_matches(loc[0], TOP_LEVEL_TABLES, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        return (f"unknown table or key {loc[0]!r} at the top level{hint}; the tables are "
                f"{', '.join(f'[{name}]' for name in TOP_LEVEL_TABLES)}")
    table, block = loc[0], e["loc"][2] if len(e["loc"]) > 2 else None
    if table in ("destinations", "routes"):
        if len(loc) == 1:
            one = "PACS" if table == "destinations" else "rule"
            return f"{table} must be written as [[{table}]] blocks, one per {one}"
        where, rest = f"[[{table}]] #{loc[1] + 1}", loc[2:]
    else:
        where, rest = f"[{table}]", loc[1:]
    if len(rest) > 1 and isinstance(rest[1], str):  # a table in the table: a destination's tls
        where, rest = f"{where} {rest[0]}", rest[1:]
    key = ctx.get("key") or (rest[0] if rest else None)
    if kind == "union_tag_invalid":
        return f"{where} kind: {ctx['tag']!r} is not one of {', '.join(map(repr, DESTINATION_KINDS))}"
    if kind in UNKNOWN and key in NOT_FOR.get(block, ((),))[0]:
        return f"{where} {key}: {NOT_FOR[block][1]}"
    if kind in UNKNOWN:
        known = (DESTINATION_KEYS[block] if table == "destinations" and rest[0] != "tls" else
                 FilterPolicy.field_names() if table == "filters" else
                 [f.name for f in dataclasses.fields(
                     TLSFiles if where.endswith(" tls") else _TABLES[table])])
        return str(unknown_key(where, key, known))
    if key is None:
        return (f"{where} must be a table, e.g. {where} on its own line followed by key = value "
                f"lines, got {_describe(given)}")
    if kind == "missing":
        text = REQUIRED.get(block if table == "destinations" else table, "is required")
    else:
        bounds = {name: int(v) if isinstance(v, float) and v.is_integer() else v
                  for name, v in ctx.items()}  # 0, not pydantic's 0.0
        text = WORDS.get(kind, "{msg}").format_map(
            {**bounds, "msg": e["msg"], "got": _describe(given), "key": key, "input": given})
    if len(rest) > 1 and isinstance(rest[1], int):  # one item of a list
        text = f"{given!r}: {text}"
    return f"{where} {key}: {text}"


_TABLES = {"listener": ListenerConfig, "limits": LimitsConfig, "storage": StorageConfig,
           "model": ModelConfig, "shadow": ShadowConfig, "workers": WorkersConfig,
           "report": ReportConfig, "retry": RetryPolicy, "log": LogConfig,
           "metrics": MetricsConfig, "tls": ListenerTLSConfig, "status": StatusConfig,
           "audit": AuditConfig, "routes": RouteTable, "routing": RoutingTable, "web": WebConfig,
           "drift": DriftConfig}
