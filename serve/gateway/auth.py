"""Bearer-key auth of the gateway: keys with scopes, and the rule that an open gateway stays on loopback.

    [serve]
    api_keys   = ["<sha256 hex>"]     # scopes chat + feedback           (`tunewheel keys hash KEY`)
    admin_keys = ["<sha256 hex>"]     # every scope
    [[serve.keys]]
    hash = "<sha256 hex>"
    scopes = ["metrics"]              # any of chat, feedback, metrics, admin

    curl -H "Authorization: Bearer KEY" localhost:8000/v1/models

Keys live in config only as sha256 hex, so a leaked config file leaks no key. A key holds a set
of scopes: `chat` (chat completions, the model list), `feedback` (rate answers), `metrics`
(GET /metrics when `serve.metrics_need_key`), `admin` (every scope; the /admin routes; pinned
versions that are not promoted; feedback on anyone's answers). With no keys configured the API
is open and `tunewheel serve` refuses any non-loopback bind address (`check_bind`); its one
user is the operator (the learner evaluates candidates through it), but /admin still needs an
admin key. Routes take the caller through the FastAPI dependencies in serve/gateway/deps.py:

    @router.post("/x", dependencies=[Depends(scoped("feedback"))])
    async def x(caller: CallerDep): ...              # caller.key_hash, caller.admin, caller.scopes
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from serve.gateway.protocol import APIError
from serve.settings import SCOPES, Settings, hash_key

OPEN_SCOPES = frozenset(s for s in SCOPES if s != "admin")  # what the caller of an open gateway holds


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the sha256 of their key (None when the gateway is open) and its scopes."""

    key_hash: str | None
    scopes: frozenset[str] = OPEN_SCOPES

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def operator(self) -> bool:
        """An admin key, or the one user of an open (loopback-only) gateway: may use unpromoted versions."""
        return self.admin or self.key_hash is None


class Auth:
    """The configured keys (sha256 hex -> scopes) and who a request's Authorization header makes its caller."""

    def __init__(self, keys: dict[str, frozenset[str]]):
        self.keys = dict(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        return cls(settings.serve.key_scopes())

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def _key_hash(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "the Authorization header must be `Bearer <key>`", code="invalid_api_key")
        return hash_key(token.strip())

    def identify(self, authorization: str | None) -> Caller:
        """The caller of an API route; 401 when keys are configured and this one is missing or wrong."""
        if not self.enabled:
            return Caller(key_hash=None)
        key_hash = self._key_hash(authorization)
        if key_hash is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        if key_hash not in self.keys:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return Caller(key_hash=key_hash, scopes=self.keys[key_hash])

    @staticmethod
    def require(caller: Caller, scope: str) -> Caller:
        """`caller` when its key holds `scope` (admin holds every scope); 403 naming the scope otherwise."""
        if scope not in caller.scopes and not caller.admin:
            raise APIError(403, f"this key lacks the `{scope}` scope (serve.keys)", type="permission_error",
                           code="insufficient_scope")
        return caller

    def admin(self, authorization: str | None) -> Caller:
        """The caller of an admin route: always an admin key, whether or not other keys are configured."""
        key_hash = self._key_hash(authorization)
        if key_hash is None:
            raise APIError(401, "admin routes need `Authorization: Bearer <admin key>`", code="invalid_api_key")
        scopes = self.keys.get(key_hash, frozenset())
        if "admin" not in scopes:
            raise APIError(403, "this key is not an admin key (serve.admin_keys)", type="permission_error", code="forbidden")
        return Caller(key_hash=key_hash, scopes=scopes)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to expose an open gateway: without keys only a loopback address may be bound."""
    if not Auth.from_settings(settings).enabled and not is_loopback(settings.serve.host):
        raise ValueError(
            f"refusing to bind {settings.serve.host}: no API keys are configured, so the gateway would be open. "
            "Add serve.api_keys (sha256 hex: `tunewheel keys new` makes a key and its hash) or bind 127.0.0.1."
        )
