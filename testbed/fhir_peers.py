"""An EHR's FHIR R4 endpoint for tests: a recording HTTP server that validates every resource it
is sent with `fhir.resources` (R4 4.0.1) and keeps them as a FHIR server would.

No real FHIR server runs here (HAPI FHIR needs a JVM application server; none is installed), so
this one does what pacs-ai relies on a server for, as the R4 specification says it:

- a transaction Bundle POSTed to the base URL, each entry a conditional update
  (`PUT Type?identifier=system|value`): no match creates the resource (201 Created), one match
  updates it (200 OK, a new version), more than one is 412 Precondition Failed;
- `urn:uuid:` references between the entries resolved to the ids given (Type/id);
- every resource validated by parsing the Bundle with fhir.resources; an invalid one is
  answered 400 with an OperationOutcome and kept in `invalid`;
- Basic or Bearer credentials checked when `credentials` is given (401 otherwise).

`script` answers the N-th request with its N-th action (then "ok"): "ok"; "503" (answered
without processing); "400" (an OperationOutcome naming the patient, as some servers do);
"ok-then-503" (processed, the answer replaced by a 503: the server has it, the client does not
know); "hold" (processed, the answer held until the client goes away).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from testbed.dicom_peers import LOCALHOST, wait_until

ACTIONS = ("ok", "503", "400", "ok-then-503", "hold")


# R4's required bindings of the codes pacs-ai sends, which fhir.resources (types and
# cardinality only) does not check
REQUIRED_CODES = {
    ("DiagnosticReport", "status"): {"registered", "partial", "preliminary", "final", "amended",
                                     "corrected", "appended", "cancelled", "entered-in-error",
                                     "unknown"},
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected",
                                "cancelled", "entered-in-error", "unknown"},
}
_WITH_OFFSET = re.compile(r"T\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)$")


def validate_bundle(body: Any) -> list[str]:
    """What is wrong with a Bundle and the resources in it: fhir.resources (R4) parses it
    (types, cardinality, formats), then the rules of R4 it leaves out for what pacs-ai sends
    (required code bindings, a time with its offset, contained references that resolve)."""
    from fhir.resources import __fhir_version__
    from fhir.resources.bundle import Bundle
    from pydantic import ValidationError

    assert __fhir_version__ == "4.0.1", __fhir_version__  # R4, not R4B or R5
    try:
        Bundle.parse_obj(body)
    except ValidationError as error:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
    problems = []
    for index, entry in enumerate(body.get("entry") or []):
        resource = entry.get("resource") or {}
        kind = resource.get("resourceType")
        where = f"entry.{index}.resource"
        for (resource_type, element), codes in REQUIRED_CODES.items():
            if kind == resource_type and resource.get(element) not in codes:
                problems.append(f"{where}.{element}: {resource.get(element)!r} is not in the "
                                "required value set")
        for element in ("effectiveDateTime", "issued"):
            value = resource.get(element)
            if isinstance(value, str) and "T" in value and not _WITH_OFFSET.search(value):
                problems.append(f"{where}.{element}: a time without its offset")
        contained = {c.get("id") for c in resource.get("contained") or []}
        for reference in _references(resource):
            if reference.startswith("#") and reference[1:] not in contained:
                problems.append(f"{where}: {reference} names no contained resource")
    return problems


def _references(value: Any) -> list[str]:
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for v in value.values() for r in _references(v)]
    if isinstance(value, list):
        return [r for item in value for r in _references(item)]
    return []


@dataclass
class Stored:
    resource_type: str
    id: str
    version: int
    resource: dict[str, Any]


@dataclass
class Request:
    action: str
    authorization: str | None
    body: Any
    invalid: list[str] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)  # per entry, when processed


class RecordingFhirServer:
    def __init__(self, script: list[str] | tuple[str, ...] = (), *, path: str = "/fhir/r4",
                 credentials: tuple[str, str] | str | None = None, tls: Any = None):
        for action in script:
            assert action in ACTIONS, action
        self.script = list(script)
        self.path = path
        self.credentials = credentials  # (user, password) for Basic, a str for Bearer
        self.requests: list[Request] = []
        self.stored: dict[tuple[str, str], Stored] = {}  # by (type, id)
        self._next_id = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0) or 0)
                raw = self.rfile.read(length)
                status, body, hold = server.handle(self.path, self.headers, raw)
                if hold:  # processed; the answer waits until the test or the client ends it
                    while not server._released.wait(0.2):
                        if self._client_gone():
                            return
                self._answer(status, body)

            def _client_gone(self) -> bool:
                import select
                import socket
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
                except (OSError, ValueError):  # reset, or a TLS socket (no peeking): gone
                    return True

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((LOCALHOST, 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # the test CA's server certificate (tests.tls_material)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # --- what tests read ------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOCALHOST}:{self.server.server_address[1]}{self.path}"

    def destination(self, **extra: Any) -> dict[str, Any]:
        return {"kind": "fhir", "name": "ehr", "url": self.url, "timeout_seconds": 5, **extra}

    def resources(self, resource_type: str) -> list[Stored]:
        with self._lock:
            return [s for s in self.stored.values() if s.resource_type == resource_type]

    def wait_for(self, count: int, timeout: float = 60.0) -> bool:
        """Until `count` requests have come."""
        return wait_until(lambda: len(self.requests) >= count, timeout)

    def release(self) -> None:
        """Answer the requests held by "hold"."""
        self._released.set()

    def __enter__(self) -> "RecordingFhirServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    # --- the server -----------------------------------------------------------------------

    def handle(self, path: str, headers: Any, raw: bytes) -> tuple[int, Any, bool]:
        with self._lock:
            action = self.script.pop(0) if self.script else "ok"
        authorization = headers.get("Authorization")
        try:
            body = json.loads(raw.decode("utf-8"))
        except ValueError:
            body = None
        request = Request(action, authorization, body)
        with self._lock:
            self.requests.append(request)
        if urlsplit(path).path.rstrip("/") != self.path:
            return 404, outcome("not-found", f"no FHIR endpoint at {path}"), False
        if not self._authorized(authorization):
            return 401, outcome("login", "authentication required"), False
        if action == "503":
            return 503, outcome("transient", "busy, try later"), False
        if not isinstance(body, dict) or headers.get("Content-Type", "").split(";")[0] != \
                "application/fhir+json":
            return 415, outcome("structure", "expected application/fhir+json"), False
        request.invalid = validate_bundle(body)
        if request.invalid:
            return 400, outcome("invalid", "; ".join(request.invalid)), False
        if action == "400":
            subject = body["entry"][-1]["resource"].get("subject", {})
            patient = subject.get("identifier", {}).get("value", "?")
            return 400, outcome("business-rule", f"Patient {patient} is not known here"), False
        status, answer = self._transaction(body)
        request.statuses = [e["response"]["status"] for e in answer.get("entry", [])]
        if action == "ok-then-503":
            return 503, outcome("transient", "gateway lost the answer"), False
        return status, answer, action == "hold"

    def _authorized(self, authorization: str | None) -> bool:
        if self.credentials is None:
            return True
        if isinstance(self.credentials, str):
            return authorization == f"Bearer {self.credentials}"
        user, password = self.credentials
        expected = base64.b64encode(f"{user}:{password}".encode()).decode()
        return authorization == f"Basic {expected}"

    def _transaction(self, bundle: dict[str, Any]) -> tuple[int, Any]:
        if bundle.get("type") != "transaction":
            return 400, outcome("invalid", "expected a transaction Bundle")
        with self._lock:
            plan = []  # (entry, stored or None)
            for entry in bundle.get("entry", []):
                request = entry.get("request", {})
                resource_type, _, query = request.get("url", "").partition("?")
                if request.get("method") != "PUT" or not query:
                    return 400, outcome("not-supported", "only conditional updates are taken")
                system, _, value = parse_qs(query)["identifier"][0].partition("|")
                matches = [s for s in self.stored.values() if s.resource_type == resource_type
                           and {"system": system, "value": value}
                           in s.resource.get("identifier", [])]
                if len(matches) > 1:
                    return 412, outcome("multiple-matches",
                                        f"{len(matches)} {resource_type} match {value}")
                plan.append((entry, matches[0] if matches else None))
            ids = {}
            for entry, match in plan:
                resource_type = entry["resource"]["resourceType"]
                if match is None:
                    self._next_id += 1
                    ids[entry["fullUrl"]] = (resource_type, str(self._next_id), None)
                else:
                    ids[entry["fullUrl"]] = (resource_type, match.id, match)
            answer_entries = []
            for entry, _ in plan:
                resource_type, new_id, match = ids[entry["fullUrl"]]
                resource = _resolve(json.loads(json.dumps(entry["resource"])), ids)
                resource["id"] = new_id
                version = match.version + 1 if match else 1
                self.stored[(resource_type, new_id)] = Stored(resource_type, new_id, version,
                                                              resource)
                answer_entries.append({"response": {
                    "status": "200 OK" if match else "201 Created",
                    "location": f"{resource_type}/{new_id}/_history/{version}"}})
        return 200, {"resourceType": "Bundle", "type": "transaction-response",
                     "entry": answer_entries}


def _resolve(value: Any, ids: dict[str, tuple[str, str, Any]]) -> Any:
    """urn:uuid: references replaced by the ids the entries were given."""
    if isinstance(value, dict):
        return {k: (f"{ids[v][0]}/{ids[v][1]}" if k == "reference" and v in ids
                    else _resolve(v, ids)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(item, ids) for item in value]
    return value


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": diagnostics}]}
