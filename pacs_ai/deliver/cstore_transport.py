"""C-STORE as a destination's transport: one association per batch of due reports, over TLS
when the destination has `tls`.

A report counts as stored when the PACS answers Success or a Warning (0xB000, 0xB006, 0xB007:
stored, with coercion or elements discarded). Anything else (no connection, association
rejected or aborted, a failure status) is a failed attempt that pacs_ai.deliver.sender retries.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification

from pacs_ai.config import Destination, TLSFiles
from pacs_ai.deliver.transport import ConnectFailed, StoreResult
from pacs_ai.dicom_constants import SR_KINDS
from pacs_ai.network import pynetdicom_internals
from pacs_ai.network.sockets import send_small_messages_at_once


def client_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """TLS towards a destination: verify it (ca_file or the system CAs), present our
    certificate when one is configured. Its sockets record why TLS failed (tls_failure)."""
    context = ssl.create_default_context(cafile=str(files.ca_file) if files.ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if files.cert_file is not None:
        context.load_cert_chain(str(files.cert_file), str(files.key_file))
    context.sslsocket_class = _TLSFailureRecordingSocket
    context.tls_failure = None  # type: ignore[attr-defined]
    return context


# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate is valid but
# names another host than the [[destinations]] host.
_NAME_MISMATCH_CODES = (62, 64)
# Alerts a PACS sends when it refuses our client certificate (or its absence).
_CLIENT_CERTIFICATE_ALERTS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA",
                              "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED", "ACCESS_DENIED",
                              "HANDSHAKE_FAILURE", "UNSUPPORTED_CERTIFICATE")


def tls_failure_reason(error: OSError, *, in_handshake: bool) -> str | None:
    """"code: detail" for a TLS failure towards a PACS, or None when `error` is not one:
    tls-hostname (its certificate names another host), tls-certificate (not trusted by
    ca_file or the system CAs, expired, ...), tls-client-certificate-refused (the PACS refused
    ours), tls-protocol (no common TLS version, or not a TLS port at all)."""
    if isinstance(error, ssl.SSLCertVerificationError):
        message = error.verify_message or str(error)
        if error.verify_code in _NAME_MISMATCH_CODES:
            return f"tls-hostname: {message}"
        return f"tls-certificate: {message}"
    if isinstance(error, ssl.SSLError):
        reason = str(error.reason or error)
        if "ALERT" in reason and any(alert in reason for alert in _CLIENT_CERTIFICATE_ALERTS):
            return f"tls-client-certificate-refused: the PACS sent {reason}"
        return f"tls-protocol: {reason}"
    if in_handshake:  # reset or closed during the handshake: what a plain DICOM port does
        return (f"tls-protocol: {error.strerror or error} during the TLS handshake "
                "(not a TLS port, or no TLS version in common)")
    return None


class _TLSFailureRecordingSocket(ssl.SSLSocket):
    """pynetdicom catches every OSError of connect() and reads and reports only "failed to
    connect"; this socket first records the TLS error on its context, for the sender."""

    def _record(self, error: OSError, in_handshake: bool) -> None:
        reason = tls_failure_reason(error, in_handshake=in_handshake)
        if reason is not None and getattr(self.context, "tls_failure", None) is None:
            self.context.tls_failure = reason  # type: ignore[attr-defined]

    def do_handshake(self, *args, **kwargs):
        try:
            return super().do_handshake(*args, **kwargs)
        except OSError as error:
            self._record(error, in_handshake=True)
            raise

    def recv(self, *args, **kwargs):  # TLS 1.3: a refused client certificate shows here
        try:
            return super().recv(*args, **kwargs)
        except ssl.SSLError as error:
            self._record(error, in_handshake=False)
            raise


def is_stored(status: int) -> bool:
    return status == 0x0000 or (status & 0xF000) == 0xB000


# A report file whose transfer syntax the PACS accepted is sent as its stored bytes, not decoded
# and re-encoded: that was about 20 ms of interpreter time per report in the service process,
# which the listener needs (docs/benchmarks.md). Only send_c_store(path) reads this setting.
pynetdicom_internals.send_datasets_from_file_in_chunks()


def report_to_send(association, path: Path) -> Path | Dataset:
    """`path` itself when the association accepted the report's SOP class in the transfer
    syntax it is stored in; otherwise the decoded dataset, which pynetdicom converts to the
    syntax the PACS accepted (say Implicit VR Little Endian only)."""
    meta = read_file_meta_info(path)
    sop_class, syntax = meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID
    if any(context.abstract_syntax == sop_class and context.transfer_syntax[0] == syntax
           for context in association.accepted_contexts):
        return path
    return pydicom.dcmread(path)


class CStoreTransport:
    def __init__(self, destination: Destination):
        self.destination = destination
        self._ssl_context = (client_ssl_context(destination.tls)
                             if destination.tls is not None else None)

    def _ae(self) -> AE:
        destination = self.destination
        ae = AE(ae_title=destination.calling_ae_title)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, timeout, destination.timeout_seconds)
        # One context per transfer syntax, so a PACS that takes both accepts both and the
        # report goes as stored (Explicit VR); offered together, PACSs often pick Implicit VR.
        # Every SR kind a report may be written as, and the heat-map images (pacs_ai.report.heatmap_image).
        for sop_class in (*SR_KINDS.values(), SecondaryCaptureImageStorage):
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                ae.add_requested_context(sop_class, [syntax])
        return ae

    def connect(self) -> "CStoreConnection":
        association = self._associate(self._ae())
        send_small_messages_at_once(association)
        return CStoreConnection(association)

    def echo(self) -> tuple[bool, str]:
        """One C-ECHO over an association of its own: (True, "0x0000"), or False and why
        ("connection-failed: ...", a TLS cause, "refused: status 0x....")."""
        ae = AE(ae_title=self.destination.calling_ae_title)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, timeout, self.destination.timeout_seconds)
        ae.add_requested_context(Verification)
        try:
            association = self._associate(ae)
        except ConnectFailed as error:
            return False, str(error)
        try:
            answer = association.send_c_echo()
        except Exception as error:  # e.g. Verification not accepted by the PACS
            return False, f"echo-failed: {error}"
        finally:
            if association.is_established:
                association.release()
        if "Status" not in answer:
            return False, "no-answer: association lost or timed out"
        status = int(answer.Status)
        return (True, "0x0000") if status == 0 else (False, f"refused: status 0x{status:04X}")

    def _associate(self, ae: AE):
        """An established association from `ae` to the destination; ConnectFailed with why
        not."""
        destination = self.destination
        tls_args = (self._ssl_context, destination.host) if self._ssl_context else None
        connected: list[bool] = []  # EVT_CONN_OPEN tells a refused connection from an abort
        if self._ssl_context is not None:
            self._ssl_context.tls_failure = None  # type: ignore[attr-defined]
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        try:
            association = ae.associate(
                destination.host, destination.port, ae_title=destination.ae_title,
                tls_args=tls_args,
                evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))])
        except Exception as error:  # e.g. TLS errors raised by the socket layer
            raise ConnectFailed(self._tls_failure(where) or f"connection-failed: {error}") \
                from None
        if not association.is_established:
            reason = ("association-rejected" if association.is_rejected else
                      "association-aborted" if connected else "connection-failed")
            raise ConnectFailed(self._tls_failure(where) or f"{reason}: {where}")
        return association

    def _tls_failure(self, where: str) -> str | None:
        """Why the TLS connection of the last attempt failed ("tls-...: detail (where)")."""
        failure = getattr(self._ssl_context, "tls_failure", None)
        return f"{failure} ({where})" if failure else None


class CStoreConnection:
    lost_reason = "association-lost"

    def __init__(self, association):
        self.association = association

    def is_open(self) -> bool:
        return bool(self.association.is_established)

    def store(self, path: Path) -> StoreResult:
        try:
            report = report_to_send(self.association, path)
        except (OSError, InvalidDicomError, AttributeError) as error:
            return StoreResult(False, f"report-unreadable: {error}", permanent=True)
        try:
            answer = self.association.send_c_store(report)
        except Exception as error:  # e.g. no accepted presentation context for the SR class
            return StoreResult(False, f"send-failed: {error}")
        if "Status" not in answer:
            return StoreResult(False, "no-answer: association lost or timed out")
        status = int(answer.Status)
        if not is_stored(status):
            comment = answer.get("ErrorComment")
            return StoreResult(False, f"refused: status 0x{status:04X}"
                                      + (f" ({comment})" if comment else ""))
        return StoreResult(True, f"0x{status:04X}")

    def close(self) -> None:
        if self.association.is_established:
            self.association.release()
