"""Throwaway TLS material and SuperNode authentication keys (``cryptography``).

``graftfl deploy-local --tls`` generates a private CA and a server certificate for
loopback; the SuperLink serves it, the SuperNodes and the ``flwr`` CLI trust the CA,
and the split data plane (``cfg.tls``) can serve and verify with the same files.
``--auth`` adds one EC key pair per SuperNode in the OpenSSH formats Flower reads
(``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``).
For a real deployment use certificates from your own PKI instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one throwaway TLS setup (absolute paths).

    Attributes
    ----------
    ca_cert : Path
        The CA certificate clients trust (``--root-certificates``, ``root-certificates``).
    server_cert : Path
        The server certificate signed by the CA, with the hosts as subject alternative names.
    server_key : Path
        The server certificate's private key (unencrypted, mode 0600).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeAuthKeys:
    """One SuperNode's authentication key pair (OpenSSH formats, as Flower reads them)."""

    private_key: Path
    public_key: Path


def _subject_alt_names(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def generate_tls_files(directory: str | Path, hosts: Iterable[str] = LOOPBACK_HOSTS, valid_days: int = 7) -> TlsFiles:
    """Create a private CA and a server certificate for ``hosts`` in ``directory``.

    Parameters
    ----------
    directory : str or Path
        Where ``ca.crt``, ``server.pem`` and ``server.key`` are written (created if missing).
    hosts : iterable of str
        IP addresses and DNS names the server certificate is valid for (its SAN).
    valid_days : int
        Validity of both certificates; they are meant to be thrown away after one run.

    Returns
    -------
    TlsFiles
        Absolute paths of the three PEM files.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "graftfl throwaway CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    hosts = list(hosts)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, _pem_key(server_key))
    return files


def generate_node_auth_keys(directory: str | Path, name: str) -> NodeAuthKeys:
    """Create a P-384 key pair for SuperNode authentication.

    The private key is written in OpenSSH format (``flower-supernode
    --auth-supernode-private-key``), the public key as an OpenSSH line
    (``flwr supernode register <key.pub>``).
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeAuthKeys(directory / f"{name}.key", directory / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return keys
