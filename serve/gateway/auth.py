"""Bearer-key auth of the gateway, and the rule that an open gateway stays on loopback.

    [serve]
    api_keys   = ["<sha256 hex>"]     # tunewheel keys hash KEY
    admin_keys = ["<sha256 hex>"]

    curl -H "Authorization: Bearer KEY" localhost:8000/v1/models

Keys live in config only as sha256 hex, so a leaked config file leaks no key. With no keys
configured the API is open and `tunewheel serve` refuses any non-loopback bind address
(`check_bind`). Admin routes always need an admin key; an admin key is also an API key.
Routes take the caller through the FastAPI dependencies in serve/gateway/deps.py:

    @router.post("/x")
    async def x(caller: CallerDep): ...              # caller.key_hash, caller.admin
    router = APIRouter(dependencies=[Depends(require_admin)])
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from serve.gateway.protocol import APIError
from serve.settings import Settings, hash_key


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the sha256 of their key (None when auth is off) and whether it is an admin key."""

    key_hash: str | None
    admin: bool


class Auth:
    """The configured keys (sha256 hex) and who a request's Authorization header makes its caller."""

    def __init__(self, api_keys: list[str], admin_keys: list[str]):
        self.api_keys = frozenset(api_keys)
        self.admin_keys = frozenset(admin_keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        return cls(settings.serve.api_keys, settings.serve.admin_keys)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

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
            return Caller(key_hash=None, admin=False)
        key_hash = self._key_hash(authorization)
        if key_hash is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key")
        if key_hash in self.admin_keys:
            return Caller(key_hash=key_hash, admin=True)
        if key_hash in self.api_keys:
            return Caller(key_hash=key_hash, admin=False)
        raise APIError(401, "invalid API key", code="invalid_api_key")

    def admin(self, authorization: str | None) -> Caller:
        """The caller of an admin route: always an admin key, whether or not API keys are configured."""
        key_hash = self._key_hash(authorization)
        if key_hash is None:
            raise APIError(401, "admin routes need `Authorization: Bearer <admin key>`", code="invalid_api_key")
        if key_hash not in self.admin_keys:
            raise APIError(403, "this key is not an admin key (serve.admin_keys)", type="permission_error", code="forbidden")
        return Caller(key_hash=key_hash, admin=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to expose an open gateway: without keys only a loopback address may be bound."""
    if not Auth.from_settings(settings).enabled and not is_loopback(settings.serve.host):
        raise ValueError(
            f"refusing to bind {settings.serve.host}: no API keys are configured, so the gateway would be open. "
            "Add serve.api_keys (sha256 hex: `tunewheel keys new` makes a key and its hash) "
            "or bind 127.0.0.1."
        )
