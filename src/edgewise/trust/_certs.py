"""A private CA for self-hosting: server certificates for HTTPS and MQTT over TLS.

Invariant: the CA key never leaves the directory it was made in; what devices and clients
pin is `ca.pem` alone.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._errors import KeyFileError

__all__ = ["CertPaths", "client_tls", "init_certs", "issue_certificate"]


def client_tls(ca: str | Path | bool | None):
    """What an httpx client verifies servers with: a context pinning `ca`, or the system store
    (True). `False` is refused: there is no way to turn verification off."""
    import ssl

    if ca is None or ca is True:
        return True
    if ca is False:
        raise ValueError("TLS verification cannot be disabled; pin a CA instead")
    return ssl.create_default_context(cafile=str(ca))


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertPaths:
        d = Path(directory)
        return cls(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def issue_certificate(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *,
                      common_name: str, names: list[str], days: int = 825,
                      client: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
    )
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init_certs(directory: Path | str, *, hostnames: list[str]) -> CertPaths:
    """Make a CA and a server certificate for `hostnames` (DNS names or IP addresses)."""
    paths = CertPaths.in_dir(Path(directory))
    existing = [p for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
                if p.exists()]
    if existing:
        raise KeyFileError(f"refusing to overwrite: {', '.join(map(str, existing))}")
    if not hostnames:
        raise KeyFileError("give at least one hostname or IP address for the server")
    paths.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Edgewise private CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_cert, server_key = issue_certificate(ca_cert, ca_key, common_name=hostnames[0],
                                                names=hostnames)
    _write_key(paths.ca_key, ca_key)
    _write_key(paths.server_key, server_key)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return paths
