"""STOW-RS as a destination's transport (kind = "dicomweb"), with the `dicomweb-client` library.

Each report is POSTed on its own to {url}/studies (multipart/related; application/dicom) over
one keep-alive HTTP session. The library's own retries are off: pacs_ai.deliver.sender retries with the
service's [retry] backoff, as for C-STORE. What an answer means:

    2xx without the report in a FailedSOPSequence  stored (a re-sent report is the same
                                                   instance: the archive keeps one)
    2xx listing it as failed                       failed-sop: FailureReason, retried
    408, 429, 401, 403, 404 and 5xx                http-<code>: the server's message, retried
                                                   (busy, down, or a credential, URL or proxy
                                                   the admin can fix without touching reports)
    any other 4xx (400, 409, 413, 415, ...)        http-<code>: the server's message, given up
                                                   at once: sending the same bytes again cannot
                                                   succeed (`pacs-ai retry` after a fix)
    no connection, TLS failure, timeout            connection-failed / tls-... / timeout: the
                                                   rest of the batch fails with it, retried
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import requests
from pydicom.errors import InvalidDicomError

from pacs_ai.config import Destination
from pacs_ai.deliver.http_client import (RETRIED_CLIENT_ERRORS, connection_error,
                                         destination_session, server_message)
from pacs_ai.deliver.transport import StoreResult


def _failed_in(answer: pydicom.Dataset, sop_instance_uid: str) -> str | None:
    """The FailureReason the store answer gives for this instance, or None."""
    for item in answer.get("FailedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            reason = item.get("FailureReason")
            return f"0x{int(reason):04X}" if reason is not None else "no reason given"
    return None


class StowTransport:
    def __init__(self, destination: Destination):
        from dicomweb_client.api import DICOMwebClient

        target = destination.dicomweb
        assert target is not None
        self.destination = destination
        session = destination_session(target, destination.name)
        self.last_status: int | None = None  # of the last answer, for the log
        session.hooks["response"].append(self._remember_status)
        self.client = DICOMwebClient(url=target.url, session=session,
                                     timeout=destination.timeout_seconds)
        self.client.set_http_retry_params(retry=False)  # the sender's backoff retries

    def _remember_status(self, response: requests.Response, *args, **kwargs) -> None:
        self.last_status = response.status_code

    def connect(self) -> "StowConnection":
        return StowConnection(self, self.destination.dicomweb.url)  # type: ignore[union-attr]


class StowConnection:
    def __init__(self, transport: StowTransport, url: str):
        self.transport = transport
        self.client = transport.client
        self.url = url
        self.lost_reason = ""

    def is_open(self) -> bool:
        return not self.lost_reason

    def store(self, path: Path) -> StoreResult:
        try:
            dataset = pydicom.dcmread(path)
        except (OSError, InvalidDicomError, AttributeError) as error:
            return StoreResult(False, f"report-unreadable: {error}", permanent=True)
        try:
            answer = self.client.store_instances([dataset])
        except requests.HTTPError as error:
            response = error.response
            code = response.status_code if response is not None else 0
            message = server_message(response) if response is not None else str(error)
            permanent = 400 <= code < 500 and code not in RETRIED_CLIENT_ERRORS
            return StoreResult(False, f"http-{code}: {message} ({self.url})", permanent=permanent)
        except (requests.Timeout, requests.ConnectionError) as error:
            self.lost_reason = connection_error(error, self.url)
            return StoreResult(False, self.lost_reason)
        except requests.RequestException as error:
            return StoreResult(False, f"send-failed: {type(error).__name__}: {error}")
        except ValueError as error:  # an answer the library cannot parse, after a 2xx
            return StoreResult(False, f"bad-answer: {error} ({self.url})")
        failure = _failed_in(answer, str(dataset.SOPInstanceUID))
        if failure is not None:
            return StoreResult(False, f"failed-sop: FailureReason {failure} ({self.url})")
        return StoreResult(True, f"HTTP {self.transport.last_status}")

    def close(self) -> None:
        pass  # the session stays open for the next batch (keep-alive)

