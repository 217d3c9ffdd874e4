"""A throwaway certificate authority for tests of mutual TLS between the Router and the Workload
Manager (`tests/e2e/test_mtls.py`, the chart's `mtls.enabled` in `scripts/cluster.py`): a CA and
leaf certificates naming a SPIFFE ID, written as PEM files. Test support only."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


def spiffe_id(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1)))


class Pki:
    """A CA whose certificate is `<dir>/ca.pem`; `leaf` writes `<dir>/<name>.crt` and `.key`."""

    def __init__(self, d: Path):
        self.dir = d
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentcube test CA")])
        usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)
        self.cert = (_validity(x509.CertificateBuilder()).subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(usage, critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.bundle = d / "ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str, spiffe: str, usage: x509.ObjectIdentifier,
             dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """A certificate for `usage` naming `spiffe` as its URI SAN (and `dns` names):
        (certificate, key) files."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_validity(x509.CertificateBuilder())
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.name).public_key(key.public_key())
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe),
                                                            *map(x509.DNSName, dns)]), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(self.key, hashes.SHA256()))
        crt, pem = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return crt, pem
