"""Hot-swap: make the engine's loaded adapters and the gateway's aliases match the registry.

    reconciler = Reconciler(router, http, pool, drain_timeout_s=600)   # pool: serve/pool.py (or one engine's URL)
    await reconciler.start()                  # a first pass now, then one every few seconds
    await reconciler.reconcile()              # one pass now (after a promotion); alias -> version served

The gateway builds one `Reconciler` and runs a pass on startup, every few seconds (other
processes change the registry), right after an admin promotion or rollback, and at once after
an engine restart or when the engine answered that it lost a version. One pass:

    1. finish the promotions other processes asked for (the learner, `tunewheel adapters
       promote`; learn/promotion.py): claim each pending one, load + warm it, then the registry's
       compare-and-swap; a load that fails is recorded as a fallback and prod stays where it was
    2. per alias, target = router.targets()[alias]            (serve/routing.py decides it)
       load target into vLLM under its immutable version name  (skipped when already loaded)
       warm it with one tiny completion                         (the first user request is not the slow one)
       router.table.set(alias, target)                          (new requests go to the new version)
       drain the old version, then unload it                    (in-flight requests finish on it;
                                                                 the version a rollback would reach stays)
    3. heartbeat: the versions this replica uses go to the registry (learn/replicas.py)

A zero-downtime swap follows from that order: the alias flips only after the new version
answers, and the old one leaves the engine only after its last request, and only once no other
gateway replica on the same engine leases it (otherwise a later pass tries again). Kept loaded
without being served, so that the next swap is a flip and not a load under load: the version a
rollback of a prod alias would reach (`standby`: `Target.fallbacks[0]`, usually the one just
replaced), and the newest candidates a promotion may pick (`staged`: `Target.staged`) while the
engine has LoRA slots to spare (`max_loras`, after what is served, standby and pinned). A prod
alias's canary (`Target.canary`, learn/live.py) is loaded and warmed, then answers its share
(`AliasTable.canaries`); when it ends it is unloaded, or becomes the alias's version.

A target that will not load (folder vanished, rank too large, weights that do not fit the base
model) never leaves an alias on the base model silently: the alias stays on its version while the
engine has it, else on the last good versions (`Target.fallbacks`) in turn, else on the base model;
`tunewheel_alias_fallback{alias}` is 1 meanwhile and the error with its fix is logged once. Aliases
are served only after a pass that reached the engine (`AliasTable.synced`; cleared by an engine
restart), which is what /ready waits for. When the registry cannot be read, a pass works from the
targets it read last. `chat@<version>` requests (and restylers on the chat engine) load their
version on demand (`ensure_pinned()`), unloaded after `PINNED_IDLE_S` unused. Only versions this
reconciler loaded or aliased are ever unloaded by it (a learner may have loaded one to evaluate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from learn import promotion
from learn.registry import RegistryError
from learn.replicas import ReplicaLeases
from serve.adapters import AdapterLoadError
from serve.metrics import ALIAS_FALLBACK
from serve.pool import EnginePool, Replica, cancelled
from serve.routing import Router, Target

log = logging.getLogger("tunewheel.reconcile")

PINNED_IDLE_S = 600.0
HEARTBEAT_S = 10.0  # well within learn.replicas.REPLICA_TTL_S
FIRST_PASS_S = 30.0  # how long start() waits for the first pass before serving goes on without it

class Reconciler:
    """Converges the engine and the router's alias table on the router's targets; every method is safe to
    call concurrently. `drain_timeout_s`: how long an old version's requests may run on after a swap
    (serve.request_timeout_s). `max_lora_rank`, `max_loras`: the engine's LoRA capacity and slots (None:
    no candidate is staged). `leases`: this replica's row in the registry (default: on the router's)."""

    def __init__(self, router: Router, http_client: httpx.AsyncClient, engines: EnginePool | str, *, drain_timeout_s: float = 600.0,
                 max_lora_rank: int | None = None, max_loras: int | None = None, leases: ReplicaLeases | None = None):
        self.router = router
        self.table = router.table  # what the engine serves now, and the leases a swap drains
        self.registry = router.registry
        if isinstance(engines, str):
            engines = EnginePool.of(engines, http_client, max_rank=max_lora_rank)
        self.pool = engines  # every load and unload reaches each of its replicas
        self.pool.on_rejoin = self.rejoin
        self.engine_url = self.pool.key
        self._paths: dict[str, str] = {}  # version -> the folder it was loaded from, for replicas that rejoin
        self.base_name = router.base
        self.drain_timeout_s, self.max_loras = drain_timeout_s, max_loras
        if leases is None and self.registry is not None:
            leases = ReplicaLeases(self.registry.db, engine_url=self.engine_url)
        self.leases = leases
        self._pass_lock = asyncio.Lock()
        self._owned: set[str] = set()  # versions loaded by us, ours to unload
        self._pinned_used: dict[str, float] = {}  # version -> last use (monotonic)
        self._retiring: set[str] = set()  # to unload once drained and no other replica leases them
        self._unloading: set[str] = set()
        self._targets: dict[str, Target] | None = None  # the last targets read from the registry
        self._beat: tuple[float, set[str] | None] = (0.0, None)  # when this replica last told the registry, and what
        self.off_target: dict[str, str] = {}  # alias -> the target it should serve but cannot
        self.standby: set[str] = set()  # the versions a rollback would reach: kept loaded, not served
        self.staged: set[str] = set()  # candidates loaded ahead of a promotion (Target.staged): kept loaded, not served
        self._unstageable: set[str] = set()  # candidates that would not load: left to the promotion to report
        self._task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # for callers on other threads (the learner)
        self.last_error: str | None = None

    # --- the engine ----------------------------------------------------------------------
    async def load(self, version: str, path: str | Path) -> None:
        """Load and warm `version` unless the engine has it already (then it is not ours to unload)."""
        if await self.pool.load(version, path):
            self._owned.add(version)
        self._paths[version] = str(path)
        self.table.loaded.add(version)

    async def unload(self, version: str) -> None:
        await self.pool.unload(version)
        self._paths.pop(version, None)
        self._owned.discard(version)
        self._pinned_used.pop(version, None)
        self.table.loaded.discard(version)

    # --- the pass ------------------------------------------------------------------------
    async def reconcile(self) -> dict[str, str]:
        """One convergence pass; returns alias -> version now served. Never raises for a bad adapter."""
        async with self._pass_lock:
            self.table.wake.clear()
            await self.pool.verify(self._wanted())
            if await self._finish_promotions():
                self._targets = None
            targets = await self._read_targets()
            before = self.table.aliases()
            reached = [await self._serve(alias, target, before.get(alias)) for alias, target in targets.items()]
            now = {alias: self.table.resolve(alias) for alias in targets}
            if all(reached):
                self.table.synced = True
            canaries_before = {version for version, _ in self.table.canaries.values()}
            for alias, target in targets.items():
                await self._serve_canary(alias, target)
            canaries = {version for version, _ in self.table.canaries.values()}
            # what a rollback would go back to stays loaded: a rollback is then a flip, not a reload
            was_standby, was_staged = self.standby, self.staged
            self.standby = {t.fallbacks[0].version for t in targets.values() if t.fallbacks} - set(now.values())
            keep = set(now.values()) | self.standby | canaries
            self.staged = await self._stage(targets, keep)
            keep |= self.staged
            self._retiring |= {v for v in (set(before.values()) | was_standby | was_staged | canaries_before) - keep
                               if v in self._owned and v not in self._pinned_used}
            self._sweep_pinned(keep=keep)
            await self._heartbeat()
            self._start_unloads(keep=keep)
            return now

    async def _stage(self, targets: dict[str, Target], keep: set[str]) -> set[str]:
        """Load the candidates a promotion may pick next into the LoRA slots left after `keep` and the pinned versions."""
        taken = keep | set(self._pinned_used)
        spare = (self.max_loras or 0) - len(taken - {self.base_name})
        staged: set[str] = set()
        for candidate in (c for t in targets.values() for c in t.staged if c.path is not None):
            if len(staged) >= spare or candidate.version in taken | self._unstageable:
                continue
            try:  # one staged before and still loaded needs no call (pool.verify checks the replicas each pass)
                if candidate.version not in self.staged & self.table.loaded:
                    await self.load(candidate.version, candidate.path)
            except AdapterLoadError as exc:  # its promotion, if one is asked for, says why
                self._unstageable.add(candidate.version)
                log.info("candidate %s is not loaded ahead of a promotion: %s", candidate.version, exc)
                continue
            except httpx.HTTPError:  # the engine is down: the next pass tries again
                break
            self._owned.add(candidate.version)
            staged.add(candidate.version)
        return staged

    async def rejoin(self, replica: Replica) -> None:
        """A replica answers again: it gets every version the others serve before it takes requests."""
        async with self._pass_lock:
            await self.pool.sync(replica, self._wanted())

    def _wanted(self) -> dict[str, str]:
        """The versions every replica should hold (loaded and not being unloaded) and their folders."""
        return {v: self._paths[v] for v in self.table.loaded - self._unloading if v in self._paths}

    async def _read_targets(self) -> dict[str, Target]:
        try:
            self._targets = await asyncio.to_thread(self.router.targets)
        except Exception as exc:
            if self._targets is None:
                raise
            self._note(f"the registry could not be read ({exc}); serving on from the targets read before", logging.WARNING)
        return self._targets

    async def _serve(self, alias: str, target: Target, current: str | None) -> bool:
        """Put `alias` on `target`, or on the best fallback; False when the engine did not answer."""
        if target.path is not None:
            try:
                await self.load(target.version, target.path)
            except httpx.HTTPError as exc:  # engine down or restarting: leave the table as it is
                self._note(f"alias {alias}: the engine did not answer ({type(exc).__name__}: {exc})", logging.WARNING)
                self.table.loading[alias] = target.version
                return False
            except AdapterLoadError as exc:
                self._note(f"alias {alias} cannot be served from {target.version}: {exc}")
                return await self._fall_back(alias, target, current)
            self._owned.add(target.version)  # an aliased version is ours to unload later, even if another process loaded it
        self._set(alias, target.version, target.version)
        return True

    async def _serve_canary(self, alias: str, target: Target) -> None:
        """Load the alias's canary (learn/live.py) and let it answer its share; stop when it has none."""
        canary = target.canary
        if canary is None or canary.path is None:
            if self.table.canaries.pop(alias, None) is not None:
                log.info("alias %s: canary ended", alias)
            return
        try:
            await self.load(canary.version, canary.path)
        except (AdapterLoadError, httpx.HTTPError) as exc:  # prod answers everything meanwhile
            self._note(f"alias {alias}: canary {canary.version} will not load, so prod answers every conversation: {exc}")
            self.table.canaries.pop(alias, None)
            return
        self._owned.add(canary.version)
        if self.table.canaries.get(alias) != (canary.version, target.canary_share):
            log.info("alias %s: canary %s answers %.0f%% of new conversations", alias, canary.version, 100 * target.canary_share)
        self.table.canaries[alias] = (canary.version, target.canary_share)

    async def _fall_back(self, alias: str, target: Target, current: str | None) -> bool:
        """The target will not load: stay on the current version while the engine has it, else the last
        good versions in turn, and the base model only when none of them loads."""
        try:
            models = await self.pool.models()
        except httpx.HTTPError:
            return False
        if current is not None and current != self.base_name and current in models:
            self.table.loaded.add(current)
            self._set(alias, current, target.version)
            return True
        for good in target.fallbacks:
            try:
                await self.load(good.version, good.path)
            except AdapterLoadError as exc:
                self._note(f"alias {alias}: fallback {good.version} will not load either: {exc}")
                continue
            except httpx.HTTPError:
                return False
            self._owned.add(good.version)
            self._set(alias, good.version, target.version)
            return True
        self._set(alias, self.base_name, target.version)
        return True

    def _set(self, alias: str, version: str, target: str) -> None:
        """Route `alias` to `version`; a version other than its `target` is a fallback, counted and logged."""
        self.table.loading.pop(alias, None)
        if self.table.resolve(alias) != version:
            log.info("alias %s -> %s (was %s)", alias, version, self.table.resolve(alias))
            self.table.set(alias, version)
        if version != target and self.off_target.get(alias) != target:
            log.error("alias %s serves %s in place of its target %s, which will not load (tunewheel_alias_fallback)%s",
                      alias, version, target, "; no last good version loads either" if version == self.base_name else "")
        if version != target:
            self.off_target[alias] = target
        else:
            self.off_target.pop(alias, None)
        ALIAS_FALLBACK.labels(alias=alias).set(0 if version == target else 1)

    def _note(self, message: str, level: int = logging.ERROR) -> None:
        """Log a problem once, not on every periodic pass."""
        log.log(level if message != self.last_error else logging.DEBUG, "%s", message)
        self.last_error = message

    # --- promotions asked for by other processes -----------------------------------------
    async def _finish_promotions(self) -> bool:
        """Load each pending promotion this replica claims, then flip it in the registry; True when prod moved."""
        if self.registry is None or self.leases is None:
            return False
        try:
            claimed = await asyncio.to_thread(promotion.claim, self.registry, self.leases.id)
        except Exception as exc:
            self._note(f"pending promotions could not be read: {exc}", logging.WARNING)
            return False
        moved = False
        for row, version in claimed:
            error = None
            try:
                await self.load(version.name, version.path)
            except (AdapterLoadError, httpx.HTTPError) as exc:
                error = f"{type(exc).__name__}: {exc}" if isinstance(exc, httpx.HTTPError) else str(exc)
            try:
                await asyncio.to_thread(promotion.finish, self.registry, row.id, error=error)
                moved = True
            except RegistryError as exc:  # fell back, superseded, or called off meanwhile
                log.warning("promotion %s of %s: %s", row.id, row.version, exc)
                self.discard(version.name)
        return moved

    def discard(self, version: str) -> None:
        """`version` was loaded for a promotion that did not happen: unload it once nothing uses it."""
        if version in self._owned and version not in self.in_use():
            self._retiring.add(version)

    # --- unloading -----------------------------------------------------------------------
    def in_use(self) -> set[str]:
        """The versions this replica uses: aliased, pinned recently, or with requests in flight."""
        canaries = {version for version, _ in self.table.canaries.values()}
        return {*self.table.aliases().values(), *canaries, *self._pinned_used, *self.table.busy()} - {self.base_name}

    async def _heartbeat(self) -> None:
        """Tell the other replicas what this one uses: when that changed, else every HEARTBEAT_S."""
        using = self.in_use()
        if self.leases is None or (using == self._beat[1] and time.monotonic() - self._beat[0] < HEARTBEAT_S):
            return
        try:
            await asyncio.to_thread(self.leases.beat, using)
            self._beat = (time.monotonic(), using)
        except Exception as exc:  # the database is down: other replicas see our last row, which is the safe side
            self._note(f"replica heartbeat failed: {exc}", logging.WARNING)

    def _start_unloads(self, keep: set[str]) -> None:
        for version in sorted(self._retiring - self._unloading):
            if version in keep:
                self._retiring.discard(version)
                continue
            self._unloading.add(version)
            asyncio.get_running_loop().create_task(self._drain_then_unload(version))

    async def _drain_then_unload(self, version: str) -> None:
        try:
            drained = await self.table.drain(version, timeout=self.drain_timeout_s)
            if drained is False:
                log.warning("%s still had requests in flight after the drain timeout; unloading anyway", version)
            if version in self.table.aliases().values() or version in self._pinned_used or version in self.standby \
                    or version in self.staged or version in {v for v, _ in self.table.canaries.values()}:
                self._retiring.discard(version)  # a rollback or a pinned request brought it back while we waited
                return
            if await self._leased_elsewhere(version):
                return  # still in _retiring: a later pass tries again
            self._retiring.discard(version)
            await self.unload(version)  # from each replica that has it (another gateway may have unloaded it already)
        except Exception:
            log.exception("could not unload %s", version)
        finally:
            self._unloading.discard(version)

    async def _leased_elsewhere(self, version: str) -> bool:
        """Whether another live replica on this engine uses `version` (when unsure: yes)."""
        if self.leases is None:
            return False
        try:
            await asyncio.to_thread(self.leases.beat, self.in_use())  # our row no longer lists it
            self._beat = (time.monotonic(), self.in_use())
            others = await asyncio.to_thread(self.leases.others_using, version)
        except Exception as exc:
            self._note(f"replica leases could not be read ({exc}); {version} stays loaded for now", logging.WARNING)
            return True
        if others:
            log.info("%s stays loaded: replica(s) %s still use it", version, ", ".join(others))
        return bool(others)

    def _sweep_pinned(self, keep: set[str]) -> None:
        cutoff = time.monotonic() - PINNED_IDLE_S
        for version, last in list(self._pinned_used.items()):
            if last < cutoff and version not in keep and version in self._owned:
                self._pinned_used.pop(version, None)
                self._retiring.add(version)

    # --- pinned versions -----------------------------------------------------------------
    async def ensure_pinned(self, target: Target) -> None:
        """Load a version used outside the aliases (`chat@<version>`, a restyler) on demand;
        unloaded again once unused for PINNED_IDLE_S. Raises AdapterLoadError or httpx.HTTPError."""
        self._pinned_used[target.version] = time.monotonic()
        self._retiring.discard(target.version)
        if target.version in self.table.loaded and (target.version in self._owned
                                                    or target.version in self.table.aliases().values()):
            return
        await self.load(target.version, target.path)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, interval_s: float = 3.0, first_pass_s: float = FIRST_PASS_S) -> None:
        """Reconcile now and then every `interval_s` seconds (or when woken) in the running event loop;
        waits up to `first_pass_s` for the first pass, which the aliases are not served before."""
        if self._task is None:
            self.loop = asyncio.get_running_loop()
            first = asyncio.Event()
            self._task = self.loop.create_task(self._loop(interval_s, first))
            try:
                await asyncio.wait_for(first.wait(), first_pass_s)
            except asyncio.TimeoutError:
                log.warning("the first reconcile pass takes longer than %g s; aliases answer 503 until it ends", first_pass_s)

    async def _loop(self, interval_s: float, first: asyncio.Event) -> None:
        while True:
            try:
                await self.reconcile()
            except Exception as exc:  # engine down or DB hiccup: the next pass retries
                self._note(f"reconcile pass failed (will retry): {exc}", logging.WARNING)
            first.set()
            try:
                await asyncio.wait_for(self.table.wake.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    def on_engine_restart(self, *_: Any) -> None:
        """Hook for the engine manager: a restarted engine has no adapters; stop serving the aliases
        until they are reloaded, and reload them now."""
        self._owned.clear()
        self._pinned_used.clear()
        self._retiring.clear()
        self.table.loaded.clear()
        self.table.synced = False
        self.table.wake.set()
        if self._task is None:
            try:
                asyncio.get_running_loop().create_task(self.reconcile())
            except RuntimeError:
                pass  # called from another thread; the periodic pass picks it up within seconds

    async def stop(self) -> None:
        self._task = await cancelled(self._task)
        if self.leases is not None:
            try:
                await asyncio.to_thread(self.leases.leave)
            except Exception as exc:  # it lapses after its TTL anyway
                log.warning("could not remove this replica's leases: %s", exc)
