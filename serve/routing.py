"""Which engine model answers a name: the one place that decides it.

    router = Router(settings.serve.aliases, base=settings.engine.served_name, registry=registry)
    route = await router.route("chat", conversation_key=key)  # Route(model="chat", version="chat-v0003", lease=...)
    with route.lease:
        call_engine(model=route.version)                       # route.load: a folder to load first (pinned only)
    router.targets()          # alias -> Target(version, path): what the reconciler loads and aliases
    router.model_names()      # every name a client may send as `model`

The names a client may send:
    <alias>           `[serve.aliases.<alias>] adapter`: "prod" (the registry's promoted chat version,
                      or the base model while none is promoted), "base", or a fixed version name
    base              the base model
    chat@<version>    a pinned version: with a registry any candidate, promoted or retired version
                      (loaded on demand); without one, only the versions the engine holds for us

Two halves. What *should* answer is read from config and the registry (`targets`, `pinned`,
`restyler`; blocking database reads, so callers on the event loop use a worker thread). What
answers *now* is the `AliasTable`: the version each alias is served from once the reconciler
(serve/reconcile.py) has loaded and warmed it, and the requests in flight on each version. A
request is routed from the table, so an alias moves only after its new version answers; the
route's lease keeps the version it runs on in the engine until it ends. Everything runs on the
gateway's event loop, so plain dicts need no lock: a decision and its lease are one step.

An alias answers only while its version is in the engine: with a registry, not before the
reconciler's first pass and not between an engine restart and the reload of the adapters
(`AliasTable.synced`, `loaded`). Meanwhile `route()` raises NotServed, which the gateway answers
with a retryable 503 and `Retry-After` (and /ready with 503), never the engine's 404 "model does
not exist", which clients do not retry. A prod alias's target carries the last good versions
(`Target.fallbacks`, from the registry's history) for when prod itself will not load.

A canary (learn/live.py: a candidate answering a share of new conversations beside prod) is a
per-request decision: `route()` takes a key of the conversation (`conversation_key`: the client's
x-conversation-id, else the conversation's opening messages, with the API key) and sends it to the
canary when a hash of the key and the canary's name falls within the share. The hash needs no
state, so every turn of a conversation, on any gateway replica, lands on the same arm; a
conversation already running when a canary starts or ends moves at most once, then. The canary
answers only once the reconciler has loaded it here (`AliasTable.canaries`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from learn.live import canary_of
from serve.metrics import ACTIVE_VERSION, FEEDBACK
from serve.settings import AliasSettings

log = logging.getLogger("tunewheel.routing")

PINNED_PREFIX = "chat@"
BASE_NAME = "base"  # what clients call the base model, whatever the engine serves it as
SERVABLE_STATES = ("candidate", "promoted", "retired")  # registry states a pinned request may use
STAGED = 2  # candidates per prod alias kept loaded ahead of a promotion (while LoRA slots are spare)


@dataclass(frozen=True)
class Target:
    """An engine model name and the adapter folder it loads from (None: the base model); `fallbacks`:
    the last good versions to serve, newest first, when this one will not load (prod aliases only)."""

    version: str
    path: str | None = None
    fallbacks: tuple[Target, ...] = ()
    canary: Target | None = None
    """The alias's canary (prod aliases only) and the share of conversations it answers."""
    canary_share: float = 0.0
    staged: tuple[Target, ...] = ()
    """Candidates a promotion may pick next (prod aliases only, newest first): the reconciler keeps them
    loaded while the engine has LoRA slots to spare, so that promoting one is a flip, not a load."""


class NotServed(LookupError):
    """An alias whose version the engine does not hold right now (starting, or after an engine restart):
    a retryable 503, never the engine's 404."""

    def __init__(self, alias: str, version: str):
        super().__init__(f"alias {alias!r} is not being served yet ({version} is loading into the engine)")
        self.alias, self.version = alias, version


class UnknownModel(LookupError):
    """A `model` no route leads to; `names` are the ones that do."""

    def __init__(self, model: str, names: list[str]):
        super().__init__(f"model {model!r} does not exist; valid names: {', '.join(names)}")
        self.model, self.names = model, names


class Lease:
    """One request running on `version`; release exactly once (a context manager does it)."""

    __slots__ = ("version", "_table", "_released")

    def __init__(self, table: AliasTable, version: str):
        self.version = version
        self._table = table
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._table._release(self.version)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class Route:
    """The answer for one request: the name asked for, the engine model that answers, the lease
    that keeps it in the engine, and (pinned versions only) the target to make sure is loaded."""

    model: str
    version: str
    lease: Lease
    load: Target | None = None


class AliasTable:
    """What the engine serves now: alias -> engine model name, and requests in flight per name."""

    def __init__(self, aliases: Iterable[str] = ("chat",), *, base: str = BASE_NAME, synced: bool = True):
        self.base = base
        self._aliases: dict[str, str] = {}
        self._in_flight: Counter[str] = Counter()
        # Adapter versions the engine holds for us (the reconciler keeps it current); without a
        # registry the gateway serves `chat@<version>` for these only.
        self.loaded: set[str] = set()
        # False until the reconciler has matched the aliases to the registry once, and again from
        # an engine restart until it has reloaded them: aliases are not served meanwhile.
        self.synced = synced
        self.loading: dict[str, str] = {}  # alias -> the version the reconciler is trying to put it on
        self.canaries: dict[str, tuple[str, float]] = {}  # alias -> (canary version, share), once loaded
        self.wake = asyncio.Event()  # set when serving found the engine without a version: reconcile now
        for alias in aliases:
            self.set(alias, base)

    def __contains__(self, alias: str) -> bool:
        return alias in self._aliases

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def resolve(self, alias: str) -> str:
        """The engine model name behind `alias`; KeyError for a name that is not an alias."""
        return self._aliases[alias]

    def serves(self, alias: str) -> bool:
        """Whether `alias` answers now: the aliases are synced and its version is in the engine."""
        version = self._aliases[alias]
        return self.synced and (version == self.base or version in self.loaded)

    def unserved(self) -> dict[str, str]:
        """alias -> the version it waits for, for every alias that does not answer now (what /ready waits for)."""
        return {alias: self.loading.get(alias, version) for alias, version in self._aliases.items() if not self.serves(alias)}

    def lost(self, version: str) -> None:
        """The engine answered that it does not have `version` (restarted, or unloaded by someone else):
        stop routing to it and wake the reconciler to load it again."""
        if version != self.base and version in self.loaded:
            log.warning("the engine no longer has %s; reloading it", version)
            self.loaded.discard(version)
        self.wake.set()

    def set(self, alias: str, version: str) -> None:
        old = self._aliases.get(alias)
        self._aliases[alias] = version
        if version != self.base:
            self.loaded.add(version)
        if old is not None and old != version:
            try:
                ACTIVE_VERSION.remove(alias, old)
            except KeyError:
                pass
        ACTIVE_VERSION.labels(alias=alias, version=version).set(1)
        for rating in ("up", "down"):  # exported at 0 first, so increase() counts a version's first rating
            FEEDBACK.labels(version=version, rating=rating)

    def acquire(self, name: str) -> Lease:
        """Lease the version `name` resolves to (an alias) or `name` itself (a version)."""
        version = self._aliases.get(name, name)
        self._in_flight[version] += 1
        return Lease(self, version)

    def _release(self, version: str) -> None:
        self._in_flight[version] -= 1
        if self._in_flight[version] <= 0:
            del self._in_flight[version]

    def in_flight(self, version: str) -> int:
        return self._in_flight.get(version, 0)

    def busy(self) -> set[str]:
        """Versions with requests in flight."""
        return {v for v, n in self._in_flight.items() if n > 0}

    async def drain(self, version: str, timeout: float | None = None) -> bool:
        """Wait until no request runs on `version`; False when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._in_flight.get(version, 0) > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


def conversation_key(messages: list, *, conversation_id: str | None, key_hash: str | None) -> str:
    """What a canary share hashes: the client's conversation id, else the conversation's opening (its
    messages up to the first user message, which every later turn of it repeats); with the API key."""
    if conversation_id:
        opening = conversation_id
    else:
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), len(messages) - 1)
        opening = json.dumps(messages[: first_user + 1], sort_keys=True, default=str)
    return f"{key_hash or ''}\n{opening}"


def in_canary(key: str, version: str, share: float) -> bool:
    """Whether the conversation of `key` is answered by the canary `version` (a stable hash below `share`)."""
    digest = hashlib.sha256(f"{version}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def pinned_version(model: str) -> str | None:
    """`chat@chat-v0003` -> `chat-v0003`; None for any other name."""
    if model.startswith(PINNED_PREFIX) and len(model) > len(PINNED_PREFIX):
        return model[len(PINNED_PREFIX):]
    return None


class Router:
    """Decides which engine model answers a name; `table` holds what the engine serves now.

    `aliases`: the `[serve.aliases]` config. `base`: the engine's name for the base model.
    `registry`: learn.registry.Registry, the source of prod pointers and versions; None serves
    every alias from the base model (a gateway without a store of adapters)."""

    def __init__(self, aliases: Mapping[str, AliasSettings], *, base: str = BASE_NAME, registry=None):
        self.config = dict(aliases)
        self.base = base
        self.registry = registry
        self.table = AliasTable(self.config, base=base, synced=registry is None)

    # --- the request side (event loop) ---------------------------------------------------
    def model_names(self) -> list[str]:
        """Every name a client may send as `model`, the pinned versions the engine holds included."""
        pinned = {v for v in self.table.loaded | set(self.table.aliases().values()) if v != self.base}
        return [*self.table.aliases(), BASE_NAME, *(PINNED_PREFIX + v for v in sorted(pinned))]

    async def route(self, model: str, *, conversation_key: str | None = None) -> Route:
        """The route of one request for `model`, leased; UnknownModel when there is none.
        `conversation_key` (`conversation_key()`) picks the arm while the alias has a canary."""
        load = None
        if model == BASE_NAME:
            version = self.base
        elif model in self.table:
            version = self.table.resolve(model)
            if not self.table.serves(model):
                raise NotServed(model, self.table.loading.get(model, version))
            canary = self.table.canaries.get(model)
            if canary is not None and conversation_key is not None and canary[0] in self.table.loaded \
                    and in_canary(conversation_key, *canary):
                version = canary[0]
        elif (version := pinned_version(model)) is not None:
            if self.registry is not None:
                load = await asyncio.to_thread(self.pinned, version)
                if load is None:
                    raise UnknownModel(model, self.model_names())
            elif version not in self.table.loaded:
                raise UnknownModel(model, self.model_names())
        else:
            raise UnknownModel(model, self.model_names())
        # No await between reading the table and leasing: a swap cannot drain the version in between.
        return Route(model=model, version=version, lease=self.table.acquire(version), load=load)

    # --- what should answer (blocking: config + registry) ---------------------------------
    def targets(self) -> dict[str, Target]:
        """alias -> the target it should be served from, per config and the registry's prod pointer."""
        return {alias: self._target(alias, spec.adapter) for alias, spec in self.config.items()}

    def _target(self, alias: str, adapter: str) -> Target:
        if adapter == "base" or self.registry is None:
            return Target(self.base)
        v = self.registry.prod(kind="chat") if adapter == "prod" else self.registry.get(adapter)
        if v is None and adapter != "prod":
            log.error("alias %s names adapter %s, which is not in the registry; serving the base model", alias, adapter)
        if adapter != "prod":
            return Target(v.name, v.path) if v is not None else Target(self.base)
        staged = tuple(Target(c.name, c.path) for c in self.registry.list("chat", state="candidate", limit=STAGED))
        if v is None:
            return Target(self.base, staged=staged)
        fallbacks = tuple(Target(g.name, g.path) for g in self.registry.last_good("chat"))
        canary = canary_of(self.registry, "chat")
        if canary is None:
            return Target(v.name, v.path, fallbacks, staged=staged)
        return Target(v.name, v.path, fallbacks, canary=Target(canary[0].name, canary[0].path), canary_share=canary[1],
                      staged=staged)

    def pinned(self, version: str) -> Target | None:
        """The target of `chat@<version>`: a registry version in a servable state, else None."""
        v = self.registry.get(version) if self.registry is not None else None
        if v is None or v.state not in SERVABLE_STATES:
            return None
        return Target(v.name, v.path)

    def restyler(self, style: str) -> Target | None:
        """The promoted restyler of `style`, or None when the style has none."""
        if self.registry is None:
            return None
        try:
            v = self.registry.prod("restyler", style)
        except ValueError:  # a style name the registry cannot hold
            return None
        return Target(v.name, v.path) if v is not None else None

    def styles(self) -> list[str]:
        """Styles with a promoted restyler."""
        if self.registry is None:
            return []
        return sorted({v.style for v in self.registry.list(kind="restyler") if v.state == "promoted" and v.style})
