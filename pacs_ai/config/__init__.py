"""The service's configuration: one TOML file, validated at start-up.

Every problem (unknown table or key, wrong type, bad value) raises :class:`ConfigError`, a
UserError whose message names the key and says how to fix it, so `pacs-ai serve` stops with one
clear line instead of a traceback. `deploy/pacs-ai.toml` documents every key.

Relative paths in a config file are resolved against the file's folder; the built-in default
(no file) resolves them against the working folder.

The package imports no stage of the pipeline (tests/test_layering.py), so the defaults the
stages share live here. Its modules, each importing only those above it:

- `defaults`: the defaults shared with the stages (port, AE title, pixel limit, age bounds, the
  shipped model's path);
- `reader`: reading one table (typed getters, the checks of single values, ConfigError);
- `tables`: the service tables' dataclasses ([listener] ... [audit]);
- `destinations`: [[destinations]], [[routes]] and [routing], dataclasses and readers;
- `config_file`: `Config`, the whole file read into it, the rules across tables.

Everything public is imported here: `from pacs_ai.config import Config, load_config`.
"""

from pacs_ai.config.config_file import (TOP_LEVEL_TABLES, Config, default_config, load_config,
                                        parse_config, parse_filter_policy)
from pacs_ai.config.defaults import (AUTO, DEFAULT_AE_TITLE, DEFAULT_MAX_PIXELS,
                                     DEFAULT_METRICS_PORT, DEFAULT_PORT, LOG_FORMATS, LOG_LEVELS,
                                     LOG_PRIORITY_PREFIXES, MAX_AGE_YEARS, SHIPPED_MODEL_FILENAME,
                                     UNKNOWN_AGE_CHOICES, UNKNOWN_AGE_CLASSIFY, UNKNOWN_AGE_SKIP,
                                     default_model_path)
from pacs_ai.config.destinations import (DEFAULT_ROUTE, DESTINATION_KEYS, DESTINATION_KINDS,
                                         DICOMWEB_AUTH, DICOMWEB_DESTINATION_KEYS,
                                         DIMSE_DESTINATION_KEYS, FHIR_DESTINATION_KEYS,
                                         HL7_CHARSETS, HL7_DESTINATION_KEYS, HL7_PROCESSING_IDS,
                                         PNEUMONIA_PRIORITIES, ROUTE_MATCH_KEYS, Destination,
                                         DicomWebTarget, FhirTarget, Hl7Target, HttpTarget, Route,
                                         RoutingConfig, fits_charset, parse_destinations,
                                         parse_routing)
from pacs_ai.config.reader import ConfigError
from pacs_ai.config.tables import (ANY_MODEL_KEY, DEFAULT_EXPECTED_POSITIVE_RATE,
                                   DEFAULT_MAX_ABSTENTION_RATE, SHA256_HEX, SHA256_KEY, VERSION_KEY,
                                   AuditConfig, BoundAETitle, DriftConfig, FilterPolicy,
                                   LimitsConfig, ListenerConfig, ListenerTLSConfig, LogConfig,
                                   MetricsConfig, ModelConfig, ReportConfig, RetryPolicy,
                                   ShadowConfig, SiteThreshold, StatusConfig, StorageConfig,
                                   TLSFiles, WebConfig, WorkersConfig)

__all__ = ["ANY_MODEL_KEY", "AUTO", "AuditConfig", "BoundAETitle", "Config", "ConfigError",
           "DEFAULT_AE_TITLE", "DEFAULT_EXPECTED_POSITIVE_RATE", "DEFAULT_MAX_ABSTENTION_RATE",
           "DEFAULT_MAX_PIXELS", "DEFAULT_METRICS_PORT", "DEFAULT_PORT", "DEFAULT_ROUTE",
           "DESTINATION_KEYS", "DESTINATION_KINDS", "DICOMWEB_AUTH", "DICOMWEB_DESTINATION_KEYS",
           "DIMSE_DESTINATION_KEYS", "Destination", "DicomWebTarget", "DriftConfig",
           "FHIR_DESTINATION_KEYS", "FhirTarget", "FilterPolicy", "HL7_CHARSETS",
           "HL7_DESTINATION_KEYS", "HL7_PROCESSING_IDS", "Hl7Target", "HttpTarget", "LOG_FORMATS",
           "LOG_LEVELS", "LOG_PRIORITY_PREFIXES", "LimitsConfig", "ListenerConfig",
           "ListenerTLSConfig", "LogConfig", "MAX_AGE_YEARS", "MetricsConfig", "ModelConfig",
           "PNEUMONIA_PRIORITIES", "ROUTE_MATCH_KEYS", "ReportConfig", "RetryPolicy", "Route",
           "RoutingConfig", "SHA256_HEX", "SHA256_KEY", "SHIPPED_MODEL_FILENAME", "ShadowConfig",
           "SiteThreshold", "StatusConfig", "StorageConfig", "TLSFiles", "TOP_LEVEL_TABLES",
           "UNKNOWN_AGE_CHOICES", "UNKNOWN_AGE_CLASSIFY", "UNKNOWN_AGE_SKIP", "VERSION_KEY",
           "WebConfig", "WorkersConfig", "default_config", "default_model_path", "fits_charset",
           "load_config", "parse_config", "parse_destinations", "parse_filter_policy",
           "parse_routing"]
