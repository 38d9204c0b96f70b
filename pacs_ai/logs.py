"""structlog set-up: JSON when not on a terminal (the journal), key=value on a terminal.

A last processor drops any key that could identify a patient, as a safety net: the code logs UIDs
only, but a future `log.info(..., patient_name=...)` must still never reach the journal.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

PATIENT_IDENTIFYING_KEYS = frozenset({
    "patient_name", "patientname", "patient_id", "patientid", "patient_birth_date",
    "patientbirthdate", "other_patient_ids", "patient_address", "accession_number",
})


def drop_patient_identifiers(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for key in list(event_dict):
        if key.lower().replace("-", "_") in PATIENT_IDENTIFYING_KEYS:
            event_dict[key] = "[removed]"
    return event_dict


def silence_library_value_logs() -> None:
    """pydicom's warnings quote element values ("Invalid value for VR DA: '19700101'"), which
    can be a birth date or a name: they never reach the journal. Our own code logs the reason."""
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_logger.handlers.clear()
    pydicom_logger.addHandler(logging.NullHandler())
    pydicom_logger.propagate = False


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """fmt: 'json', 'console' or 'auto' (console on a terminal, JSON otherwise)."""
    silence_library_value_logs()
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (structlog.processors.JSONRenderer() if use_json
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            drop_patient_identifiers,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
