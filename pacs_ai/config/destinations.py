"""[[destinations]] (where reports go: DICOM C-STORE, DICOMweb STOW-RS, HL7 v2 over MLLP, FHIR
R4), [[routes]] and [routing] (which films go where): their dataclasses and readers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacs_ai.config.defaults import DEFAULT_AE_TITLE
from pacs_ai.config.reader import (ConfigError, Table, check_ae_title, check_host, check_network,
                                   describe)
from pacs_ai.config.tables import TLSFiles

PNEUMONIA_PRIORITIES = ("s", "a", "none")
DESTINATION_KINDS = ("dimse", "dicomweb", "hl7", "fhir")
# The keys a [[destinations]] block of each kind takes (parse_destinations reads them).
DIMSE_DESTINATION_KEYS = ("kind", "name", "ae_title", "host", "port", "calling_ae_title",
                          "timeout_seconds", "echo_interval_seconds", "tls")
DICOMWEB_DESTINATION_KEYS = ("kind", "name", "url", "auth", "username", "password_file",
                             "token_file", "ca_file", "timeout_seconds")
HL7_DESTINATION_KEYS = ("kind", "name", "host", "port", "tls", "timeout_seconds",
                        "sending_facility", "receiving_application", "receiving_facility",
                        "processing_id", "charset")
FHIR_DESTINATION_KEYS = DICOMWEB_DESTINATION_KEYS + ("patient_id_system",)
DESTINATION_KEYS = {"dimse": DIMSE_DESTINATION_KEYS, "dicomweb": DICOMWEB_DESTINATION_KEYS,
                    "hl7": HL7_DESTINATION_KEYS, "fhir": FHIR_DESTINATION_KEYS}
DICOMWEB_AUTH = ("none", "basic", "bearer")
HL7_PROCESSING_IDS = ("p", "t", "d")  # MSH-11: production, training, debugging
# The character sets an HL7 destination's messages can be sent in: the `charset` a config names
# -> the MSH-18 value (HL7 table 0211) and the Python codec. Many RIS (older ones, much of
# Europe) take only ISO 8859-1 or ASCII: UTF-8 bytes would show "Müller" as "MÃ¼ller".
HL7_CHARSETS = {"UTF-8": ("UNICODE UTF-8", "utf-8"), "8859/1": ("8859/1", "iso-8859-1"),
                "ASCII": ("ASCII", "ascii")}


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
    charset: str = "UTF-8"  # a key of HL7_CHARSETS: how the messages are encoded (MSH-18)

    @property
    def msh_18(self) -> str:
        """The character set as MSH-18 names it (HL7 table 0211)."""
        return HL7_CHARSETS[self.charset][0]

    @property
    def codec(self) -> str:
        """The Python codec the messages are encoded (and the ACKs decoded) with."""
        return HL7_CHARSETS[self.charset][1]


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


def parse_destinations(data: Any, base_dir: Path, listener_ae_title: str) -> tuple[Destination, ...]:
    if not isinstance(data, list):
        raise ConfigError("destinations must be written as [[destinations]] blocks, one per PACS")
    destinations: list[Destination] = []
    for index, item in enumerate(data, start=1):
        t = Table(item, f"[[destinations]] #{index}")
        kind = t.string("kind", "dimse", choices=DESTINATION_KINDS)
        # a misspelt key first: `ae_tile` is named, not reported as ae_title missing
        t.check_keys(sum(DESTINATION_KEYS.values(), ()), DESTINATION_KEYS[kind])
        if kind in ("dicomweb", "fhir"):
            destinations.append(_parse_http_destination(t, base_dir, kind))
            continue
        if kind == "hl7":
            destinations.append(_parse_hl7_destination(t, base_dir))
            continue
        ae_title = t.string("ae_title", "", check=check_ae_title)
        host = t.string("host", "", check=check_host)
        port = t.integer("port", 0, minimum=1, maximum=65535)
        for key, value in (("ae_title", ae_title), ("host", host), ("port", port)):
            if not value:
                raise t.fail(key, "is required: every destination needs ae_title, host and port")
        name = t.string("name", f"{ae_title}@{host}:{port}", check=_check_name)
        calling = t.string("calling_ae_title", listener_ae_title, check=check_ae_title)
        timeout = t.number("timeout_seconds", 30.0, minimum=0, exclusive_minimum=True)
        echo_interval = t.number("echo_interval_seconds", 0.0, minimum=0)
        if 0 < echo_interval < 10:
            raise t.fail("echo_interval_seconds", "must be 0 (no C-ECHO) or at least 10 seconds")
        tls = _parse_destination_tls(t, base_dir)
        t.finish()
        destinations.append(Destination(name=name, ae_title=ae_title, host=host, port=port,
                                        calling_ae_title=calling, timeout_seconds=timeout, tls=tls,
                                        echo_interval_seconds=echo_interval))
    names = [d.name for d in destinations]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"[[destinations]]: two destinations are named {duplicates[0]!r}; give "
                          "each a distinct name = \"...\"")
    return tuple(destinations)


def parse_routing(routes: Any, routing: Any, destinations: tuple[Destination, ...]
                  ) -> RoutingConfig:
    """[[routes]] blocks and [routing] default, checked against the destinations' names."""
    known = [d.name for d in destinations]

    def destination_names(t: Table, key: str) -> tuple[str, ...]:
        present, _ = t._raw(key)
        names = t.strings(key, ())
        if not present:
            raise t.fail(key, 'is required: the destinations that get these reports, e.g. '
                              f'["{known[0] if known else "main-pacs"}"] ([] for none)')
        for name in names:
            if name not in known:
                raise t.fail(key, f"{name!r} is not the name of a [[destinations]] block; "
                                  f"the destinations are {', '.join(map(repr, known)) or 'none'}")
        return tuple(dict.fromkeys(names))

    def values(t: Table, key: str, check=None) -> tuple[str, ...]:
        present, value = t._raw(key)
        if not present:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(
                isinstance(item, str) and item.strip() for item in value):
            raise t.fail(key, f'expected a quoted string or a list of them like ["A", "B"], '
                              f"got {describe(value)}")
        for item in value:
            if check is not None and (problem := check(item)) is not None:
                raise t.fail(key, f"{item!r}: {problem}")
        return tuple(item.strip() for item in value)

    if not isinstance(routes, list):
        raise ConfigError("routes must be written as [[routes]] blocks, one per rule")
    parsed: list[Route] = []
    for index, item in enumerate(routes, start=1):
        t = Table(item, f"[[routes]] #{index}")
        name = t.string("name", f"route-{index}", check=_check_name)
        if name == DEFAULT_ROUTE:
            raise t.fail("name", f"{DEFAULT_ROUTE!r} is the name of films that match no route; "
                                 "choose another")
        route = Route(
            name=name, destinations=destination_names(t, "destinations"),
            calling_ae_title=values(t, "calling_ae_title", check=check_ae_title),
            source_address=values(t, "source_address", check=check_network),
            modality=tuple(v.upper() for v in values(t, "modality")),
            station_name=values(t, "station_name"))
        t.finish()
        if not any(getattr(route, key) for key in ROUTE_MATCH_KEYS):
            raise ConfigError(f"[[routes]] #{index} ({name}): give at least one of "
                              f"{', '.join(ROUTE_MATCH_KEYS)}; a route that matches every "
                              "film is [routing] default")
        parsed.append(route)
    names = [route.name for route in parsed]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"[[routes]]: two routes are named {duplicates[0]!r}; give each a "
                          'distinct name = "..."')
    t = Table(routing, "[routing]")
    present, _ = t._raw("default")
    default = destination_names(t, "default") if present else None
    t.finish()
    return RoutingConfig(routes=tuple(parsed), default=default)


def _parse_http_destination(t: Table, base_dir: Path, kind: str) -> Destination:
    """A kind = "dicomweb" or "fhir" [[destinations]] block: url, auth and its files, ca_file
    (and for FHIR the patient identifier system)."""
    example = ("https://pacs.example.org/dicom-web" if kind == "dicomweb"
               else "https://ehr.example.org/fhir/r4")
    what = "the DICOMweb root" if kind == "dicomweb" else "the FHIR base URL"
    url = t.string("url", "", check=_check_http_url)
    if not url:
        raise t.fail("url", f'is required for kind = "{kind}": {what}, e.g. "{example}"')
    auth = t.string("auth", "none", choices=DICOMWEB_AUTH)
    username = t.string("username", "") or None
    password_file = t.path("password_file", None, base_dir, must_exist=True)
    token_file = t.path("token_file", None, base_dir, must_exist=True)
    ca_file = t.path("ca_file", None, base_dir, must_exist=True)
    needs = {"basic": ("username", "password_file"), "bearer": ("token_file",), "none": ()}
    given = {"username": username, "password_file": password_file, "token_file": token_file}
    for key in needs[auth]:
        if given[key] is None:
            raise t.fail(key, f'is required with auth = "{auth}"')
    for key, value in given.items():
        if value is not None and key not in needs[auth]:
            raise t.fail(key, f'is not used with auth = "{auth}"; remove it or set auth = '
                              f'"{"bearer" if key == "token_file" else "basic"}"')
    if ca_file is not None and not url.lower().startswith("https://"):
        raise t.fail("ca_file", "is only used with an https:// url")
    for key in ("ae_title", "host", "port", "tls", "calling_ae_title", "echo_interval_seconds"):
        if key in t.data:
            raise t.fail(key, f'is for C-STORE destinations; a kind = "{kind}" destination '
                              "takes url (and auth, ca_file)")
    name = t.string("name", url, check=_check_name)
    timeout = t.number("timeout_seconds", 30.0, minimum=0, exclusive_minimum=True)
    target = dict(url=url.rstrip("/"), auth=auth, username=username,
                  password_file=password_file, token_file=token_file, ca_file=ca_file)
    if kind == "fhir":
        system = t.optional_string("patient_id_system", check=_check_uri)
        t.finish()
        return Destination(name=name, ae_title="", host="", port=0, timeout_seconds=timeout,
                           fhir=FhirTarget(**target, patient_id_system=system))
    t.finish()
    return Destination(name=name, ae_title="", host="", port=0, timeout_seconds=timeout,
                       dicomweb=DicomWebTarget(**target))


def _parse_hl7_destination(t: Table, base_dir: Path) -> Destination:
    """A kind = "hl7" [[destinations]] block: the RIS's MLLP host and port, TLS, the MSH
    application and facility names its interface expects."""
    for key in ("ae_title", "calling_ae_title", "echo_interval_seconds", "url"):
        if key in t.data:
            raise t.fail(key, 'is not used by a kind = "hl7" destination; it takes host, port '
                              "(and tls, receiving_application, receiving_facility, "
                              "sending_facility, processing_id, charset)")
    host = t.string("host", "", check=check_host)
    port = t.integer("port", 0, minimum=1, maximum=65535)
    for key, value in (("host", host), ("port", port)):
        if not value:
            raise t.fail(key, 'is required: a kind = "hl7" destination needs the host and port '
                              "the RIS takes HL7 messages on (MLLP)")
    name = t.string("name", f"hl7@{host}:{port}", check=_check_name)
    timeout = t.number("timeout_seconds", 30.0, minimum=0, exclusive_minimum=True)
    tls = _parse_destination_tls(t, base_dir)
    charset = _hl7_charset(t.string("charset", "UTF-8", check=_check_hl7_charset))
    names = {key: t.string(key, "", check=_check_hl7_name)
             for key in ("sending_facility", "receiving_application", "receiving_facility")}
    for key, value in names.items():
        if not fits_charset(value, HL7_CHARSETS[charset][1]):
            raise t.fail(key, f"has characters outside {charset}, the destination's charset")
    target = Hl7Target(**names, charset=charset,
                       processing_id=t.string("processing_id", "p",
                                              choices=HL7_PROCESSING_IDS).upper())
    t.finish()
    return Destination(name=name, ae_title="", host=host, port=port, timeout_seconds=timeout,
                       tls=tls, hl7=target)


# Other spellings of the HL7_CHARSETS keys a RIS's interface specification may use
_HL7_CHARSET_ALIASES = {"UNICODE UTF-8": "UTF-8"}


def _hl7_charset(value: str) -> str:
    """The HL7_CHARSETS key `value` names (any case; "UNICODE UTF-8" as MSH-18 spells it)."""
    value = value.strip().upper()
    return _HL7_CHARSET_ALIASES.get(value, value)


def _check_hl7_charset(value: str) -> str | None:
    if _hl7_charset(value) in HL7_CHARSETS:
        return None
    return (f"{value!r} is not one of 'UTF-8', '8859/1' (ISO 8859-1, Latin-1), 'ASCII' "
            "(as HL7 table 0211 names them in MSH-18)")


def fits_charset(value: str, codec: str) -> bool:
    """Whether `value` can be encoded with `codec` (a name of HL7_CHARSETS' codecs)."""
    try:
        value.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


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


def _parse_destination_tls(t: Table, base_dir: Path) -> TLSFiles | None:
    present, value = t._raw("tls")
    if not present or value is False:
        return None
    if value is True:
        return TLSFiles()
    sub = Table(value, f"{t.name} tls")
    files = TLSFiles(cert_file=sub.path("cert_file", None, base_dir, must_exist=True),
                     key_file=sub.path("key_file", None, base_dir, must_exist=True),
                     ca_file=sub.path("ca_file", None, base_dir, must_exist=True))
    if (files.cert_file is None) != (files.key_file is None):
        raise sub.fail("cert_file", "cert_file and key_file go together (client certificate)")
    sub.finish()
    return files


def _check_name(value: str) -> str | None:
    if not value.strip() or len(value) > 100:
        return "a destination name must be 1 to 100 characters"
    return None
