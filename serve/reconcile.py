"""Hot-swap: make the engine's loaded adapters and the gateway's aliases match the registry.

    reconciler = Reconciler(router, http, engine_url, drain_timeout_s=600)
    reconciler.start()                        # a pass now, then every few seconds
    await reconciler.reconcile()              # one pass now (after a promotion); alias -> version served

The gateway builds one `Reconciler` and runs `reconcile()` on startup, every few seconds
(other processes - `tunewheel adapters promote`, the learner - change the registry), right
after an admin promotion or rollback, and after an engine restart. One pass, per alias:

    target = router.targets()[alias]                         (serve/routing.py decides it)
    load target into vLLM under its immutable version name  (skipped when already loaded)
    warm it with one tiny completion                         (the first user request is not the slow one)
    router.table.set(alias, target)                          (new requests go to the new version)
    drain the old version, then unload it                    (in-flight requests finish on it)

A zero-downtime swap follows from that order: the alias flips only after the new version
answers, and the old one leaves the engine only after its last request. A load that fails
(adapter folder vanished, rank too large, wrong base model) keeps the alias where it is and
logs the error with the fix. Pinned `chat@<version>` requests (and restylers on the chat
engine) load their version on demand through `ensure_pinned()`; such versions are unloaded
again after `PINNED_IDLE_S` unused.

Only versions this reconciler loaded or aliased are ever unloaded by it: a learner in another
process may have loaded a candidate for evaluation, and that one is not ours to take away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from serve.routing import Router, Target

log = logging.getLogger("tunewheel.reconcile")

PINNED_IDLE_S = 600.0


class AdapterLoadError(RuntimeError):
    """The engine would not load an adapter; the message says why and what to fix."""


class Reconciler:
    """Converges the engine and the router's alias table on the router's targets. All methods
    are safe to call concurrently. `drain_timeout_s`: how long an old version's requests may
    run on after a swap before it is unloaded anyway (serve.request_timeout_s)."""

    def __init__(self, router: Router, http_client: httpx.AsyncClient, engine_url: str, *, drain_timeout_s: float = 600.0):
        self.router = router
        self.table = router.table  # what the engine serves now, and the leases a swap drains
        self.http = http_client
        self.engine_url = engine_url.rstrip("/")
        self.base_name = router.base
        self.drain_timeout_s = drain_timeout_s
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._pass_lock = asyncio.Lock()
        self._owned: set[str] = set()  # versions loaded by us, ours to unload
        self._pinned_used: dict[str, float] = {}  # version -> last use (monotonic)
        self._task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # for callers on other threads (the learner)
        self.last_error: str | None = None

    # --- engine calls --------------------------------------------------------------------
    async def models(self) -> dict[str, str | None]:
        """Engine model name -> the path it was loaded from (vLLM's `root`), base model included."""
        r = await self.http.get(f"{self.engine_url}/v1/models", timeout=10)
        r.raise_for_status()
        return {m["id"]: m.get("root") for m in r.json().get("data", [])}

    async def loaded(self) -> set[str]:
        """Names the engine serves now (the base model and every loaded adapter)."""
        return set(await self.models())

    async def load(self, version: str, path: str | Path) -> None:
        """Load `version` from `path` unless it is already loaded, then warm it with one request."""
        lock = self._name_locks.setdefault(version, asyncio.Lock())
        async with lock:
            path = str(Path(path).resolve())
            models = await self.models()
            if version in models and models[version] in (None, path):
                return
            if not Path(path, "adapter_config.json").is_file():
                raise AdapterLoadError(
                    f"adapter {version}: {path} has no adapter_config.json (folder vanished or incomplete); "
                    f"roll back (`tunewheel adapters rollback`) or restore the folder"
                )
            if version in models:
                # Same name, other folder: an engine shared with another registry (or a test's
                # earlier data dir) left it there. Names are only unique within one registry.
                log.warning("engine has %s from %s, not %s: reloading it from ours", version, models[version], path)
                await self.http.post(f"{self.engine_url}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)
            t0 = time.perf_counter()
            r = await self.http.post(
                f"{self.engine_url}/v1/load_lora_adapter",
                json={"lora_name": version, "lora_path": path},
                timeout=120,
            )
            if r.status_code >= 400 and version not in await self.loaded():
                raise AdapterLoadError(
                    f"engine refused adapter {version} from {path}: HTTP {r.status_code} {r.text.strip()[:300]} "
                    f"(check that it was trained on the served base model and its rank <= engine.max_lora_rank)"
                )
            self._owned.add(version)
            loaded_ms = 1000 * (time.perf_counter() - t0)
            try:
                await self.warm(version)
            except (AdapterLoadError, httpx.HTTPError):
                await self.http.post(f"{self.engine_url}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)
                self._owned.discard(version)
                raise
            self.table.loaded.add(version)
            log.info("loaded adapter %s in %.0f ms, warmed in %.0f ms", version, loaded_ms, 1000 * (time.perf_counter() - t0) - loaded_ms)

    async def warm(self, name: str) -> None:
        """One tiny greedy completion so the adapter's weights are resident before users arrive."""
        r = await self.http.post(
            f"{self.engine_url}/v1/completions",
            json={"model": name, "prompt": "Hello", "max_tokens": 1, "temperature": 0},
            timeout=120,
        )
        if r.status_code >= 400:
            raise AdapterLoadError(f"adapter {name} loaded but its warm-up request failed: HTTP {r.status_code} {r.text[:300]}")

    async def unload(self, version: str) -> None:
        lock = self._name_locks.setdefault(version, asyncio.Lock())
        async with lock:
            r = await self.http.post(f"{self.engine_url}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)
            if r.status_code >= 400 and r.status_code != 404:
                log.warning("unload of %s answered HTTP %s: %s", version, r.status_code, r.text[:200])
            self._owned.discard(version)
            self._pinned_used.pop(version, None)
            self.table.loaded.discard(version)
            log.info("unloaded adapter %s", version)

    # --- the pass ------------------------------------------------------------------------
    async def reconcile(self) -> dict[str, str]:
        """One convergence pass; returns alias -> version now served. Never raises for a bad adapter."""
        async with self._pass_lock:
            targets = await asyncio.to_thread(self.router.targets)
            before = {alias: self.table.resolve(alias) for alias in targets}
            for alias, target in targets.items():
                name = target.version
                if target.path is not None:
                    try:
                        await self.load(name, target.path)
                    except (AdapterLoadError, httpx.HTTPError) as exc:
                        # Logged once per distinct error, not on every periodic pass.
                        (log.error if str(exc) != self.last_error else log.debug)("alias %s stays on %s: %s", alias, before.get(alias), exc)
                        self.last_error = str(exc)
                        await self._keep_current(alias, before.get(alias))
                        continue
                    self._owned.add(name)  # an aliased version is ours to unload later, even if another process loaded it
                if self.table.resolve(alias) != name:
                    self.table.set(alias, name)
                    log.info("alias %s -> %s (was %s)", alias, name, before.get(alias))
            now = {alias: self.table.resolve(alias) for alias in targets}
            await self._retire(set(before.values()) - set(now.values()), keep=set(now.values()))
            await self._unload_idle_pinned(keep=set(now.values()))
            return now

    async def _keep_current(self, alias: str, current: str | None) -> None:
        """After a failed load: stay on the current version if the engine still has it, else fall back to base."""
        try:
            loaded = await self.loaded()
        except httpx.HTTPError:
            return
        if current is None or current not in loaded:
            log.error("alias %s: %s is not loaded either; serving the base model until the adapter is fixed", alias, current)
            self.table.set(alias, self.base_name)

    async def _retire(self, old: set[str], keep: set[str]) -> None:
        """Unload versions no alias serves any more, each once its in-flight requests have finished."""
        for version in old - keep - {self.base_name, None}:
            if version not in self._owned:
                continue
            if version in self._pinned_used:  # someone pins it; the idle sweep decides
                continue
            asyncio.get_running_loop().create_task(self._drain_then_unload(version))

    async def _drain_then_unload(self, version: str) -> None:
        try:
            drained = await self.table.drain(version, timeout=self.drain_timeout_s)
            if drained is False:
                log.warning("%s still had requests in flight after the drain timeout; unloading anyway", version)
            if version in self.table.aliases().values():
                return  # a rollback brought it back while we waited
            await self.unload(version)
        except Exception:
            log.exception("could not unload %s", version)

    async def _unload_idle_pinned(self, keep: set[str]) -> None:
        cutoff = time.monotonic() - PINNED_IDLE_S
        for version, last in list(self._pinned_used.items()):
            if last < cutoff and version not in keep and version in self._owned:
                self._pinned_used.pop(version, None)
                asyncio.get_running_loop().create_task(self._drain_then_unload(version))

    # --- pinned versions -----------------------------------------------------------------
    async def ensure_pinned(self, target: Target) -> None:
        """Load a version used outside the aliases (`chat@<version>`, a restyler) on demand;
        unloaded again once unused for PINNED_IDLE_S. Raises AdapterLoadError or httpx.HTTPError."""
        self._pinned_used[target.version] = time.monotonic()
        if target.version in self._owned or target.version in self.table.aliases().values():
            return
        await self.load(target.version, target.path)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self, interval_s: float = 3.0) -> None:
        """Reconcile now and then every `interval_s` seconds in the running event loop."""
        if self._task is None:
            self.loop = asyncio.get_running_loop()
            self._task = self.loop.create_task(self._loop(interval_s))

    async def _loop(self, interval_s: float) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as exc:  # engine down or DB hiccup: the next pass retries
                if str(exc) != self.last_error:
                    log.warning("reconcile pass failed (will retry): %s", exc)
                self.last_error = str(exc)
            await asyncio.sleep(interval_s)

    def on_engine_restart(self, *_: Any) -> None:
        """Hook for the engine manager: a restarted engine has no adapters; forget and reload them."""
        self._owned.clear()
        self._pinned_used.clear()
        self.table.loaded.clear()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called from another thread; the periodic pass picks it up within seconds
        loop.create_task(self.reconcile())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
