"""Transport security: how a service proves who it is and checks who it talks to.

Between services it is mutual TLS. Each service has a certificate from the
platform's own CA (`recsys certs`, or cert-manager in Kubernetes) laid out
as cert-manager writes a Secret: `tls.crt`, `tls.key`, `ca.crt` in one
directory (`<SERVICE>_TLS_DIR`). A server requires a client certificate of
that CA; a client checks the server's certificate against the CA and against
the name of the service it means to reach.

Identities. A service's identity is the SPIFFE ID in its certificate's URI
SAN, `spiffe://recsys/<service>` (`identity_of`); the DNS SANs are only the
names it answers to (`<service>`, `<service>.<namespace>.svc`, ...). DNS
names say where a host is and certificates for them are issued for many
reasons (an Ingress, a debug pod); a URI naming a workload in our trust
domain says what the caller is, is what gRPC reports as `peer_spiffe_id`,
and is what cert-manager's `uris:` field and SPIFFE issuers produce. The CN
is not used (deprecated for identity, and not checked by TLS itself).

Clients verify the server's DNS name: always the bare service name
(`profile`), whatever address they dial (127.0.0.1:port locally,
`profile:50053` in Kubernetes), so a certificate of another service at the
same address is refused.

Plaintext is only ever chosen explicitly (`<SERVICE>_INSECURE=1`), for local
development: then nothing is encrypted, and a caller's identity is what it
declares in the `x-recsys-dev-service` metadata (clients made here declare
their own). A service with neither certificates nor that switch refuses to
start (`Security.check`).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from recsys_core.rpc.envconfig import ConfigError, EnvReader

log = logging.getLogger(__name__)

TRUST_DOMAIN = "recsys"
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"
# In plaintext (development) mode only: the caller's self-declared service name.
DEV_IDENTITY_HEADER = "x-recsys-dev-service"


def spiffe_id(service: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{service}"


def identity_of(spiffe: str | bytes | None) -> str | None:
    """`spiffe://recsys/<service>` -> "<service>"; None for anything else
    (another trust domain, a nested path, no ID)."""
    if spiffe is None:
        return None
    if isinstance(spiffe, bytes):
        spiffe = spiffe.decode("utf-8", "replace")
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    if not spiffe.startswith(prefix):
        return None
    name = spiffe[len(prefix):]
    return name if name and "/" not in name else None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read the {what} {path}: {error.strerror}") from None


@dataclass(frozen=True)
class Security:
    """One service's transport settings (read by its config's `from_env`).

    `service` is its own name: its certificate must carry `spiffe://recsys/<service>`,
    and in plaintext mode it is the identity it declares.
    """

    service: str = ""
    tls_dir: str = ""
    # Single files, overriding the ones in tls_dir.
    cert: str = ""
    key: str = ""
    ca: str = ""
    # Explicit plaintext, local development only.
    insecure: bool = False
    # Server reflection (grpcurl, ghz without .proto files): local development.
    reflection: bool = False
    # The gateway's public port: "tls" (its certificate, or public_cert/public_key)
    # or "plaintext" (behind a TLS-terminating proxy, or local development).
    # Callers there authenticate with tokens, not certificates.
    public: str = "tls"
    public_cert: str = ""
    public_key: str = ""

    @classmethod
    def from_env(cls, env: EnvReader, service: str, public: bool = False) -> "Security":
        """<P>TLS_DIR, <P>TLS_CERT, <P>TLS_KEY, <P>TLS_CA, <P>INSECURE, <P>REFLECTION;
        with `public` (the gateway) also <P>PUBLIC_TLS (true|false), <P>PUBLIC_TLS_CERT, <P>PUBLIC_TLS_KEY."""
        settings = dict(
            service=service,
            tls_dir=env.str("TLS_DIR", ""),
            cert=env.str("TLS_CERT", ""),
            key=env.str("TLS_KEY", ""),
            ca=env.str("TLS_CA", ""),
            insecure=env.bool("INSECURE", False),
            reflection=env.bool("REFLECTION", False),
        )
        if public:
            settings.update(
                public="tls" if env.bool("PUBLIC_TLS", True) else "plaintext",
                public_cert=env.str("PUBLIC_TLS_CERT", ""),
                public_key=env.str("PUBLIC_TLS_KEY", ""),
            )
        security = cls(**settings)
        if security.insecure and security.has_tls_files:
            raise ConfigError(f"{env.prefix}INSECURE=1 and {env.prefix}TLS_* are both set: choose one")
        return security

    @classmethod
    def from_dir(cls, service: str, tls_dir: str | Path, **changes) -> "Security":
        return cls(service=service, tls_dir=str(tls_dir), **changes)

    @classmethod
    def plaintext(cls, service: str, **changes) -> "Security":
        return cls(service=service, insecure=True, **changes)

    # -- files -------------------------------------------------------------------

    @property
    def has_tls_files(self) -> bool:
        return bool(self.tls_dir or self.cert or self.key or self.ca)

    def _path(self, explicit: str, name: str) -> str:
        if explicit:
            return explicit
        return str(Path(self.tls_dir) / name) if self.tls_dir else ""

    @property
    def cert_path(self) -> str:
        return self._path(self.cert, CERT_FILE)

    @property
    def key_path(self) -> str:
        return self._path(self.key, KEY_FILE)

    @property
    def ca_path(self) -> str:
        return self._path(self.ca, CA_FILE)

    def check(self) -> None:
        """Refuses a service without certificates unless plaintext was asked for."""
        if self.insecure:
            return
        prefix = f"{self.service.upper()}_" if self.service else ""
        missing = [what for what, path in (("certificate", self.cert_path), ("key", self.key_path),
                                          ("CA", self.ca_path)) if not path]
        if missing:
            raise ConfigError(
                f"{self.service or 'service'}: no TLS {', '.join(missing)} configured: set {prefix}TLS_DIR (a "
                f"directory with {CERT_FILE}, {KEY_FILE}, {CA_FILE}: `recsys certs`) or {prefix}TLS_CERT, "
                f"{prefix}TLS_KEY, {prefix}TLS_CA; plaintext only with {prefix}INSECURE=1 (local development)")
        for path, what in ((self.cert_path, "certificate"), (self.key_path, "key"), (self.ca_path, "CA")):
            _read(path, what)
        if self.public == "tls" and bool(self.public_cert) != bool(self.public_key):
            raise ConfigError(f"{prefix}PUBLIC_TLS_CERT and {prefix}PUBLIC_TLS_KEY go together")

    def describe(self) -> str:
        if self.insecure:
            return "PLAINTEXT (development: no encryption, callers' identities not verified)"
        return f"mTLS as {spiffe_id(self.service)} ({self.cert_path})"

    def describe_public(self) -> str:
        if self.insecure or self.public == "plaintext":
            return "plaintext, callers authenticate with tokens"
        return f"TLS ({self.public_cert or self.cert_path}), callers authenticate with tokens"

    # -- servers -----------------------------------------------------------------

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Mutual TLS: a client certificate of our CA required. None: plaintext."""
        if self.insecure:
            return None
        self.check()
        return grpc.ssl_server_credentials(
            [(_read(self.key_path, "key"), _read(self.cert_path, "certificate"))],
            root_certificates=_read(self.ca_path, "CA"),
            require_client_auth=True,
        )

    def public_server_credentials(self) -> grpc.ServerCredentials | None:
        """The gateway's port: TLS without client certificates (tokens instead). None: plaintext."""
        if self.insecure or self.public == "plaintext":
            return None
        self.check()
        cert, key = (self.public_cert, self.public_key) if self.public_cert else (self.cert_path, self.key_path)
        return grpc.ssl_server_credentials([(_read(key, "key"), _read(cert, "certificate"))])

    # -- clients -----------------------------------------------------------------

    def channel(self, target: str, service: str, options=(), token: str | None = None) -> grpc.Channel:
        """A channel to `service` (its bare name, e.g. "profile") at `target`:
        mutual TLS, the server's certificate checked for that name; in plaintext
        mode an insecure channel declaring this service's identity. With a
        `token`, every call also carries it (`authorization: Bearer`)."""
        if self.insecure:
            return client_channel(target, plaintext=True, token=token, options=options,
                                  declare_identity=self.service)
        self.check()
        return client_channel(target, ca=self.ca_path, cert=self.cert_path, key=self.key_path, token=token,
                              server_name=service, options=options)

    def aio_channel(self, target: str, service: str, options=(), token: str | None = None,
                    interceptors=()) -> grpc.aio.Channel:
        """As `channel`, for grpc.aio (it belongs to the event loop running when it is made);
        `interceptors` (grpc.aio client interceptors: tracing) see every call."""
        if self.insecure:
            return client_channel(target, plaintext=True, token=token, options=options,
                                  declare_identity=self.service, aio=True, interceptors=interceptors)
        self.check()
        return client_channel(target, ca=self.ca_path, cert=self.cert_path, key=self.key_path, token=token,
                              server_name=service, options=options, aio=True, interceptors=interceptors)


def client_channel(target: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   token: str | None = None, plaintext: bool = False, server_name: str | None = None,
                   options=(), declare_identity: str | None = None, aio: bool = False, interceptors=()):
    """A channel for any caller: TLS checked against `ca` (None: the system's
    roots), with a client certificate when `cert` and `key` are given, the
    server's name checked as `server_name` (None: the target's host); or
    plaintext when asked. `token` goes with every call as a bearer token.
    `interceptors`: more grpc.aio client interceptors (aio channels only)."""
    options = list(options)
    aio_interceptors = list(interceptors)
    pairs = []
    if plaintext:
        if token:
            pairs.append(("authorization", f"Bearer {token}"))
        if declare_identity:
            pairs.append((DEV_IDENTITY_HEADER, declare_identity))
        if aio:
            if pairs:
                aio_interceptors.append(_AioMetadata(pairs))
            return grpc.aio.insecure_channel(target, options=options, interceptors=aio_interceptors or None)
        channel = grpc.insecure_channel(target, options=options)
        return grpc.intercept_channel(channel, _Metadata(pairs)) if pairs else channel
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA") if ca else None,
        private_key=_read(key, "key") if cert and key else None,
        certificate_chain=_read(cert, "certificate") if cert and key else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    if server_name:
        options += [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]
    if aio:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=aio_interceptors or None)
    return grpc.secure_channel(target, credentials, options=options)


# -- plaintext mode: metadata added to every call ----------------------------------

class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _Metadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, pairs):
        self.pairs = list(pairs)

    def _details(self, details):
        metadata = [*(details.metadata or ()), *self.pairs]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


class _AioMetadata(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, pairs):
        self.pairs = list(pairs)

    def _details(self, details):
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self.pairs:
            metadata.add(key, value)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)
