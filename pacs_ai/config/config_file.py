"""The whole configuration (:class:`Config`) and reading a TOML file into it: one reader per
table, the rules across keys, and the built-in default when there is no file.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pacs_ai.config.defaults import (LOG_FORMATS, LOG_LEVELS, LOG_PRIORITY_PREFIXES, MAX_AGE_YEARS,
                                     UNKNOWN_AGE_CHOICES, default_model_path)
from pacs_ai.config.destinations import (PNEUMONIA_PRIORITIES, Destination, RoutingConfig,
                                         parse_destinations, parse_routing)
from pacs_ai.config.reader import (ConfigError, Table, check_ae_title, check_host, check_network,
                                   check_sop_class, describe)
from pacs_ai.config.tables import (ANY_MODEL_KEY, SHA256_HEX, SHA256_KEY, VERSION_KEY, AuditConfig,
                                   BoundAETitle, DriftConfig, FilterPolicy, LimitsConfig,
                                   ListenerConfig, ListenerTLSConfig, LogConfig, MetricsConfig,
                                   ModelConfig, ReportConfig, RetryPolicy, ShadowConfig,
                                   StatusConfig, StorageConfig, WebConfig, WorkersConfig)
from pacs_ai.dicom_constants import SOP_CLASS_KEYWORDS, SR_KINDS

T = TypeVar("T")


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
    routing: RoutingConfig = field(default_factory=RoutingConfig)
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
        t = Table(data.get(name, {}), f"[{name}]")
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


def _read_listener(t: Table) -> ListenerConfig:
    d = ListenerConfig
    listener = ListenerConfig(
        ae_title=t.string("ae_title", d.ae_title, check=check_ae_title),
        host=t.string("host", d.host, check=check_host),
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


def _calling_ae_titles(t: Table) -> tuple[str | BoundAETitle, ...]:
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
        raise t.fail(key, f"{example}, got {describe(value)}")
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
                                  f"got {describe(title)}")
            if not isinstance(address, str):
                raise t.fail(key, f"{item!r}: address must be a quoted IP address or network "
                                  f'like "10.1.2.0/24", got {describe(address)}')
            if (problem := check_network(address)) is not None:
                raise t.fail(key, f"{title!r} address {address!r}: {problem}")
            entries.append(BoundAETitle(title, address))
        else:
            raise t.fail(key, f"{example}, got the entry {describe(item)}")
        if (problem := check_ae_title(title)) is not None:
            raise t.fail(key, f"{title!r}: {problem}")
    plain = {entry for entry in entries if isinstance(entry, str)}
    if both := sorted(plain & {e.ae_title for e in entries if isinstance(e, BoundAETitle)}):
        raise t.fail(key, f"{both[0]!r} is listed both plain (any address) and bound to an "
                          "address; keep one form")
    return tuple(entries)


def _read_limits(t: Table) -> LimitsConfig:
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


def _read_storage(t: Table, base_dir: Path) -> StorageConfig:
    d = StorageConfig
    spool_dir = base_dir / d.spool_dir  # relative to the config file's folder
    return StorageConfig(
        spool_dir=t.path("spool_dir", spool_dir, base_dir) or spool_dir,
        min_free_bytes=t.integer("min_free_bytes", d.min_free_bytes, minimum=0),
        keep_source_images=t.boolean("keep_source_images", d.keep_source_images),
        keep_reports=t.boolean("keep_reports", d.keep_reports),
        keep_failed_days=t.number("keep_failed_days", d.keep_failed_days, minimum=0),
    )


def _read_model(t: Table, base_dir: Path) -> ModelConfig:
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


def _read_shadow(t: Table, base_dir: Path) -> ShadowConfig:
    shadow = ShadowConfig(model=t.path("model", None, base_dir, must_exist=True),
                          **_read_threshold(t))
    if shadow.model is None and t.data:
        t.finish()  # a misspelt key is named as such first
        key = next(iter(t.data))
        raise t.fail(key, 'is set but model is not: [shadow] model = "PATH" names the '
                          "candidate model file to run in shadow; add it, or remove the table")
    return shadow


def _read_threshold(t: Table) -> dict[str, Any]:
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


def _read_workers(t: Table) -> WorkersConfig:
    d = WorkersConfig
    return WorkersConfig(
        count=t.integer_or_auto("count", minimum=1, maximum=64),
        processes=t.integer_or_auto("processes", minimum=0, maximum=64),
        batch_size=t.integer("batch_size", d.batch_size, minimum=1, maximum=512),
        torch_threads=t.integer("torch_threads", d.torch_threads, minimum=0, maximum=256),
    )


def _read_report(t: Table) -> ReportConfig:
    d = ReportConfig
    priority = t.string("pneumonia_priority", d.pneumonia_priority, choices=PNEUMONIA_PRIORITIES)
    return ReportConfig(sr_kind=t.string("sr_kind", d.sr_kind, choices=tuple(SR_KINDS)),
                        heatmap=t.boolean("heatmap", d.heatmap),
                        heatmap_for_normal=t.boolean("heatmap_for_normal", d.heatmap_for_normal),
                        pneumonia_priority=priority if priority == "none" else priority.upper())


def _read_retry(t: Table) -> RetryPolicy:
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


def _read_log(t: Table) -> LogConfig:
    d = LogConfig
    return LogConfig(level=t.string("level", d.level, choices=LOG_LEVELS),
                     format=t.string("format", d.format, choices=LOG_FORMATS),
                     priority_prefix=t.string("priority_prefix", d.priority_prefix,
                                              choices=LOG_PRIORITY_PREFIXES))


def _read_metrics(t: Table) -> MetricsConfig:
    d = MetricsConfig
    return MetricsConfig(enabled=t.boolean("enabled", d.enabled),
                         host=t.string("host", d.host, check=check_host),
                         port=t.integer("port", d.port, minimum=0, maximum=65535))


def _read_tls(t: Table, base_dir: Path) -> ListenerTLSConfig:
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


def _read_status(t: Table) -> StatusConfig:
    d = StatusConfig
    return StatusConfig(
        destination_failing_seconds=t.number(
            "destination_failing_seconds", d.destination_failing_seconds, minimum=0),
        failed_jobs_within_seconds=t.number(
            "failed_jobs_within_seconds", d.failed_jobs_within_seconds, minimum=0),
    )


def _read_audit(t: Table, base_dir: Path) -> AuditConfig:
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


def _read_web(t: Table, base_dir: Path) -> WebConfig:
    d = WebConfig
    return WebConfig(
        enabled=t.boolean("enabled", d.enabled),
        token_file=t.path("token_file", d.token_file, base_dir, must_exist=True),
        show_accession_number=t.boolean("show_accession_number", d.show_accession_number),
        recent_films=t.integer("recent_films", d.recent_films, minimum=1, maximum=1000),
        refresh_seconds=t.integer("refresh_seconds", d.refresh_seconds, minimum=0,
                                  maximum=3600))


def _read_drift(t: Table) -> DriftConfig:
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
    t = Table(data, "[filters]")
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
            raise ConfigError(f"{where}: expected true or false, got {describe(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {describe(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {describe(value)}")
        return float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a quoted string, got {describe(value)}")
    elif isinstance(default, (tuple, list, frozenset, set)):
        if not isinstance(value, list):
            raise ConfigError(f'{where}: expected a list like ["A", "B"], got {describe(value)}')
        sample = next(iter(default), None)
        if sample is not None and not all(isinstance(item, type(sample)) for item in value):
            raise ConfigError(f"{where}: every item must be {describe(sample).split(' (')[1][:-1]}"
                              f", got {value!r}")
        return type(default)(value)
    return value
