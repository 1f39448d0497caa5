"""A local CA, per-service certificates and a token key: what `recsys certs`
writes, `recsys serve` (make run) makes into its run directory, and the
tests use.

Layout of the output directory (each service's folder is what cert-manager
writes into a `kubernetes.io/tls` Secret, so `<SERVICE>_TLS_DIR` points at
either the same way):

    ca.crt, ca.key            the CA (keep ca.key away from services)
    <identity>/tls.crt        leaf certificate: URI SAN spiffe://recsys/<identity>,
    <identity>/tls.key        DNS SANs <identity>, <identity>.<ns>, <identity>.<ns>.svc,
    <identity>/ca.crt         <identity>.<ns>.svc.cluster.local (the gateway's also
                              localhost and 127.0.0.1, for callers of its public port)
    jwt.key                   HS256 secret the services verify tokens with
    admin.token               a JWT with the admin role (`recsys serve` only)
    redis/users.acl           Redis ACL users (default off, profile, admin, probe)
    redis/profile.password    the profile user's password (admin.password: operators')

Identities: the four services, and the writers outside them: `ingest`
(profile.IngestEvents), `catalogue` (embedding.UpsertItems), `admin` (an
operator's client certificate, to reach internal services with an admin token).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("gateway", "profile", "embedding", "ranking")
WRITERS = ("ingest", "catalogue", "admin")
IDENTITIES = SERVICES + WRITERS
NAMESPACE = "recsys"
CA_DAYS, LEAF_DAYS = 365, 90
JWT_KEY_FILE, ADMIN_TOKEN_FILE = "jwt.key", "admin.token"


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    if private:
        os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def make_ca(out: Path, common_name: str = "recsys local CA", days: int = CA_DAYS):
    """A self-signed CA into out/ca.crt and out/ca.key; returns (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(out / "ca.crt", _pem_cert(cert))
    _write(out / "ca.key", _pem_key(key), private=True)
    return cert, key


def issue(ca_cert, ca_key, identity: str, out: Path, namespace: str = NAMESPACE, days: int = LEAF_DAYS,
          extra_dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> None:
    """A leaf certificate for `identity` into out/{tls.crt,tls.key,ca.crt}."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from recsys_core.rpc.transport import spiffe_id

    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    dns = [identity, f"{identity}.{namespace}", f"{identity}.{namespace}.svc",
           f"{identity}.{namespace}.svc.cluster.local", *extra_dns]
    names = [x509.UniformResourceIdentifier(spiffe_id(identity)), *(x509.DNSName(d) for d in dns),
             *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(out / "tls.crt", _pem_cert(cert))
    _write(out / "tls.key", _pem_key(key), private=True)
    _write(out / "ca.crt", _pem_cert(ca_cert))


def make_certs(out: Path, identities=IDENTITIES, namespace: str = NAMESPACE,
               ca_name: str = "recsys local CA") -> Path:
    """A fresh CA and a certificate per identity, plus a token key, into `out`."""
    out = Path(out)
    ca_cert, ca_key = make_ca(out, ca_name)
    for identity in identities:
        local = ("localhost",) if identity == "gateway" else ()
        issue(ca_cert, ca_key, identity, out / identity, namespace,
              extra_dns=local, ips=("127.0.0.1",) if identity == "gateway" else ())
    if not (out / JWT_KEY_FILE).is_file():
        _write(out / JWT_KEY_FILE, secrets.token_hex(32).encode() + b"\n", private=True)
    write_redis_acl(out / "redis")
    return out


def write_redis_acl(out: Path) -> None:
    """Redis ACL users (recsys_core/store/local_redis.acl_lines) for the redis-acl
    Secret (users.acl), the profile service's password (profile-redis Secret)
    and the embedding service's (embedding-redis Secret: the shared catalogue)."""
    from recsys_core.store.local_redis import acl_lines, make_passwords

    if (out / "users.acl").is_file():
        return
    passwords = make_passwords()
    _write(out / "users.acl", ("\n".join(acl_lines(passwords)) + "\n").encode(), private=True)
    _write(out / "profile.password", passwords["profile"].encode(), private=True)
    _write(out / "embedding.password", passwords["embedding"].encode(), private=True)
    _write(out / "admin.password", passwords["admin"].encode(), private=True)


def valid_for(cert_path: Path) -> float:
    """Seconds until the certificate at `cert_path` expires (negative: expired; -inf: unreadable)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        return float("-inf")
    return (cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)).total_seconds()


@dataclass(frozen=True)
class LocalSecurity:
    """The certificates and token key of a local stack (`recsys serve`), made once and reused."""

    directory: Path

    @classmethod
    def ensure(cls, directory: Path, min_days: float = 1.0) -> "LocalSecurity":
        """Reuses `directory` when every certificate is there and valid for
        `min_days` more; else makes them anew (and keeps the token key)."""
        directory = Path(directory)
        needed = [directory / "ca.crt", *(directory / i / "tls.crt" for i in IDENTITIES)]
        if (directory / JWT_KEY_FILE).is_file() and all(valid_for(p) > min_days * 86400 for p in needed):
            return cls(directory)
        make_certs(directory)
        return cls(directory)

    def tls_dir(self, identity: str) -> Path:
        return self.directory / identity

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def jwt_key(self) -> Path:
        return self.directory / JWT_KEY_FILE

    def security(self, identity: str, **changes):
        from recsys_core.rpc.transport import Security

        return Security.from_dir(identity, self.tls_dir(identity), **changes)

    def auth(self, **changes):
        from recsys_core.rpc.access import AuthConfig

        return AuthConfig(jwt_key_file=str(self.jwt_key), **changes)

    def token(self, subject: str, roles, tenant: str = "", seconds: float = 3600) -> str:
        from recsys_core.rpc.access import mint_token

        return mint_token(self.jwt_key.read_bytes(), subject, roles, tenant=tenant, seconds=seconds)

    def ghz_args(self, service: str, identity: str = "admin", token: str | None = None,
                 plaintext: bool = False) -> list[str]:
        """ghz flags for a call to `service`: TLS with the CA (and `identity`'s client
        certificate for internal services), the token as metadata, for reflection too."""
        import json

        args = ["--insecure"] if plaintext else ["--cacert", str(self.ca), "--cname", service]
        if not plaintext and service != "gateway":
            args += ["--cert", str(self.tls_dir(identity) / "tls.crt"), "--key", str(self.tls_dir(identity) / "tls.key")]
        if token:
            metadata = json.dumps({"authorization": f"Bearer {token}"})
            args += ["--metadata", metadata, "--reflect-metadata", metadata]
        return args

    def write_admin_token(self, seconds: float = 7 * 86400) -> Path:
        path = self.directory / ADMIN_TOKEN_FILE
        _write(path, (self.token("local-admin", ["admin"], seconds=seconds) + "\n").encode(), private=True)
        return path


def certs_main(argv: list[str] | None = None) -> int:
    """`recsys certs`: a local CA and certificates (development, tests, or Secrets for a cluster without cert-manager)."""
    parser = argparse.ArgumentParser(prog="recsys certs", description=certs_main.__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--namespace", default=NAMESPACE, help="Kubernetes namespace in the DNS names")
    parser.add_argument("--identity", action="append", help=f"only these (default: {', '.join(IDENTITIES)})")
    args = parser.parse_args(argv)
    make_certs(args.out, tuple(args.identity or IDENTITIES), args.namespace)
    print(f"CA {args.out / 'ca.crt'}; certificates for {', '.join(args.identity or IDENTITIES)} in "
          f"{args.out}/<identity>/ (tls.crt, tls.key, ca.crt); token key {args.out / JWT_KEY_FILE}")
    return 0


def token_main(argv: list[str] | None = None) -> int:
    """`recsys token`: a JWT signed with an HS256 key file (the local stack's by default)."""
    from recsys_core.data import paths
    from recsys_core.rpc.access import ROLES, mint_token

    parser = argparse.ArgumentParser(prog="recsys token", description=token_main.__doc__)
    parser.add_argument("--key", type=Path, default=paths.REPO_ROOT / "var" / "tls" / JWT_KEY_FILE,
                        help="HS256 secret (default: the one `recsys serve` made)")
    parser.add_argument("--sub", required=True, help="subject: a shopper id, or a client's name")
    parser.add_argument("--role", action="append", choices=ROLES, required=True)
    parser.add_argument("--tenant", default="")
    parser.add_argument("--hours", type=float, default=1.0)
    args = parser.parse_args(argv)
    print(mint_token(args.key.read_bytes(), args.sub, args.role, tenant=args.tenant, seconds=args.hours * 3600))
    return 0


if __name__ == "__main__":
    sys.exit(certs_main())
