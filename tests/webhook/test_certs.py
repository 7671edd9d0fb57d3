"""webhook_certs.py without a cluster: the certificates it makes, and a context that swaps them live."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from outbound_operator.webhook_certs import (
    FileCertificates,
    generate_certificates,
    load_certificate,
    server_context,
    service_dns_names,
)


def test_serving_certificate_names_the_service() -> None:
    names = service_dns_names("outbound-relay-webhook", "mail-system")
    pair = generate_certificates(names, ["127.0.0.1"], datetime.timedelta(days=30))
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "outbound-relay-webhook.mail-system.svc" in sans.get_values_for_type(x509.DNSName)
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ca = x509.load_pem_x509_certificate(pair.ca_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert.verify_directly_issued_by(ca)
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=29) < lifetime <= datetime.timedelta(days=30)
    assert pair.not_after == cert.not_valid_after_utc.replace(microsecond=pair.not_after.microsecond)
    assert "key_pem" not in repr(pair)


async def _handshake(port: int, ca_pem: bytes) -> bytes:
    """The DER certificate the server at 127.0.0.1:port presents to a client trusting only ca_pem."""
    client = ssl.create_default_context(cadata=ca_pem.decode())
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname="127.0.0.1"
    )
    ssl_object = writer.get_extra_info("ssl_object")
    der: bytes = ssl_object.getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return der


async def _serve(context: ssl.SSLContext) -> asyncio.Server:
    async def close(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(close, "127.0.0.1", 0, ssl=context)


def _der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


async def test_a_loaded_certificate_serves_from_the_next_handshake() -> None:
    first = generate_certificates([], ["127.0.0.1"])
    second = generate_certificates([], ["127.0.0.1"])
    context = server_context()
    load_certificate(context, first.cert_pem, first.key_pem)
    server = await _serve(context)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await _handshake(port, first.ca_pem) == _der(first.cert_pem)
        load_certificate(context, second.cert_pem, second.key_pem)  # rotation: same context, same socket
        assert await _handshake(port, second.ca_pem) == _der(second.cert_pem)
        # A client holding both CAs (the caBundle during a rotation) accepts either.
        assert await _handshake(port, second.ca_pem + first.ca_pem) == _der(second.cert_pem)
    finally:
        server.close()
        await server.wait_closed()


async def test_cert_manager_files_are_reloaded_when_they_change(tmp_path: Path) -> None:
    first = generate_certificates([], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(first.cert_pem)
    (tmp_path / "tls.key").write_bytes(first.key_pem)
    context = server_context()
    files = FileCertificates(context=context, directory=tmp_path, check_interval=0.05)
    await files.start()
    server = await _serve(context)
    port = server.sockets[0].getsockname()[1]
    upkeep = asyncio.create_task(files.run())
    try:
        assert await _handshake(port, first.ca_pem) == _der(first.cert_pem)
        renewed = generate_certificates([], ["127.0.0.1"])
        (tmp_path / "tls.key").write_bytes(renewed.key_pem)
        (tmp_path / "tls.crt").write_bytes(renewed.cert_pem)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if files._loaded == (renewed.cert_pem, renewed.key_pem):
                break
        assert await _handshake(port, renewed.ca_pem) == _der(renewed.cert_pem)
    finally:
        upkeep.cancel()
        server.close()
        await server.wait_closed()
