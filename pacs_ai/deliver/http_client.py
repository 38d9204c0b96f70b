"""What the HTTP destinations (DICOMweb STOW-RS, FHIR) share: a `requests` session with the
destination's auth and CA, and the words a failed request is recorded with.

The session's auth comes from files read at start-up (a password or token never sits in the
config); with `ca_file`, that file alone verifies the server, whatever REQUESTS_CA_BUNDLE says.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path

import requests

from pacs_ai.config import HttpTarget
from pacs_ai.deliver.cstore_transport import tls_failure_reason
from pacs_ai.errors import UserError

# Client errors retried with the backoff: a credential, URL or proxy the admin can fix without
# touching reports, or a busy server. Any other 4xx is given up at once: the same request would
# be refused again (`pacs-ai retry` after a fix).
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


class Session(requests.Session):
    """A session whose ca_file wins: plain requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE
    in the environment replace a session's `verify` (psf/requests#3829)."""

    ca_file: str | None = None

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.ca_file is not None:
            settings["verify"] = self.ca_file
        return settings


def destination_session(target: HttpTarget, destination: str) -> Session:
    """A keep-alive session to `target` with its auth header and CA."""
    session = Session()
    if target.auth == "basic":
        assert target.username is not None and target.password_file is not None
        session.auth = (target.username,
                        read_secret(target.password_file, "password_file", destination))
    elif target.auth == "bearer":
        assert target.token_file is not None
        token = read_secret(target.token_file, "token_file", destination)
        session.headers["Authorization"] = f"Bearer {token}"
    if target.ca_file is not None:
        session.ca_file = session.verify = str(target.ca_file)  # type: ignore[assignment]
    session.headers["User-Agent"] = "pacs-ai"
    return session


def server_message(response: requests.Response,
                   from_body: Callable[[object], Iterable[str]] | None = None) -> str:
    """What the server said about a refusal, short and on one line. `from_body` picks the
    message parts out of a JSON body (FHIR: an OperationOutcome's issues); by default the
    keys Orthanc and most servers use ({"Message": ..., "Details": ...})."""
    text = response.text or ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if body is not None:
        parts = list(from_body(body)) if from_body is not None else _usual_parts(body)
        if parts:
            text = "; ".join(dict.fromkeys(parts))
    text = " ".join(text.split()) or response.reason or "(no message)"
    return shorten(text)


def _usual_parts(body: object) -> list[str]:
    if not isinstance(body, dict):
        return []
    return [str(body[key]) for key in ("Message", "message", "Details", "error", "detail")
            if body.get(key)]


def shorten(text: str) -> str:
    return text[:MESSAGE_CHARS] + ("..." if len(text) > MESSAGE_CHARS else "")


def tls_failure(error: BaseException) -> str | None:
    """The TLS failure (see cstore_transport.tls_failure_reason) inside a requests error."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return tls_failure_reason(current, in_handshake=True)
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException):
                inner = tls_failure(arg)
                if inner:
                    return inner
            reason = getattr(arg, "reason", None)
            if isinstance(reason, BaseException):
                inner = tls_failure(reason)
                if inner:
                    return inner
        current = current.__cause__ or current.__context__
    return None


def first_line(error: BaseException) -> str:
    text = str(error)
    # urllib3 nests "HTTPConnectionPool(...): Max retries exceeded ... (Caused by ...)"
    if "Caused by" in text:
        text = text.split("Caused by", 1)[1].strip(" ()")
    return text.splitlines()[0][:MESSAGE_CHARS] if text else type(error).__name__


def connection_error(error: requests.RequestException, url: str) -> str:
    """The "code: detail" of a request that got no answer: timeout, TLS, connection-failed."""
    if isinstance(error, requests.Timeout):
        return f"timeout: {url}: {type(error).__name__}"
    tls = tls_failure(error)
    return f"{tls} ({url})" if tls else f"connection-failed: {url}: {first_line(error)}"
