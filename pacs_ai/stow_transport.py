"""STOW-RS as a destination's transport (kind = "dicomweb"), with the `dicomweb-client` library.

Each report is POSTed on its own to {url}/studies (multipart/related; application/dicom) over
one keep-alive HTTP session. The library's own retries are off: pacs_ai.sender retries with the
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

import json
import ssl
from pathlib import Path

import pydicom
import requests
from pydicom.errors import InvalidDicomError

from pacs_ai.config import Destination
from pacs_ai.cstore_transport import tls_failure_reason
from pacs_ai.errors import UserError
from pacs_ai.transport import StoreResult

RETRIED_CLIENT_ERRORS = frozenset({401, 403, 404, 408, 429})
MESSAGE_CHARS = 300  # of the server's answer kept in last_error


def read_secret(path: Path, key: str, destination: str) -> str:
    """A password or token file's content without its trailing newline (read at start-up)."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"[[destinations]] {destination!r} {key}: cannot read {path}: "
                        f"{getattr(error, 'strerror', None) or error}") from None
    if not secret:
        raise UserError(f"[[destinations]] {destination!r} {key}: {path} is empty")
    return secret


def server_message(response: requests.Response) -> str:
    """What the server said about a refusal, short and on one line."""
    text = response.text or ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):  # Orthanc and most servers: {"Message": ..., "Details": ...}
        parts = [str(body[key]) for key in ("Message", "message", "Details", "error", "detail")
                 if body.get(key)]
        if parts:
            text = "; ".join(dict.fromkeys(parts))
    text = " ".join(text.split()) or response.reason or "(no message)"
    return text[:MESSAGE_CHARS] + ("..." if len(text) > MESSAGE_CHARS else "")


def _tls_failure(error: BaseException) -> str | None:
    """The TLS failure (see cstore_transport.tls_failure_reason) inside a requests error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return tls_failure_reason(current, in_handshake=True)
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException):
                inner = _tls_failure(arg)
                if inner:
                    return inner
            reason = getattr(arg, "reason", None)
            if isinstance(reason, BaseException):
                inner = _tls_failure(reason)
                if inner:
                    return inner
        current = current.__cause__ or current.__context__
    return None


def _failed_in(answer: pydicom.Dataset, sop_instance_uid: str) -> str | None:
    """The FailureReason the store answer gives for this instance, or None."""
    for item in answer.get("FailedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            reason = item.get("FailureReason")
            return f"0x{int(reason):04X}" if reason is not None else "no reason given"
    return None


class _Session(requests.Session):
    """A session whose ca_file wins: plain requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE
    in the environment replace a session's `verify` (psf/requests#3829)."""

    ca_file: str | None = None

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.ca_file is not None:
            settings["verify"] = self.ca_file
        return settings


class StowTransport:
    def __init__(self, destination: Destination):
        from dicomweb_client.api import DICOMwebClient

        target = destination.dicomweb
        assert target is not None
        self.destination = destination
        session = _Session()
        if target.auth == "basic":
            assert target.username is not None and target.password_file is not None
            session.auth = (target.username,
                            read_secret(target.password_file, "password_file", destination.name))
        elif target.auth == "bearer":
            assert target.token_file is not None
            token = read_secret(target.token_file, "token_file", destination.name)
            session.headers["Authorization"] = f"Bearer {token}"
        if target.ca_file is not None:
            session.ca_file = session.verify = str(target.ca_file)  # type: ignore[assignment]
        session.headers["User-Agent"] = "pacs-ai"
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
        except requests.Timeout as error:
            self.lost_reason = f"timeout: {self.url}: {type(error).__name__}"
            return StoreResult(False, self.lost_reason)
        except requests.ConnectionError as error:
            tls = _tls_failure(error)
            self.lost_reason = (f"{tls} ({self.url})" if tls
                                else f"connection-failed: {self.url}: {_first_line(error)}")
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


def _first_line(error: BaseException) -> str:
    text = str(error)
    # urllib3 nests "HTTPConnectionPool(...): Max retries exceeded ... (Caused by ...)"
    if "Caused by" in text:
        text = text.split("Caused by", 1)[1].strip(" ()")
    return text.splitlines()[0][:MESSAGE_CHARS] if text else type(error).__name__
