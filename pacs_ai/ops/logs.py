"""structlog set-up: JSON when not on a terminal (the journal), key=value on a terminal.

Under systemd each line starts with its syslog priority, `<4>` for a warning, `<6>` for info
(sd-daemon(3)): journald strips the prefix and stores the line at that priority (the unit's
SyslogLevelPrefix=yes, the default), so `journalctl -p warning` selects by level. "Under
systemd" is JOURNAL_STREAM naming our stderr (systemd.exec(5)), or `[log] priority_prefix`.

A last processor drops any key that could identify a patient, as a safety net: the code logs UIDs
only, but a future `log.info(..., patient_name=...)` must still never reach the journal.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
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
    can be a birth date or a name: they never reach the journal. Our own code logs the reason.
    pydicom sends each one twice, to its logger and through `warnings` (printed to stderr, once
    per film for a value that differs); highdicom's warnings read values too."""
    pydicom_logger = logging.getLogger("pydicom")
    pydicom_logger.handlers.clear()
    pydicom_logger.addHandler(logging.NullHandler())
    pydicom_logger.propagate = False
    for library in ("pydicom", "highdicom"):
        warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")
    warnings.filterwarnings("ignore", message="Invalid value for VR")  # whoever it is raised for


# structlog level (add_log_level: log.exception() is "error") -> syslog priority (RFC 5424).
SYSLOG_PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def stderr_is_the_journal() -> bool:
    """Whether stderr is connected to the journal: systemd sets JOURNAL_STREAM to the
    "device:inode" of the stream it gives the service (systemd.exec(5)); a child whose stderr
    was redirected elsewhere inherits the variable but not the stream."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)
    except (ValueError, OSError, AttributeError):  # unset, malformed, or no real stderr
        return False


class SyslogPriorityPrefix:
    """Wraps the renderer: `<N>` before each rendered line, N from the event's level."""

    def __init__(self, renderer: Any):
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        priority = SYSLOG_PRIORITIES.get(str(event_dict.get("level", method)).lower(), 6)
        return f"<{priority}>{self.renderer(logger, method, event_dict)}"


def configure_logging(level: str = "info", fmt: str = "auto",
                      priority_prefix: str = "auto") -> None:
    """fmt: 'json', 'console' or 'auto' (console on a terminal, JSON otherwise).
    priority_prefix: 'on', 'off' or 'auto' (on when stderr is the journal)."""
    silence_library_value_logs()
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer = (structlog.processors.JSONRenderer() if use_json
                else structlog.dev.ConsoleRenderer(colors=False))
    if priority_prefix == "on" or (priority_prefix == "auto" and stderr_is_the_journal()):
        renderer = SyslogPriorityPrefix(renderer)
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
        # One write per event, newline included (print() writes the newline apart): the helper
        # processes share this stderr, and another's event between the two merges two lines.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
