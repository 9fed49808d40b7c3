"""The team server's address rules and its self-signed certificate, without starting a server."""

from __future__ import annotations

import ipaddress
import logging
import ssl

import pytest

from ldmflow.errors import LdmflowError
from ldmflow.server.tls import choose_address, is_loopback, self_signed_certificate


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                            ("0.0.0.0", False), ("10.0.0.5", False), ("example.com", False)])
def test_only_loopback_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_loopback_serves_plain_http_and_other_addresses_need_tls_or_insecure(tmp_path, caplog):
    assert choose_address(tmp_path, "127.0.0.1", 5000, None, None, False, False).url == "http://127.0.0.1:5000"
    with pytest.raises(LdmflowError, match="Refusing to serve passwords in clear text on 10.0.0.5"):
        choose_address(tmp_path, "10.0.0.5", 5000, None, None, False, False)
    with caplog.at_level(logging.WARNING):
        assert choose_address(tmp_path, "10.0.0.5", 5000, None, None, False, True).url == "http://10.0.0.5:5000"
    assert "INSECURE" in caplog.text
    with pytest.raises(LdmflowError, match="both --tls_cert and --tls_key"):
        choose_address(tmp_path, "10.0.0.5", 5000, str(tmp_path / "cert.pem"), None, False, False)


def test_the_self_signed_certificate_names_the_host_keeps_its_key_private_and_is_reused(tmp_path):
    from cryptography import x509

    address = choose_address(tmp_path, "10.0.0.5", 5443, None, None, True, False)
    assert address.url == "https://10.0.0.5:5443" and address.key.endswith("server.key")
    certificate = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.crt").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.5") in names.get_values_for_type(x509.IPAddress)
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert (tmp_path / "tls" / "server.key").stat().st_mode & 0o077 == 0
    ssl.create_default_context(cafile=address.cert)  # loads as a trust anchor, as clients use it
    assert self_signed_certificate(tmp_path, "10.0.0.5") == (address.cert, address.key)
