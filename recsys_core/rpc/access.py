"""Who may call what: callers' credentials, and the one rule table.

Callers are known by
- a token (gateway callers, and admins anywhere): `authorization: Bearer <JWT>`,
  verified against the configured key (HS256 or RS256/ES256), with the claims
  `sub` (a shopper id or a client's name), `tenant`, `roles` (`shopper`,
  `service`, `admin`), `exp` and `aud`; or a static API key in `x-api-key`,
  mapped to such a principal by a file of key hashes;
- a certificate: the SPIFFE ID of the peer's mTLS certificate (transport.py),
  which names one of the platform's services (or `ingest`, `catalogue`, ...
  for writers outside the four).

`RULES` maps every full method name to who may call it; a method with no
rule is refused (PERMISSION_DENIED), so an RPC added later stays closed until
it has a line here (tests/test_auth.py checks every method of every service).
A rule that needs the request (a shopper may only ask about themselves)
names the field it reads: the check runs in the handler, after the message
is parsed and before the servicer sees it.

Refusals: UNAUTHENTICATED when no credential was presented or one is
invalid (bad signature, expired, unknown key, wrong audience);
PERMISSION_DENIED when the caller is known but not allowed. Each refusal is
one log line naming the method, the code, why, and the caller (subject,
tenant, roles, certificate identity, address), never the token.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from recsys_core.rpc.envconfig import ConfigError, EnvReader
from recsys_core.rpc.runtime import WrappingInterceptor, guarded
from recsys_core.rpc.transport import DEV_IDENTITY_HEADER, identity_of

log = logging.getLogger(__name__)

ROLES = ("shopper", "service", "admin")
SHOPPER, SERVICE, ADMIN = ROLES
API_KEY_HEADER = "x-api-key"
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "ES256")
DEFAULT_AUDIENCE = "recsys"


# -- principals -----------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """Who a token or an API key speaks for."""

    subject: str
    tenant: str = ""
    roles: frozenset[str] = frozenset()
    via: str = "jwt"  # "jwt" or "api-key"

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Caller:
    """Everything known about one call's caller."""

    principal: Principal | None = None
    # The service named by the peer's certificate (or, in plaintext development
    # mode, the name it declares).
    service: str | None = None
    peer: str = ""

    def describe(self) -> str:
        parts = []
        if self.principal is not None:
            p = self.principal
            parts.append(f"{p.via} sub={p.subject!r} tenant={p.tenant or '-'} roles={','.join(sorted(p.roles)) or '-'}")
        if self.service is not None:
            parts.append(f"service={self.service}")
        if not parts:
            parts.append("anonymous")
        return " ".join(parts) + (f" from {self.peer}" if self.peer else "")

    def identity(self) -> str:
        """Who the caller is, without where from (an audit line records who
        asked, not a shopper's network address)."""
        return Caller(self.principal, self.service).describe()


# The caller of the call being handled, set by the access check once it lets
# the call through: handlers that keep an audit trail, inner interceptors (the
# rate limit) and the servicers read it (current_caller). Each call runs in a
# task of its own, so each reads its own call's caller.
_CALLER: ContextVar[Caller | None] = ContextVar("recsys_access_caller", default=None)


def current_caller() -> Caller | None:
    """The checked caller of the call this task handles; None where no access
    check ran (a server without security, or an open method)."""
    return _CALLER.get()


# The audit trail: one line per call that changed what the platform keeps
# about someone, naming who asked. Its own logger, so that operators can send
# it somewhere kept longer than the service logs.
audit_log = logging.getLogger("recsys.audit")


def audit(service: str, method: str, **fields) -> None:
    """`audit <service> <method> k=v ... requested_by=<caller>`: the caller
    as the access check saw it (token subject, roles, certificate), without
    their address. Fields are the caller's to choose: ids and counts, never
    anything else about a shopper."""
    caller = current_caller()
    who = caller.identity() if caller is not None else "unchecked"
    audit_log.info("audit %s %s %s requested_by=%s", service, method,
                   " ".join(f"{key}={value}" for key, value in fields.items()), who)


class Unauthenticated(Exception):
    """No valid credential (missing, malformed, expired, bad signature)."""


class Denied(Exception):
    """A valid caller who may not make this call."""


# -- token verification ---------------------------------------------------------------

@dataclass(frozen=True)
class AuthConfig:
    """How a service checks tokens: `<P>AUTH_*` variables.

    jwt_key_file: HS* -- the shared secret; RS256/ES256 -- the public key (PEM).
    api_keys_file: JSON, [{"sha256": "<hex of the key>", "sub": ..., "tenant": ..., "roles": [...]}].
    tenants: which shoppers belong to which tenant, by user-id prefix,
      "retail=retail-,amazon=" (longest prefix wins; an empty prefix takes the rest).
    """

    jwt_key_file: str = ""
    jwt_algorithm: str = "HS256"
    jwt_audience: str = DEFAULT_AUDIENCE
    jwt_issuer: str = ""
    api_keys_file: str = ""
    tenants: str = ""

    @classmethod
    def from_env(cls, env: EnvReader) -> "AuthConfig":
        config = cls(
            jwt_key_file=env.str("AUTH_JWT_KEY_FILE", ""),
            jwt_algorithm=env.choice("AUTH_JWT_ALGORITHM", cls.jwt_algorithm, JWT_ALGORITHMS),
            jwt_audience=env.str("AUTH_JWT_AUDIENCE", cls.jwt_audience),
            jwt_issuer=env.str("AUTH_JWT_ISSUER", ""),
            api_keys_file=env.str("AUTH_API_KEYS_FILE", ""),
            tenants=env.str("AUTH_TENANTS", ""),
        )
        parse_tenants(config.tenants)  # fails fast on a malformed value
        return config

    @property
    def configured(self) -> bool:
        return bool(self.jwt_key_file or self.api_keys_file)


def parse_tenants(spec: str) -> list[tuple[str, str]]:
    """"retail=retail-,amazon=" -> [("retail-", "retail"), ("", "amazon")], longest prefix first."""
    pairs = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        tenant, sep, prefix = entry.partition("=")
        if not sep or not tenant.strip():
            raise ConfigError(f"AUTH_TENANTS entry {entry!r} is not tenant=user-id-prefix")
        pairs.append((prefix.strip(), tenant.strip()))
    return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)


def api_key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    """Turns a call's metadata into a Principal (or None when it carries no token)."""

    def __init__(self, config: AuthConfig):
        self.config = config
        self._tenants = parse_tenants(config.tenants)
        self._jwt_key = None
        if config.jwt_key_file:
            try:
                raw = Path(config.jwt_key_file).read_bytes()
            except OSError as error:
                raise ConfigError(f"cannot read the JWT key {config.jwt_key_file}: {error.strerror}") from None
            if config.jwt_algorithm.startswith("HS"):
                self._jwt_key = raw.strip()
                if len(self._jwt_key) < 32:
                    raise ConfigError(f"the JWT secret in {config.jwt_key_file} is shorter than 32 bytes")
            else:
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                try:
                    self._jwt_key = load_pem_public_key(raw)
                except ValueError as error:
                    raise ConfigError(f"{config.jwt_key_file} is not a PEM public key: {error}") from None
        # Verified tokens until they expire: a client sends the same token with
        # every call, and the signature check is the costly part (bounded size).
        self._verified: dict[str, tuple[Principal, float]] = {}
        self._api_keys: dict[str, Principal] = {}
        if config.api_keys_file:
            self._api_keys = load_api_keys(config.api_keys_file)

    @property
    def accepts_tokens(self) -> bool:
        return self._jwt_key is not None or bool(self._api_keys)

    def tenant_of(self, user_id: str) -> str | None:
        for prefix, tenant in self._tenants:
            if user_id.startswith(prefix):
                return tenant
        return None

    def authenticate(self, metadata: Mapping[str, str]) -> Principal | None:
        authorization = metadata.get("authorization")
        api_key = metadata.get(API_KEY_HEADER)
        if authorization is None and api_key is None:
            return None
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization must be 'Bearer <token>'")
            return self._verify_jwt(token.strip())
        return self._verify_api_key(api_key)

    def _verify_jwt(self, token: str) -> Principal:
        import time

        import jwt

        if self._jwt_key is None:
            raise Unauthenticated("this service accepts no bearer tokens")
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            self._verified.pop(token, None)
        options = {"require": ["exp", "sub", "aud"]}
        try:
            claims = jwt.decode(token, self._jwt_key, algorithms=[self.config.jwt_algorithm],
                                audience=self.config.jwt_audience, issuer=self.config.jwt_issuer or None,
                                options=options, leeway=30)
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"invalid token: {type(error).__name__}") from None
        principal = principal_from_claims(claims, via="jwt")
        if len(self._verified) >= 10_000:
            self._verified.clear()
        self._verified[token] = (principal, float(claims["exp"]))
        return principal

    def _verify_api_key(self, key: str) -> Principal:
        digest = api_key_digest(key.strip())
        for known, principal in self._api_keys.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown API key")


def principal_from_claims(claims: Mapping, via: str) -> Principal:
    subject = claims.get("sub")
    roles = claims.get("roles", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(subject, str) or not subject or not isinstance(roles, list):
        raise Unauthenticated("token claims: sub must be a string, roles a list")
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise Unauthenticated(f"token claims: roles must be some of {', '.join(ROLES)}")
    tenant = claims.get("tenant", "")
    if not isinstance(tenant, str):
        raise Unauthenticated("token claims: tenant must be a string")
    return Principal(subject=subject, tenant=tenant, roles=frozenset(roles), via=via)


def load_api_keys(path: str) -> dict[str, Principal]:
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the API keys {path}: {error}") from None
    keys = {}
    for number, entry in enumerate(entries if isinstance(entries, list) else [None]):
        try:
            digest = entry["sha256"].lower()
            if len(digest) != 64:
                raise ValueError
            keys[digest] = principal_from_claims(entry, via="api-key")
        except (TypeError, KeyError, ValueError, AttributeError, Unauthenticated) as error:
            raise ConfigError(f"{path}: entry {number} must be {{sha256, sub, tenant, roles}}: {error}") from None
    return keys


def mint_token(key: bytes | str, subject: str, roles, tenant: str = "", seconds: float = 3600,
               algorithm: str = "HS256", audience: str = DEFAULT_AUDIENCE, issuer: str = "") -> str:
    """A signed JWT (tests, `recsys token`, and the local stack's admin token)."""
    import time

    import jwt

    now = int(time.time())
    claims = {"sub": subject, "roles": list(roles), "aud": audience, "iat": now, "exp": now + int(seconds)}
    if tenant:
        claims["tenant"] = tenant
    if issuer:
        claims["iss"] = issuer
    if algorithm.startswith("HS") and isinstance(key, bytes):
        key = key.strip()
    return jwt.encode(claims, key, algorithm=algorithm)


# -- rules ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """Who may call one method. Admin tokens may call every method that has
    a rule (`admin`), except where a rule says otherwise."""

    # Anyone, unauthenticated (health checks: Kubernetes probes).
    open: bool = False
    # Any authenticated caller (a valid token, or a certificate of our CA).
    any_caller: bool = False
    # Services (certificate identities) that may call.
    services: frozenset[str] = frozenset()
    # The request field naming the shopper whose data this is: allowed for
    # that shopper's own token, a service token of their tenant.
    shopper_field: str = ""
    # Also tokens with the role `service` whatever the tenant (data that
    # belongs to no shopper, e.g. similar items).
    service_tokens: bool = False
    shopper_tokens: bool = False
    # With shopper_field: also a service token of the shopper's tenant. Off
    # where only the shopper themselves (or an admin) may act, e.g. forgetting them.
    tenant_services: bool = True
    admin: bool = True

    def describe(self) -> str:
        if self.open:
            return "anyone"
        who = []
        if self.any_caller:
            who.append("any authenticated caller")
        if self.shopper_field:
            who.append(f"the shopper named by `{self.shopper_field}` (own token)"
                       + (", their tenant's service token" if self.tenant_services else ""))
        if self.shopper_tokens:
            who.append("shopper tokens")
        if self.service_tokens:
            who.append("service tokens")
        if self.services:
            who.append("certificates of " + ", ".join(sorted(self.services)))
        if self.admin:
            who.append("admin tokens")
        return "; ".join(who)


def services(*names: str) -> Rule:
    return Rule(services=frozenset(names))


def shopper_data(field_name: str = "user_id") -> Rule:
    return Rule(shopper_field=field_name)


def shopper_only(field_name: str = "user_id") -> Rule:
    """The shopper's own token (or an admin's), not their tenant's services."""
    return Rule(shopper_field=field_name, tenant_services=False)


OPEN = Rule(open=True)
ANY_CALLER = Rule(any_caller=True)
GATEWAY = "gateway"
PROFILE = "profile"
# Writers outside the four services: an event pipeline and a catalogue feed,
# each with a certificate of its own (`recsys certs` makes both).
INGEST = "ingest"
CATALOGUE = "catalogue"

# Every method of every service, by full name. No rule: PERMISSION_DENIED.
RULES: dict[str, Rule] = {
    # Health stays open for Kubernetes probes; reflection (off unless
    # <SERVICE>_REFLECTION=1) describes the API, not data.
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.health.v1.Health/List": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": ANY_CALLER,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": ANY_CALLER,
    # The public API. A shopper's data: their own token, their tenant's service token, admin.
    "/recsys.gateway.v1.GatewayService/Recommend": shopper_data("user_id"),
    "/recsys.gateway.v1.GatewayService/GetProfile": shopper_data("user_id"),
    # Forgetting a shopper: only they themselves or an admin, never a service on their behalf.
    "/recsys.gateway.v1.GatewayService/DeleteUser": shopper_only("user_id"),
    # Item-to-item: no shopper's data; any valid token.
    "/recsys.gateway.v1.GatewayService/SimilarItems": Rule(shopper_tokens=True, service_tokens=True),
    # Internal reads: only the services that make them (their certificates), or admin.
    "/recsys.profile.v1.ProfileService/GetProfile": services(GATEWAY),
    "/recsys.profile.v1.ProfileService/GetPopularItems": services(GATEWAY),
    "/recsys.profile.v1.ProfileService/GetItemPopularity": services(GATEWAY),
    "/recsys.profile.v1.ProfileService/GetCoPurchasedItems": services(GATEWAY),
    "/recsys.profile.v1.ProfileService/GetShopperSignals": services(GATEWAY),
    "/recsys.embedding.v1.EmbeddingService/SearchItems": services(GATEWAY),
    "/recsys.embedding.v1.EmbeddingService/GetItems": services(GATEWAY, PROFILE),
    "/recsys.embedding.v1.EmbeddingService/ListCategories": services(GATEWAY, PROFILE),
    "/recsys.embedding.v1.EmbeddingService/EmbedTexts": services(GATEWAY, PROFILE),
    "/recsys.embedding.v1.EmbeddingService/RetrieveCandidates": services(GATEWAY),
    "/recsys.ranking.v1.RankingService/Rank": services(GATEWAY),
    # Internal writes: only writer identities' certificates, or admin.
    "/recsys.profile.v1.ProfileService/IngestEvents": services(INGEST),
    # The gateway passes on what it checked (the shopper's own token, or an admin's).
    "/recsys.profile.v1.ProfileService/DeleteUser": services(GATEWAY),
    # What the gateway showed in which A/B arm: only the gateway records it.
    "/recsys.profile.v1.ProfileService/RecordExposures": services(GATEWAY),
    "/recsys.embedding.v1.EmbeddingService/UpsertItems": services(CATALOGUE),
}


def decide(rule: Rule | None, caller: Caller, request, tenant_of: Callable[[str], str | None]) -> None:
    """Raises Unauthenticated or Denied; returns when the call may go on."""
    if rule is None:
        raise Denied("no access rule for this method (deny by default)")
    if rule.open:
        return
    principal = caller.principal
    if principal is None and caller.service is None:
        raise Unauthenticated("no credentials: present a token (authorization: Bearer ...) or a client certificate")
    if principal is not None and rule.admin and principal.has(ADMIN):
        return
    if rule.any_caller:
        return
    if caller.service is not None and caller.service in rule.services:
        return
    if principal is not None:
        if rule.shopper_tokens and principal.has(SHOPPER) or rule.service_tokens and principal.has(SERVICE):
            return
        if rule.shopper_field:
            user_id = getattr(request, rule.shopper_field)
            tenant = tenant_of(user_id)
            if principal.has(SHOPPER) and principal.subject == user_id and (tenant is None or principal.tenant == tenant):
                return
            if rule.tenant_services and principal.has(SERVICE) and tenant is not None and principal.tenant == tenant:
                return
            raise Denied(f"{rule.shopper_field} names a shopper this caller may not see")
    raise Denied("caller not allowed for this method")


# -- the server side ------------------------------------------------------------------

def is_admin(caller: Caller | None) -> bool:
    return caller is not None and caller.principal is not None and caller.principal.has(ADMIN)


@dataclass
class AccessPolicy:
    """What one server checks: its authenticator (tokens) and the rules."""

    authenticator: Authenticator | None = None
    # Plaintext (development) servers take the caller's declared service name.
    trust_declared_identity: bool = False
    rules: Mapping[str, Rule] = field(default_factory=lambda: RULES)

    def tenant_of(self, user_id: str) -> str | None:
        return self.authenticator.tenant_of(user_id) if self.authenticator is not None else None

    def caller(self, context) -> Caller:
        metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        principal = self.authenticator.authenticate(metadata) if self.authenticator is not None else None
        if principal is None and self.authenticator is None and (
                "authorization" in metadata or API_KEY_HEADER in metadata):
            raise Unauthenticated("this service accepts no tokens")
        service = None
        auth = context.auth_context() or {}
        spiffe = auth.get("peer_spiffe_id")
        if spiffe:
            service = identity_of(spiffe[0])
        elif self.trust_declared_identity:
            service = metadata.get(DEV_IDENTITY_HEADER) or None
        return Caller(principal=principal, service=service, peer=context.peer() or "")


class AccessInterceptor(WrappingInterceptor):
    """Checks every call against `policy.rules` before its handler runs. A
    method with no rule is refused; a rule with a shopper field is checked
    against the parsed request."""

    def __init__(self, policy: AccessPolicy):
        super().__init__()
        self.policy = policy

    async def _check(self, full_method: str, rule: Rule | None, request, context) -> None:
        try:
            caller = self.policy.caller(context)
        except Unauthenticated as error:
            caller = None
            code, reason = grpc.StatusCode.UNAUTHENTICATED, str(error)
        else:
            try:
                decide(rule, caller, request, self.policy.tenant_of)
                _CALLER.set(caller)
                return
            except Unauthenticated as error:
                code, reason = grpc.StatusCode.UNAUTHENTICATED, str(error)
            except Denied as error:
                code, reason = grpc.StatusCode.PERMISSION_DENIED, str(error)
        who = caller.describe() if caller is not None else f"invalid credentials from {context.peer()}"
        log.warning("denied %s: %s (%s); caller %s", full_method, code.name, reason, who)
        await context.abort(code, reason)

    def wrap(self, handler, full_method: str):
        rule = self.policy.rules.get(full_method)
        if rule is not None and rule.open:
            return handler
        if rule is not None and rule.shopper_field and handler.request_streaming:
            raise NotImplementedError(f"{full_method}: a shopper rule needs a unary request")

        async def check(request, context):
            await self._check(full_method, rule, request, context)

        return guarded(handler, check)
