"""FHIR R4 as a destination's transport (kind = "fhir"): each report goes to the EHR as one
transaction Bundle (pacs_ai.deliver.fhir_report: a DiagnosticReport and its Observation, each a
conditional update by identifier), POSTed to the FHIR base URL over one keep-alive session with
the destination's auth and CA (pacs_ai.deliver.http_client, as for DICOMweb). What an answer means:

    2xx with a transaction-response Bundle    delivered: "HTTP 200 (DiagnosticReport 201
                                              Created)" (200 OK: a re-send updated the one
                                              it made before)
    2xx without one                           bad-answer, retried
    401, 403, 404, 408, 409, 429 and 5xx      http-<code>: the server's message, retried
    any other 4xx (400, 412, 422, ...)        http-<code>: the server's message (its
                                              OperationOutcome), given up at once: the same
                                              Bundle would be refused again (`pacs-ai retry`
                                              after a fix); 412: two resources match one
                                              identifier at the EHR
    no connection, TLS failure, timeout       connection-failed / tls-... / timeout, retried
    a film without a Patient ID               no-patient-id, given up at once

The server's message is recorded without the patient's identifiers (report_facts.redact).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import requests

from pacs_ai.config import Destination, ReportConfig
from pacs_ai.deliver.fhir_report import BundleNotBuilt, report_bundle
from pacs_ai.deliver.http_client import (RETRIED_CLIENT_ERRORS, connection_error,
                                         destination_session, server_message, shorten)
from pacs_ai.deliver.transport import StoreResult
from pacs_ai.report.report_facts import ReportUnreadable, read_report_facts, redact

# 409 Conflict: a concurrent update of the same resource at the server; the next try wins
RETRIED_FHIR_ERRORS = RETRIED_CLIENT_ERRORS | {409}
FHIR_JSON = "application/fhir+json"


def operation_outcome_parts(body: object) -> Iterable[str]:
    """The diagnostics and details of an OperationOutcome's issues (FHIR's error body)."""
    if not isinstance(body, dict):
        return []
    if body.get("resourceType") != "OperationOutcome":
        return [str(body[key]) for key in ("message", "error", "detail") if body.get(key)]
    parts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details = issue.get("details") if isinstance(issue.get("details"), dict) else {}
        for text in (issue.get("diagnostics"), details.get("text")):
            if text:
                parts.append(str(text))
    return parts


def transaction_outcome(body: object) -> str | None:
    """"DiagnosticReport 201 Created" from a transaction-response Bundle; None when the
    answer is not one, or an entry did not succeed."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle" or \
            body.get("type") != "transaction-response":
        return None
    statuses = [str((entry.get("response") or {}).get("status", ""))
                for entry in body.get("entry") or [] if isinstance(entry, dict)]
    if len(statuses) != 2 or not all(status.startswith("2") for status in statuses):
        return None
    return f"DiagnosticReport {statuses[1]}"  # the Bundle's second entry (fhir_report)


class FhirTransport:
    def __init__(self, destination: Destination, report: ReportConfig | None = None):
        assert destination.fhir is not None
        self.destination = destination
        self.target = destination.fhir
        priority = (report or ReportConfig()).pneumonia_priority
        self.priority = None if priority == "none" else priority
        self.session = destination_session(self.target, destination.name)
        self.session.headers["Accept"] = FHIR_JSON

    def connect(self) -> "FhirConnection":
        return FhirConnection(self)


class FhirConnection:
    def __init__(self, transport: FhirTransport):
        self.transport = transport
        self.url = transport.target.url
        self.lost_reason = ""

    def is_open(self) -> bool:
        return not self.lost_reason

    def store(self, path: Path) -> StoreResult:
        transport = self.transport
        try:
            facts = read_report_facts(path)
            bundle = report_bundle(facts, transport.target, transport.priority)
        except (ReportUnreadable, BundleNotBuilt) as error:
            return StoreResult(False, str(error), permanent=True)
        try:
            response = transport.session.post(
                self.url, data=json.dumps(bundle).encode("utf-8"),
                headers={"Content-Type": f"{FHIR_JSON}; charset=utf-8"},
                timeout=transport.destination.timeout_seconds)
        except (requests.Timeout, requests.ConnectionError) as error:
            self.lost_reason = connection_error(error, self.url)
            return StoreResult(False, self.lost_reason)
        except requests.RequestException as error:
            return StoreResult(False, f"send-failed: {type(error).__name__}: {error}")
        code = response.status_code
        if not 200 <= code < 300:
            message = redact(server_message(response, operation_outcome_parts), facts)
            permanent = 400 <= code < 500 and code not in RETRIED_FHIR_ERRORS
            return StoreResult(False, f"http-{code}: {message} ({self.url})",
                               permanent=permanent)
        try:
            outcome = transaction_outcome(response.json())
        except ValueError:
            outcome = None
        if outcome is None:
            said = shorten(" ".join((response.text or "").split())) or "(empty)"
            return StoreResult(False, f"bad-answer: HTTP {code} without a successful "
                                      f"transaction-response Bundle: {redact(said, facts)} "
                                      f"({self.url})")
        return StoreResult(True, f"HTTP {code} ({outcome})")

    def close(self) -> None:
        pass  # the session stays open for the next batch (keep-alive)
