"""Engine replicas behind one gateway: which ones take traffic, which one answers a request, and
adapter loads that reach every one of them.

    pool = EnginePool.of(manager, http, max_rank=16)          # one engine: `tunewheel serve`'s child or engine.url
    pool = EnginePool.attached(settings, http)                # engine.urls, or engine.dns (a headless Service)
    await pool.start()                                        # first probe of each replica, then a health loop
    replica = pool.pick(affinity="conversation key")          # a ready replica with the fewest requests in flight
    replica.begin(); ...; replica.end()                       # what pick() counts
    await pool.load("chat-v0003", "/data/adapters/chat-v0003")  # on every live replica (the reconciler calls it)
    await pool.stop()

vLLM's run-time LoRA loading reaches only the replica it is sent to (vLLM RFC #12174), so the
reconciler (serve/reconcile.py) loads, warms and unloads each version through this pool, which
sends it to every replica that answers. A replica is `down` (failing /health, refusing
connections), `syncing` (answering again, being brought back to the adapters the others serve:
`on_rejoin`, the reconciler's `rejoin`) or `ready` (takes requests). A replica that restarts
loses its run-time adapters; it takes requests again only after `on_rejoin` has loaded them.
`failed(replica)` takes one out of rotation at once (the gateway saw it refuse a connection, or
answer 404 for a version it should hold); the health loop brings it back.

One engine (`EnginePool.of`) is a pool of one `managed` replica: its EngineManager (or a test's
stand-in with `.url` and `.ready`) supervises it and says whether it is ready, and an engine
restart is the manager's `on_restart` hook, as before. Several (`engine.urls`) are probed here:
GET /health every `poll_interval_s`, `max_failures` failures in a row take one out. With
`engine.dns` each URL's host name is resolved every `resolve_interval_s` and each address is a
replica, so scaling a Kubernetes StatefulSet behind a headless Service needs no gateway change.

Why not vLLM's LoRA resolver plugins (an adapter loaded by the first request that names it, from
shared storage): the first user request would pay the load, nothing warms it, nothing unloads a
retired version or drains it first, and the gateway could not tell whether every replica holds a
version before its alias moves to it. Loading from the gateway keeps all of that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from serve import metrics
from serve.adapters import AdapterLoadError, EngineAdapters

log = logging.getLogger("tunewheel.pool")

HEALTH_TIMEOUT_S = 5.0
AFFINITY_SLACK = 4  # a conversation stays on its replica unless that one has this many more requests in flight


class Replica:
    """One vLLM server: its adapters API, its state and the requests in flight on it."""

    def __init__(self, url: str, adapters: EngineAdapters, *, manager: Any = None):
        self.url = url
        self.adapters = adapters
        self.manager = manager  # an EngineManager (or stand-in) that supervises it; None: the pool probes it
        self.state = "down"
        self.outstanding = 0
        self.failures = 0
        self.since = time.monotonic()

    @property
    def ready(self) -> bool:
        if self.manager is not None:
            return bool(self.manager.ready)
        return self.state == "ready"

    @property
    def live(self) -> bool:
        """Answers: adapter loads go to it (a syncing replica included)."""
        return self.manager is not None or self.state != "down"

    def begin(self) -> None:
        self.outstanding += 1

    def end(self) -> None:
        self.outstanding -= 1

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state, self.since = state, time.monotonic()

    def __repr__(self) -> str:
        return f"Replica({self.url}, {self.state if self.manager is None else 'managed'}, {self.outstanding} in flight)"


class EnginePool:
    """The engine replicas one gateway serves from. `urls`: the replicas as configured (with `dns`,
    host names to resolve); `manager`: the one supervised engine instead (see `of`)."""

    def __init__(self, http: httpx.AsyncClient, urls: Iterable[str], *, max_rank: int | None = None,
                 served_name: str = "base", dns: bool = False, manager: Any = None, poll_interval_s: float = 1.0,
                 max_failures: int = 2, resolve_interval_s: float = 10.0):
        self.http = http
        self.configured = [u.rstrip("/") for u in urls]
        self.max_rank = max_rank
        self.served_name = served_name
        self.dns = dns
        self.poll_interval_s = poll_interval_s
        self.max_failures = max_failures
        self.resolve_interval_s = resolve_interval_s
        self.replicas: dict[str, Replica] = {}
        self.on_rejoin: Callable[[Replica], Awaitable[None]] | None = None  # the reconciler's rejoin
        self._task: asyncio.Task | None = None
        self._resolved_at = float("-inf")
        if manager is not None:
            self._add(self.configured[0], manager=manager)
        elif not dns:
            for url in self.configured:
                self._add(url)

    @classmethod
    def of(cls, engine: Any, http: httpx.AsyncClient, *, max_rank: int | None = None) -> EnginePool:
        """A pool of one supervised engine: `engine` has `.url` and `.ready` (an EngineManager), or is a URL."""
        if isinstance(engine, str):
            from types import SimpleNamespace

            engine = SimpleNamespace(url=engine.rstrip("/"), ready=True)
        return cls(http, [engine.url], max_rank=max_rank, manager=engine)

    @classmethod
    def attached(cls, settings: Any, http: httpx.AsyncClient) -> EnginePool:
        """The replicas of `settings.engine` (urls, or url with dns), probed by this pool."""
        return cls(http, settings.engine.replica_urls, max_rank=settings.lora_capacity,
                   served_name=settings.engine.served_name, dns=settings.engine.dns)

    @property
    def key(self) -> str:
        """Names this set of engines in the registry's replica leases (learn/replicas.py): the
        configured URLs, so that every gateway on the same replicas shares the leases."""
        joined = ",".join(sorted(self.configured))
        return joined if len(joined) <= 200 else "engines:" + hashlib.sha256(joined.encode()).hexdigest()[:32]

    @property
    def ready(self) -> bool:
        """At least one replica takes requests."""
        return any(r.ready for r in self.replicas.values())

    @property
    def url(self) -> str:
        """One replica's URL: a ready one when there is one (for callers that need a single engine)."""
        replica = self.pick()
        return replica.url if replica is not None else (next(iter(self.replicas), None) or self.configured[0])

    def live(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.live]

    @property
    def probed(self) -> list[Replica]:
        """The replicas this pool health-checks itself (engine.urls, engine.dns): all but a managed one."""
        return [r for r in self.replicas.values() if r.manager is None]

    def pick(self, affinity: str | None = None, exclude: Iterable[Replica] = ()) -> Replica | None:
        """A ready replica with the fewest requests in flight, or None when none is ready. With
        `affinity` (a conversation's key) the conversation stays on the replica its key hashes to
        (rendezvous hashing: its prefix cache is there) unless that one is busier by AFFINITY_SLACK."""
        skip = set(map(id, exclude))
        ready = [r for r in self.replicas.values() if r.ready and id(r) not in skip]
        if not ready:
            return None
        least = min(ready, key=lambda r: r.outstanding)
        if affinity is None or len(ready) == 1:
            return least
        home = max(ready, key=lambda r: hashlib.blake2b(f"{affinity}|{r.url}".encode(), digest_size=8).digest())
        return home if home.outstanding - least.outstanding < AFFINITY_SLACK else least

    def failed(self, replica: Replica, reason: str) -> None:
        """Take `replica` out of rotation now; the health loop brings it back once it answers and is synced."""
        if replica.manager is None and replica.state != "down":
            log.warning("engine replica %s out of rotation: %s", replica.url, reason)
            replica.set_state("down")
            replica.failures = self.max_failures

    # --- adapters on every replica -------------------------------------------------------
    async def models(self) -> dict[str, str | None]:
        """The models every live replica serves (name -> the folder it was loaded from)."""
        listed = await self._each(lambda r: r.adapters.models(), self.live())
        if not listed:
            raise httpx.ConnectError("no engine replica answers")
        common = set.intersection(*(set(m) for m in listed))
        return {name: listed[0][name] for name in common}

    async def load(self, version: str, path: str | Path) -> bool:
        """Load and warm `version` on every live replica; True when one of them did not have it yet.
        A replica that does not answer is taken out of rotation (it is synced when it rejoins);
        AdapterLoadError when a replica refuses the adapter; httpx.ConnectError when none answers."""
        done = await self._each(lambda r: r.adapters.load(version, path), self.live(), doing=f"loading {version}")
        if not done:
            raise httpx.ConnectError(f"no engine replica answered while loading {version}")
        return any(done)

    async def unload(self, version: str) -> None:
        """Unload `version` from every live replica that has it."""
        async def one(replica: Replica) -> None:
            if version in await replica.adapters.models():
                await replica.adapters.unload(version)

        await self._each(one, self.live(), doing=f"unloading {version}")

    async def sync(self, replica: Replica, wanted: dict[str, str]) -> None:
        """Load onto `replica` each of `wanted` (version -> folder) that it lacks: a replica that
        restarted has lost its run-time adapters. httpx errors propagate (it stays out of rotation)."""
        have = await replica.adapters.models()
        missing = [v for v in wanted if v not in have]
        for version in missing:
            try:
                await replica.adapters.load(version, wanted[version])
            except AdapterLoadError as exc:  # the other replicas hold it; this one will not: say so, go on
                log.error("engine replica %s will not load %s: %s", replica.url, version, exc)
        if missing:
            log.info("engine replica %s synced: loaded %s", replica.url, ", ".join(missing))

    async def verify(self, wanted: dict[str, str]) -> None:
        """Each ready replica still holds `wanted`; one that lost versions (restarted between two
        health checks) leaves rotation while it is synced. Run under the reconciler's pass lock."""
        for replica in [r for r in self.probed if r.state == "ready"]:
            try:
                have = await replica.adapters.models()
            except httpx.HTTPError as exc:
                self.failed(replica, f"{type(exc).__name__}: {exc}")
                continue
            if any(v not in have for v in wanted):
                log.warning("engine replica %s lost adapters (%s): syncing it", replica.url,
                            ", ".join(v for v in wanted if v not in have))
                replica.set_state("syncing")
                try:
                    await self.sync(replica, wanted)
                    replica.set_state("ready")
                except httpx.HTTPError as exc:
                    self.failed(replica, f"syncing: {type(exc).__name__}: {exc}")

    async def _each(self, call: Callable[[Replica], Awaitable[Any]], replicas: list[Replica], *, doing: str = "") -> list[Any]:
        """`call` on each replica at once; the answers of those that answered. One that did not (an httpx
        error) leaves rotation; a refused adapter (AdapterLoadError) is raised first, then any other error."""
        results = await asyncio.gather(*(call(r) for r in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results):
            if isinstance(result, httpx.HTTPError):
                self.failed(replica, f"{doing + ': ' if doing else ''}{type(result).__name__}: {result}")
        errors = [e for e in results if isinstance(e, BaseException) and not isinstance(e, httpx.HTTPError)]
        if errors:
            raise next((e for e in errors if isinstance(e, AdapterLoadError)), errors[0])
        return [r for r in results if not isinstance(r, BaseException)]

    # --- health --------------------------------------------------------------------------
    async def start(self) -> None:
        """Probe every replica once (ready ones take traffic at once), then keep probing."""
        if not self.probed and not self.dns:
            return  # one supervised engine: its manager does the health checks
        await self.check()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        self._task = await cancelled(self._task)

    async def check(self) -> None:
        """One round: re-resolve (dns), probe every replica, bring answering ones back into rotation."""
        if self.dns and time.monotonic() - self._resolved_at >= self.resolve_interval_s:
            await self._resolve()
        probed = self.probed
        await asyncio.gather(*(self._probe(r) for r in probed))
        for state in ("ready", "syncing", "down"):
            metrics.ENGINE_REPLICAS.labels(state=state).set(sum(r.state == state for r in probed))
        metrics.ENGINE_UP.set(1 if self.ready else 0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.check()
            except Exception:  # one bad round must not end health checking
                log.exception("engine replica health check failed")

    async def _probe(self, replica: Replica) -> None:
        try:
            r = await self.http.get(f"{replica.url}/health", timeout=HEALTH_TIMEOUT_S)
            ok = r.status_code == 200
            if ok and replica.state == "down":  # back: it must serve the base model before it syncs
                ok = self.served_name in await replica.adapters.models()
        except (httpx.HTTPError, ValueError):
            ok = False
        if not ok:
            replica.failures += 1
            if replica.failures >= self.max_failures and replica.state != "down":
                log.warning("engine replica %s out of rotation: %d failed health checks", replica.url, replica.failures)
                replica.set_state("down")
            return
        replica.failures = 0
        if replica.state == "down":
            await self._rejoin(replica)

    async def _rejoin(self, replica: Replica) -> None:
        replica.set_state("syncing")
        try:
            if self.on_rejoin is not None:
                await self.on_rejoin(replica)
        except Exception as exc:  # it stays out; the next round tries again
            log.warning("engine replica %s could not be synced: %s", replica.url, exc)
            replica.set_state("down")
            return
        if replica.state == "syncing":
            replica.set_state("ready")
            log.info("engine replica %s takes requests", replica.url)

    async def _resolve(self) -> None:
        """engine.dns: every address of every configured host name is a replica."""
        self._resolved_at = time.monotonic()
        loop = asyncio.get_running_loop()
        found: list[str] = []
        for url in self.configured:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                infos = await loop.getaddrinfo(parts.hostname, port, type=1)  # SOCK_STREAM
            except OSError as exc:
                log.warning("engine.dns: %s does not resolve (%s); keeping the replicas known so far", parts.hostname, exc)
                return
            for *_, sockaddr in infos:
                host = f"[{sockaddr[0]}]" if ":" in sockaddr[0] else sockaddr[0]
                found.append(urlunsplit((parts.scheme, f"{host}:{port}", parts.path, "", "")).rstrip("/"))
        for url in dict.fromkeys(found):
            if url not in self.replicas:
                log.info("engine.dns: new replica %s", url)
                self._add(url)
        for url in [u for u in self.replicas if u not in found]:
            log.info("engine.dns: replica %s is gone", url)
            del self.replicas[url]

    def _add(self, url: str, manager: Any = None) -> Replica:
        replica = Replica(url, EngineAdapters(self.http, url, max_rank=self.max_rank), manager=manager)
        self.replicas[url] = replica
        return replica


async def cancelled(task: asyncio.Task | None) -> None:
    """Cancel a background loop (the pool's health checks, the reconciler's passes) and wait until it has
    ended; None, for the field that held it."""
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
    return None
