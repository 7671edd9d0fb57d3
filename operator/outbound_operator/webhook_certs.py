"""The webhook's serving certificate: made and rotated by the operator, or read from cert-manager's Secret.

Self-managed (the default): at start the operator makes a CA and a serving certificate signed by it (ECDSA
P-256, in memory only), writes the CA into the caBundle of every webhook of its
MutatingWebhookConfiguration, and serves with the certificate. Before the certificate expires it makes a
new pair, publishes the caBundle with the new CA *and* the old one, waits for the API server to see it,
and only then serves the new certificate: no admission call fails during a rotation. Each check also puts
the caBundle back if something (a careless `kubectl apply`) removed it.

cert-manager (`--webhook-cert-dir`): cert-manager writes tls.crt/tls.key into a mounted Secret and its
cainjector keeps the caBundle; the operator only reloads the files when they change.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from outbound_operator.kubeapi import read_or_none

log = logging.getLogger("outbound_operator.webhook")


@dataclass(frozen=True, kw_only=True)
class RotationSettings:
    validity: datetime.timedelta = datetime.timedelta(days=365)
    """Lifetime of each serving certificate (and of its CA); default one year."""
    renew_before: datetime.timedelta = datetime.timedelta(days=30)
    """Rotate when the certificate has less than this left; default 30 days."""
    check_interval: float = 60.0
    """Seconds between checks of the expiry date and of the caBundle (also cert-manager's files); 60."""
    propagation_delay: float = 10.0
    """Seconds between publishing a new caBundle and serving the new certificate: the API server reads
    webhook configurations through an informer, which takes a moment to see the change; 10."""
    retire_after: float = 600.0
    """Shared certificates: seconds the CAs before the current one stay in the caBundle after it is
    served, so every replica has read the new pair (they check every check_interval); 600."""


@dataclass(frozen=True, kw_only=True)
class CertificatePair:
    """A CA and the serving certificate it signed, PEM-encoded."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names the API server uses to reach a webhook Service: `<svc>.<ns>.svc` (and its variants)."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


def generate_certificates(
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    validity: datetime.timedelta = RotationSettings.validity,
) -> CertificatePair:
    """A fresh CA and a serving certificate for `dns_names` and `ip_addresses` signed by it."""
    now = _now()
    not_before = now - datetime.timedelta(minutes=5)  # tolerate some clock skew with the API server
    not_after = now + validity
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"outbound-relay webhook CA {now:%Y%m%d%H%M%S}")]
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    common_name = dns_names[0] if dns_names else ip_addresses[0]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return CertificatePair(
        ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        not_after=not_after,
    )


def load_certificate(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Make `context` serve this certificate from its next handshake on (connections open keep theirs).

    The pair is first loaded into a scratch context: a certificate and key that do not match, or either
    unreadable, raise (ssl.SSLError, ValueError or OSError) with the live context untouched. Loaded
    straight into the live one, OpenSSL would take the new certificate, drop the old key on the mismatch,
    and leave the server keyless: every handshake failing until the next good pair.

    The ssl module reads keys from files only: they pass through a private directory (0700, on the
    tmpfs the chart mounts at /tmp) and are deleted at once."""
    x509.load_pem_x509_certificate(cert_pem)  # ValueError for what is no certificate at all
    with tempfile.TemporaryDirectory(prefix="outbound-webhook-") as directory:
        cert_file, key_file = Path(directory, "tls.crt"), Path(directory, "tls.key")
        cert_file.write_bytes(cert_pem)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key_pem)
        server_context().load_cert_chain(cert_file, key_file)  # raises before the live context is touched
        context.load_cert_chain(cert_file, key_file)


def server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _not_after(cert_pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


WEBHOOK_KINDS: Final = ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")
"""The chart names both after the release: sidecar injection, and the check of OutboundAuthPolicy."""


async def patch_ca_bundle(
    api: client.ApiClient, configuration: str, ca_bundle: bytes, kind: str = WEBHOOK_KINDS[0]
) -> bool:
    """Set the caBundle of every webhook of the `kind` (Mutating- or ValidatingWebhookConfiguration) named
    `configuration` (RBAC: get and patch on that one name). False if it does not exist (yet); True once
    every webhook has `ca_bundle`."""
    admission = client.AdmissionregistrationV1Api(api)
    read, patch_call = (
        (admission.read_mutating_webhook_configuration, admission.patch_mutating_webhook_configuration)
        if kind == WEBHOOK_KINDS[0]
        else (
            admission.read_validating_webhook_configuration,
            admission.patch_validating_webhook_configuration,
        )
    )
    wanted = base64.b64encode(ca_bundle).decode()
    try:
        current: Any = await asyncio.to_thread(read, configuration)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    webhooks = current.webhooks or ()
    names = [webhook.name for webhook in webhooks]
    stale = [w.name for w in webhooks if w.client_config.ca_bundle != wanted]
    if not stale:
        return True
    # A JSON patch guarded by `test` on each name: a concurrent edit that reorders webhooks fails the
    # patch (retried at the next check) instead of writing a caBundle into the wrong entry.
    patch: list[dict[str, Any]] = []
    for index, name in enumerate(names):
        patch.append({"op": "test", "path": f"/webhooks/{index}/name", "value": name})
        patch.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": wanted})
    await asyncio.to_thread(patch_call, configuration, patch)
    log.info("caBundle of %s %s updated (webhooks %s)", kind, configuration, ", ".join(stale))
    return True


def _brief(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"{error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


class SelfManagedCertificates:
    """Makes, serves and rotates the serving certificate; keeps the caBundle of `configuration` in sync."""

    def __init__(
        self,
        *,
        context: ssl.SSLContext,
        api: client.ApiClient,
        configuration: str,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        rotation: RotationSettings = RotationSettings(),
    ) -> None:
        self.context = context
        self.api = api
        self.configuration = configuration
        self.dns_names = list(dns_names)
        self.ip_addresses = list(ip_addresses)
        self.rotation = rotation
        self.current: CertificatePair | None = None
        self._trusted: bytes = (
            b""  # the caBundle we publish: the current CA, plus the previous during a rotation
        )
        self.rotations = 0
        self.errors = 0
        """Checks that failed with an unexpected error (logged, then retried)."""

    def _issue(self) -> CertificatePair:
        return generate_certificates(self.dns_names, self.ip_addresses, self.rotation.validity)

    async def start(self) -> None:
        """First certificate: serve it and publish its CA (a missing configuration is retried later)."""
        self.current = await asyncio.to_thread(self._issue)
        load_certificate(self.context, self.current.cert_pem, self.current.key_pem)
        self._trusted = self.current.ca_pem
        await self._publish()
        log.info("webhook serving certificate issued, valid until %s", self.current.not_after.isoformat())

    async def _publish(self) -> bool:
        """True once the API server holds our caBundle, or when there is no configuration to hold it (then
        nothing calls the webhook); False on an API error, to be retried."""
        try:
            if not await patch_ca_bundle(self.api, self.configuration, self._trusted):
                log.warning(
                    "MutatingWebhookConfiguration %s not found: no Pod gets the sidecar until it exists",
                    self.configuration,
                )
            # Absent (a chart without it): nothing calls /validate-policies, nothing to publish.
            await patch_ca_bundle(self.api, self.configuration, self._trusted, WEBHOOK_KINDS[1])
            return True
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            log.warning("caBundle of %s not updated (%s); retrying", self.configuration, _brief(error))
            return False

    def due(self, now: datetime.datetime | None = None) -> bool:
        assert self.current is not None
        return (now or _now()) >= self.current.not_after - self.rotation.renew_before

    async def rotate(self) -> None:
        """New CA and certificate; trusted alongside the old CA first, served only once that is visible."""
        assert self.current is not None
        fresh = await asyncio.to_thread(self._issue)
        self._trusted = fresh.ca_pem + self.current.ca_pem
        while not await self._publish():  # noqa: ASYNC110 - retrying an API call, not waiting for an event
            await asyncio.sleep(self.rotation.check_interval)
        await asyncio.sleep(self.rotation.propagation_delay)
        load_certificate(self.context, fresh.cert_pem, fresh.key_pem)
        self.current = fresh
        self.rotations += 1
        log.info("webhook serving certificate rotated, valid until %s", fresh.not_after.isoformat())

    async def run(self) -> None:
        """Forever: rotate when due, otherwise re-assert the caBundle; cancel to stop. An unexpected error
        in one check is logged and the next check tries again: the task never ends on its own."""
        while True:
            await asyncio.sleep(self.rotation.check_interval)
            try:
                await self.check()
            except Exception as error:
                self.errors += 1
                log.error("webhook certificate check failed (%s); retrying at the next check", _brief(error))

    async def check(self) -> None:
        """One check: rotate when due, else keep the caBundle as it should be."""
        if self.due():
            await self.rotate()
        elif self._trusted != (self.current.ca_pem if self.current else b""):
            # After a rotation: the old CA has served its purpose, drop it from the bundle.
            assert self.current is not None
            self._trusted = self.current.ca_pem
            await self._publish()
        else:
            await self._publish()


class FileCertificates:
    """cert-manager's tls.crt/tls.key in a mounted directory, reloaded when the kubelet updates them."""

    def __init__(self, *, context: ssl.SSLContext, directory: Path, check_interval: float = 60.0) -> None:
        self.context = context
        self.directory = directory
        self.check_interval = check_interval
        self._loaded: tuple[bytes, bytes] | None = None
        self._refused: tuple[bytes, bytes] | None = None
        self.errors = 0
        """Pairs refused or checks failed (logged; the pair in service stays)."""

    async def start(self) -> None:
        if not self._reload():
            raise FileNotFoundError(
                f"{self.directory}: no tls.crt and tls.key (is the cert-manager Secret mounted?)"
            )

    def _reload(self) -> bool:
        try:
            pair = (
                self.directory.joinpath("tls.crt").read_bytes(),
                self.directory.joinpath("tls.key").read_bytes(),
            )
        except OSError:
            return False
        if pair not in (self._loaded, self._refused):
            # Validated as a pair in a scratch context first: a half-written pair (tls.crt renewed, tls.key
            # not yet) raises here and the pair in service stays; the next check sees the whole one.
            load_certificate(self.context, *pair)
            self._loaded = pair
            log.info(
                "webhook serving certificate loaded from %s, valid until %s",
                self.directory,
                _not_after(pair[0]),
            )
        return True

    async def run(self) -> None:
        """Forever: reload the files when they change; cancel to stop. A pair that does not load is logged
        (once) and kept out; the task never ends on its own."""
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                self._reload()
            except Exception as error:
                self.errors += 1
                try:
                    self._refused = (
                        self.directory.joinpath("tls.crt").read_bytes(),
                        self.directory.joinpath("tls.key").read_bytes(),
                    )
                except OSError:
                    self._refused = None
                log.warning(
                    "webhook certificate in %s not loaded (%s); still serving the previous one",
                    self.directory,
                    _brief(error),
                )


SERVE_AFTER_ANNOTATION: Final = "outboundrelay.io/serve-after"
"""On the shared Secret: when its pair may be served (its CA is in the caBundle by then)."""


def split_bundle(bundle: bytes) -> list[x509.Certificate]:
    """The certificates of a PEM bundle; ValueError if there are none or one is malformed."""
    certificates = x509.load_pem_x509_certificates(bundle)
    if not certificates:
        raise ValueError("no certificate in the bundle")
    return certificates


def _pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


async def read_ca_bundle(api: client.ApiClient, configuration: str) -> bytes:
    """The caBundle of the first webhook of the MutatingWebhookConfiguration `configuration` (b"" if none)."""
    admission = client.AdmissionregistrationV1Api(api)
    try:
        current: Any = await asyncio.to_thread(admission.read_mutating_webhook_configuration, configuration)
    except ApiException as error:
        if error.status == 404:
            return b""
        raise
    for webhook in current.webhooks or ():
        if webhook.client_config.ca_bundle:
            return base64.b64decode(webhook.client_config.ca_bundle)
    return b""


@dataclass(frozen=True, kw_only=True)
class StoredPair:
    """The shared Secret's content: the serving pair, the caBundle to publish, and its version."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    bundle: bytes
    serve_after: datetime.datetime
    resource_version: str


class SharedCertificates(SelfManagedCertificates):
    """Self-managed certificates shared by every replica through one Secret (type kubernetes.io/tls:
    tls.crt, tls.key, and ca.crt, the caBundle) in the operator's namespace, so that one caBundle trusts
    what each replica serves. Each replica, at start: the Secret absent, it creates it (of two replicas
    starting together one create wins, the other reads the winner's); unusable, it replaces it (guarded
    by the resourceVersion read). Then every replica reads it at each check and serves the pair it holds,
    not before its `serve-after` time. Only the replica that `may_write` (the leader) rotates it, publishes
    its caBundle, and retires old CAs: a rotated pair is stored with the new CA *and* the ones before, and
    `serve-after` `propagation_delay` later; the CAs before are dropped `retire_after` after that, when
    every replica has long read the new pair."""

    def __init__(
        self,
        *,
        secret: str,
        namespace: str,
        may_write: Callable[[], bool] = lambda: True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.secret = secret
        self.namespace = namespace
        self.may_write = may_write
        self.core = client.CoreV1Api(self.api)
        self.stored: StoredPair | None = None

    # --- the Secret ---------------------------------------------------------------------------------

    async def _read(self) -> dict[str, Any] | None:
        return await asyncio.to_thread(
            read_or_none, self.core.read_namespaced_secret, self.secret, self.namespace
        )

    def _parse(self, body: Mapping[str, Any]) -> StoredPair | None:
        """The Secret's pair if it is usable (a certificate and key that match, for our names, a bundle
        that holds the certificate's CA); None otherwise (logged)."""
        data = body.get("data") or {}
        metadata = body.get("metadata") or {}
        try:
            cert_pem, key_pem, bundle = (base64.b64decode(data[k]) for k in ("tls.crt", "tls.key", "ca.crt"))
            load_certificate(server_context(), cert_pem, key_pem)
            cert = x509.load_pem_x509_certificate(cert_pem)
            issuers = {ca.subject for ca in split_bundle(bundle)}
            if cert.issuer not in issuers:
                raise ValueError("ca.crt does not hold the certificate's issuer")
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            wanted: set[x509.GeneralName] = {x509.DNSName(n) for n in self.dns_names}
            wanted |= {x509.IPAddress(ipaddress.ip_address(ip)) for ip in self.ip_addresses}
            if set(names) != wanted:
                raise ValueError("the certificate is for other names")
            annotation = (metadata.get("annotations") or {}).get(SERVE_AFTER_ANNOTATION)
            serve_after = datetime.datetime.fromisoformat(annotation) if annotation else _now()
        except (KeyError, ValueError, TypeError, ssl.SSLError, OSError, x509.ExtensionNotFound) as error:
            log.warning(
                "Secret %s/%s holds no usable webhook certificate (%s)",
                self.namespace,
                self.secret,
                _brief(error) if isinstance(error, ApiException) else type(error).__name__ + f": {error}",
            )
            return None
        return StoredPair(
            cert_pem=cert_pem,
            key_pem=key_pem,
            bundle=bundle,
            serve_after=serve_after,
            resource_version=str(metadata.get("resourceVersion", "")),
        )

    async def _write(
        self, pair: tuple[bytes, bytes], bundle: bytes, serve_after: datetime.datetime, version: str | None
    ) -> bool:
        """Create the Secret (`version` None) or replace the one read at `version`; False if another
        replica wrote first (409)."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": self.secret,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "outbound-operator"},
                "annotations": {SERVE_AFTER_ANNOTATION: serve_after.isoformat()},
            },
            "data": {
                "tls.crt": base64.b64encode(pair[0]).decode(),
                "tls.key": base64.b64encode(pair[1]).decode(),
                "ca.crt": base64.b64encode(bundle).decode(),
            },
        }

        def call() -> bool:
            try:
                if version is None:
                    self.core.create_namespaced_secret(
                        self.namespace,
                        cast(Any, body),
                        field_manager="outbound-operator",
                        _preload_content=False,
                    )
                else:
                    body["metadata"]["resourceVersion"] = version
                    self.core.replace_namespaced_secret(
                        self.secret,
                        self.namespace,
                        cast(Any, body),
                        field_manager="outbound-operator",
                        _preload_content=False,
                    )
            except ApiException as error:
                if error.status in (404, 409):  # created, changed or deleted meanwhile by another replica
                    return False
                raise
            return True

        return await asyncio.to_thread(call)

    # --- serving ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the shared pair, making it first if there is none (or none usable)."""
        for attempt in range(10):
            body = await self._read()
            stored = None if body is None else self._parse(body)
            if stored is not None:
                break
            if attempt:
                await asyncio.sleep(self.rotation.propagation_delay / 10)
            # The first replica (or a Secret removed or spoiled): make a pair. The CAs the API server
            # trusts now stay trusted a while: the replicas of an older version keep serving with them
            # during a rolling upgrade.
            fresh = await asyncio.to_thread(self._issue)
            bundle = fresh.ca_pem + _pem(
                self._still_valid(await read_ca_bundle(self.api, self.configuration))
            )
            version = None if body is None else str((body.get("metadata") or {}).get("resourceVersion"))
            if await self._write((fresh.cert_pem, fresh.key_pem), bundle, _now(), version):
                log.info("webhook certificate made and stored in Secret %s/%s", self.namespace, self.secret)
                self._trusted = bundle
                await self._publish()
        else:
            raise RuntimeError(f"Secret {self.namespace}/{self.secret}: no usable webhook certificate stored")
        assert stored is not None
        await self._adopt(stored, wait=False)
        if self.may_write():
            self._trusted = stored.bundle
            await self._publish()

    @staticmethod
    def _still_valid(bundle: bytes) -> list[x509.Certificate]:
        try:
            certificates = split_bundle(bundle) if bundle.strip() else []
        except ValueError:
            return []
        return [c for c in certificates if c.not_valid_after_utc > _now()]

    async def _adopt(self, stored: StoredPair, *, wait: bool = True) -> None:
        """Serve `stored` (at its serve-after time, if `wait`) unless already served."""
        if self.stored is not None and self.stored.cert_pem == stored.cert_pem:
            self.stored = stored
            return
        delay = (stored.serve_after - _now()).total_seconds()
        if wait and delay > 0:
            await asyncio.sleep(min(delay, self.rotation.propagation_delay))
        load_certificate(self.context, stored.cert_pem, stored.key_pem)
        first = self.stored is None
        self.stored = stored
        self.current = CertificatePair(
            ca_pem=stored.bundle,
            cert_pem=stored.cert_pem,
            key_pem=stored.key_pem,
            not_after=_not_after(stored.cert_pem),
        )
        if not first:
            self.rotations += 1
        log.info(
            "webhook serving certificate %s Secret %s/%s, valid until %s",
            "loaded from" if first else "rotated, from",
            self.namespace,
            self.secret,
            self.current.not_after.isoformat(),
        )

    async def check(self) -> None:
        """One check: serve what the Secret holds; the leader also rotates, retires and publishes."""
        body = await self._read()
        stored = None if body is None else self._parse(body)
        if stored is not None:
            await self._adopt(stored)
        if not self.may_write():
            return
        if stored is None or self.due():
            await self._rotate_shared(body)
            return
        bundle = stored.bundle
        current_ca = [c for c in split_bundle(bundle) if c.subject == self._issuer()]
        if len(split_bundle(bundle)) > len(current_ca) and _now() > stored.serve_after + datetime.timedelta(
            seconds=self.rotation.retire_after
        ):
            # Every replica has served the current pair for a while: the CAs before it are no longer needed.
            bundle = _pem(current_ca)
            pair = (stored.cert_pem, stored.key_pem)
            if not await self._write(pair, bundle, stored.serve_after, stored.resource_version):
                return
            log.info("webhook caBundle: CAs of earlier certificates retired")
        self._trusted = bundle
        await self._publish()

    def _issuer(self) -> x509.Name:
        assert self.current is not None
        return x509.load_pem_x509_certificate(self.current.cert_pem).issuer

    async def _rotate_shared(self, body: Mapping[str, Any] | None) -> None:
        fresh = await asyncio.to_thread(self._issue)
        bundle = fresh.ca_pem + _pem(self._still_valid(self.current.ca_pem if self.current else b""))
        serve_after = _now() + datetime.timedelta(seconds=self.rotation.propagation_delay)
        version = None if body is None else str((body.get("metadata") or {}).get("resourceVersion"))
        if not await self._write((fresh.cert_pem, fresh.key_pem), bundle, serve_after, version):
            return  # another replica wrote it: read at the next check
        log.info("webhook certificate renewed in Secret %s/%s", self.namespace, self.secret)
        self._trusted = bundle
        await self._publish()
        stored = await self._read()
        parsed = None if stored is None else self._parse(stored)
        if parsed is not None:
            await self._adopt(parsed)
