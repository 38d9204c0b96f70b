"""TLS certificates for tests, made with the ``cryptography`` package: one CA, a server
certificate for 127.0.0.1/localhost and a client certificate, all signed by the CA.

Keys are EC P-256 (fast to make, accepted by OpenSSL's BCP 195 profiles that DCMTK uses by
default). Files are PEM, keys unencrypted, so ``storescu +tls key cert`` needs no password.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TLSMaterial:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacs-ai tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=2))


def _leaf(common_name: str, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          *, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = _validity(x509.CertificateBuilder()
                        .subject_name(_name(common_name)).issuer_name(ca_cert.subject)
                        .public_key(key.public_key()).serial_number(x509.random_serial_number()))
    builder = (builder
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectAlternativeName(
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                   critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    return builder.sign(ca_key, hashes.SHA256()), key


def make_tls_material(folder: Path, *, prefix: str = "") -> TLSMaterial:
    """A fresh CA with a server and a client certificate, written as PEM files in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_builder = _validity(x509.CertificateBuilder()
                           .subject_name(_name(f"{prefix}pacs-ai test CA"))
                           .issuer_name(_name(f"{prefix}pacs-ai test CA"))
                           .public_key(ca_key.public_key())
                           .serial_number(x509.random_serial_number()))
    ca_cert = (ca_builder
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    server_cert, server_key = _leaf(f"{prefix}server", ca_cert, ca_key, server=True)
    client_cert, client_key = _leaf(f"{prefix}client", ca_cert, ca_key, server=False)
    material = TLSMaterial(ca_cert=folder / f"{prefix}ca.pem", ca_key=folder / f"{prefix}ca.key",
                           server_cert=folder / f"{prefix}server.pem",
                           server_key=folder / f"{prefix}server.key",
                           client_cert=folder / f"{prefix}client.pem",
                           client_key=folder / f"{prefix}client.key")
    _write_cert(ca_cert, material.ca_cert)
    _write_key(ca_key, material.ca_key)
    _write_cert(server_cert, material.server_cert)
    _write_key(server_key, material.server_key)
    _write_cert(client_cert, material.client_cert)
    _write_key(client_key, material.client_key)
    return material
