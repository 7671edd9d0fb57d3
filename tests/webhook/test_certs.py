"""webhook_certs.py without a cluster: the certificates it makes, and a context that swaps them live."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from outbound_operator import webhook_certs
from outbound_operator.webhook import WebhookSettings, WebhookUnhealthyError, serve
from outbound_operator.webhook_certs import (
    WEBHOOK_KINDS,
    FileCertificates,
    RotationSettings,
    SelfManagedCertificates,
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


async def test_a_mismatched_pair_leaves_the_served_one_in_place(tmp_path: Path) -> None:
    """cert-manager renews tls.crt and tls.key one after the other: a check between the two sees a new
    certificate with the old key. The live context must keep serving the old pair (loaded straight into
    it, OpenSSL drops the key and every handshake fails), and the upkeep must go on to load the whole one."""
    first = generate_certificates([], ["127.0.0.1"])
    renewed = generate_certificates([], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(first.cert_pem)
    (tmp_path / "tls.key").write_bytes(first.key_pem)
    context = server_context()
    files = FileCertificates(context=context, directory=tmp_path, check_interval=0.05)
    await files.start()
    server = await _serve(context)
    port = server.sockets[0].getsockname()[1]
    upkeep = asyncio.create_task(files.run())
    try:
        (tmp_path / "tls.crt").write_bytes(renewed.cert_pem)  # the key is still the old one
        for _ in range(100):
            await asyncio.sleep(0.05)
            if files.errors:
                break
        assert files.errors >= 1
        assert await _handshake(port, first.ca_pem) == _der(first.cert_pem)
        (tmp_path / "tls.crt").write_bytes(b"not a certificate")  # garbage: refused the same way
        await asyncio.sleep(0.2)
        assert not upkeep.done()
        assert await _handshake(port, first.ca_pem) == _der(first.cert_pem)
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


def test_load_certificate_refuses_a_mismatched_pair_without_touching_the_context() -> None:
    first = generate_certificates([], ["127.0.0.1"])
    other = generate_certificates([], ["127.0.0.1"])
    context = server_context()
    load_certificate(context, first.cert_pem, first.key_pem)
    with pytest.raises(ssl.SSLError):
        load_certificate(context, other.cert_pem, first.key_pem)
    with pytest.raises(ValueError):
        load_certificate(context, b"garbage", first.key_pem)
    # Still a working pair: the same check OpenSSL makes at the handshake.
    assert context.cert_store_stats() is not None
    load_certificate(server_context(), first.cert_pem, first.key_pem)


async def test_self_managed_upkeep_survives_unexpected_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error the upkeep did not foresee (a ValueError deserializing the API's answer, an OSError
    writing the key) is logged and the next check runs: the task never dies silently."""
    calls: list[int] = []

    async def flaky(_api: object, _configuration: str, _bundle: bytes, kind: str = WEBHOOK_KINDS[0]) -> bool:
        if kind != WEBHOOK_KINDS[0]:
            return True  # the ValidatingWebhookConfiguration: counted once per check is enough
        calls.append(len(calls))
        if 2 <= len(calls) <= 4:  # the first (at start) succeeds
            raise ValueError("Invalid value for `webhooks`, must not be `None`")
        return True

    monkeypatch.setattr(webhook_certs, "patch_ca_bundle", flaky)
    certificates = SelfManagedCertificates(
        context=server_context(),
        api=cast(Any, None),
        configuration="outbound-relay",
        dns_names=["outbound-relay-webhook"],
        rotation=RotationSettings(check_interval=0.02),
    )
    await certificates.start()
    upkeep = asyncio.create_task(certificates.run())
    try:
        for _ in range(200):
            await asyncio.sleep(0.02)
            if len(calls) > 5:
                break
        assert not upkeep.done()
        assert certificates.errors == 3 and len(calls) > 5
    finally:
        upkeep.cancel()


async def test_liveness_fails_when_the_upkeep_stops(tmp_path: Path) -> None:
    pair = generate_certificates([], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    settings = WebhookSettings(host="127.0.0.1", port=0, cert_dir=tmp_path)
    async with serve(settings) as server:
        assert server.health()["reviews"] == 0
        assert server.upkeep is not None
        server.upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server.upkeep
        with pytest.raises(WebhookUnhealthyError, match="certificate upkeep has stopped"):
            server.health()
