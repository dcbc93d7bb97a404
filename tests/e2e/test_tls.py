"""TLS from Hypercorn, with certificates this test makes: a relying-party instance that
requires client certificates (mutual TLS) and a device instance for phones, on one
database, token and directory (docs/how-to/deploy.md)."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from loadtests.run import free_port
from tapsign_sdk.client import ApiError, Client
from tapsign_sdk.device import Device
from tests.e2e.serving import TAPSIGN, environment, prepare
from tests.e2e.test_flows import enrolled
from tests.e2e.test_hosts import SHOP


@dataclass(frozen=True)
class Issued:
    certificate: Path
    key: Path


def _issue(
    directory: Path,
    name: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
) -> tuple[Issued, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A P-256 key and a certificate for ``name``, signed by ``issuer`` (None: a CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    certificate = builder.sign(key if issuer is None else issuer[1], hashes.SHA256())
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    issued.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    issued.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return issued, certificate, key


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client: Issued
    #: A client certificate from a CA the server does not know.
    stranger: Issued

    def context(self, client: Issued | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca.certificate)
        if client is not None:
            context.load_cert_chain(client.certificate, client.key)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_certificate, ca_key = _issue(directory, "ca", issuer=None)
    _, other_certificate, other_key = _issue(directory, "other-ca", issuer=None)
    server = _issue(
        directory, "server", issuer=(ca_certificate, ca_key), usage=ExtendedKeyUsageOID.SERVER_AUTH
    )[0]
    client = _issue(
        directory, "bank", issuer=(ca_certificate, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )[0]
    stranger = _issue(
        directory,
        "stranger",
        issuer=(other_certificate, other_key),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )[0]
    return Pki(ca=ca, server=server, client=client, stranger=stranger)


@contextmanager
def _instance(directory: Path, name: str, config: str, context: ssl.SSLContext) -> Iterator[str]:
    """``tapsign serve`` in ``directory`` with the configuration ``config`` (its own file),
    until it answers over TLS; its URL."""
    (directory / f"{name}.toml").write_text(config)
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    with (directory / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - our own executable
            [str(TAPSIGN), "serve", "--port", str(port), "--workers", "1"],
            cwd=directory,
            env={**environment(), "TAPSIGN_CONFIG": f"{name}.toml"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz", verify=context, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (directory / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "the TLS instance did not start"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_mutual_tls_for_the_bank_and_tls_for_the_phones(pki: Pki, tmp_path: Path) -> None:
    directory = tmp_path / "server"
    access_key = prepare(directory)
    tls = f'certfile = "{pki.server.certificate}"\nkeyfile = "{pki.server.key}"\n'
    bank_side = (
        f'[server]\n{tls}client_ca_file = "{pki.ca.certificate}"\napis = ["relying-party"]\n'
        'public_url = "https://tapsign.test"\n'
    )
    phone_side = f'[server]\n{tls}apis = ["device"]\npublic_url = "https://tapsign.test"\n'
    with (
        _instance(directory, "bank-side", bank_side, pki.context(pki.client)) as bank_url,
        _instance(directory, "phone-side", phone_side, pki.context()) as phone_url,
    ):
        bank = httpx.Client(base_url=bank_url, verify=pki.context(pki.client), timeout=40)
        with (
            Client(bank_url, access_key, http=bank) as client,
            closing(
                Device(phone_url, http=httpx.Client(base_url=phone_url, verify=pki.context()))
            ) as phone,
        ):
            username = enrolled(client, phone)  # the bank over mutual TLS, the phone over TLS
            payment = client.approve(username=username, amount="9.99", currency="EUR", payee=SHOP)
            assert phone.approve(phone.fetch(payment.transaction_id)).status == "succeeded"
            # The bank-side process hears of the answer a notice later: a long-poll ends then.
            assert client.status(payment.status_token, wait=10).status == "succeeded"

        # No client certificate, or one from a CA the server does not know: no handshake.
        for context in (pki.context(), pki.context(pki.stranger)):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"{bank_url}/readyz", verify=context)
        # Plain HTTP to a TLS port is no way in either.
        with pytest.raises(httpx.TransportError):
            httpx.get(bank_url.replace("https", "http") + "/readyz")
        # Each instance serves its own API only; the JWKS and health are everywhere.
        with Client(
            phone_url, access_key, http=httpx.Client(base_url=phone_url, verify=pki.context())
        ) as wrong:
            with pytest.raises(ApiError) as refused:
                wrong.approve(username=username)
            assert refused.value.status == 404
        device_route = httpx.get(f"{bank_url}/device/v1/operations", verify=pki.context(pki.client))
        assert device_route.status_code == 404
        for url, context in ((bank_url, pki.context(pki.client)), (phone_url, pki.context())):
            assert httpx.get(f"{url}/.well-known/jwks.json", verify=context).status_code == 200
