"""The team server's address and TLS: loopback needs nothing, any other address needs a certificate.

`--self_signed` makes a certificate for the host's names and addresses (`<root>/tls/server.crt`, its key
0600 beside it); clients trust it with MLFLOW_TRACKING_SERVER_CERT_PATH. Without TLS a non-loopback address is
refused unless `--insecure`, which is then logged as a warning at every start.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ldmflow.errors import LdmflowError

logger = logging.getLogger(__name__)
CERT_DAYS = 825  # the longest validity clients such as macOS accept for a TLS server certificate


@dataclass(frozen=True)
class Address:
    """Where the MLflow server listens, and the certificate it serves (None: plain HTTP)."""

    host: str = "127.0.0.1"
    port: int = 5000
    cert: str | None = None
    key: str | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.cert else "http"
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host
        return f"{scheme}://{f'[{host}]' if ':' in host else host}:{self.port}"

    @property
    def local_url(self) -> str:
        """How this machine reaches it (a wildcard address is reached through loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{'https' if self.cert else 'http'}://{f'[{host}]' if ':' in host else host}:{self.port}"


def choose_address(root: Path, host: str, port: int, tls_cert: str | None, tls_key: str | None,
                   self_signed: bool, insecure: bool) -> Address:
    """The address to serve on, refusing plain HTTP beyond loopback unless `insecure`."""
    if bool(tls_cert) != bool(tls_key):
        raise LdmflowError("Give both --tls_cert and --tls_key (the certificate and its private key).")
    if tls_cert and self_signed:
        raise LdmflowError("Give either --tls_cert/--tls_key or --self_signed, not both.")
    if self_signed:
        tls_cert, tls_key = self_signed_certificate(root, host)
    if tls_cert:
        for path in (tls_cert, tls_key):
            if not Path(path).is_file():
                raise LdmflowError(f"TLS file {path} does not exist.")
        return Address(host, port, str(Path(tls_cert).resolve()), str(Path(tls_key).resolve()))
    if not is_loopback(host):
        if not insecure:
            raise LdmflowError(f"Refusing to serve passwords in clear text on {host}: give --self_signed or "
                               "--tls_cert/--tls_key (or --insecure on a network you trust).")
        logger.warning("INSECURE: serving on %s without TLS; every login and password crosses the network in "
                       "clear text (--insecure).", host)
    return Address(host, port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_names(host: str) -> list[str]:
    """The names and addresses clients may use for this machine (the certificate's subject alternative names,
    and MLflow's allowed Host headers)."""
    names = [host, "localhost", "127.0.0.1", socket.gethostname(), socket.getfqdn()]
    if host in ("0.0.0.0", "::"):
        names.remove(host)
        names += _addresses()
    return list(dict.fromkeys(name for name in names if name))


def self_signed_certificate(root: Path, host: str) -> tuple[str, str]:
    """`<root>/tls/server.crt` and `server.key` for host_names(host), made once and reused."""
    folder = root / "tls"
    cert, key = folder / "server.crt", folder / "server.key"
    if cert.exists() and key.exists():
        return str(cert), str(key)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    names = host_names(host)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    alternatives = [x509.IPAddress(ipaddress.ip_address(name)) if _is_ip(name) else x509.DNSName(name)
                    for name in names]
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(private_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
                   .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return str(cert), str(key)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _addresses() -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)})
    except OSError:
        return []
