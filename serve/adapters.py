"""The engine's LoRA adapters over vLLM's HTTP API: what is loaded, load (checked, then warmed), unload.

    adapters = EngineAdapters(http, "http://127.0.0.1:8001", max_rank=16)
    await adapters.models()                                         # name -> folder, base model included
    await adapters.load("chat-v0003", "/data/adapters/chat-v0003")  # AdapterLoadError says why and what to fix
    await adapters.unload("chat-v0002")

One lock per adapter name, so a load and an unload of the same version never interleave. A load
is refused before the engine sees it when the folder has no adapter_config.json, or when the
adapter's LoRA rank is more than the engine holds (`max_rank`, Settings.lora_capacity, which is
what `tunewheel serve` passes to vLLM as --max-lora-rank); vLLM's own refusal (weights that do
not fit the base model, ...) comes back with its message. A loaded adapter is warmed with one
tiny completion, and unloaded again when that fails, so "loaded" always means "answers".
The reconciler (serve/reconcile.py) keeps the books of who loaded what; this module only talks
to the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx

from learn.promotion import RankTooLarge, check_rank

log = logging.getLogger("tunewheel.reconcile")


class AdapterLoadError(RuntimeError):
    """The engine would not load an adapter; the message says why and what to fix."""


class EngineAdapters:
    """LoRA adapters of the engine at `engine_url`, through `http`; `max_rank`: its --max-lora-rank."""

    def __init__(self, http: httpx.AsyncClient, engine_url: str, *, max_rank: int | None = None):
        self.http = http
        self.url = engine_url.rstrip("/")
        self.max_rank = max_rank
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def models(self) -> dict[str, str | None]:
        """Engine model name -> the path it was loaded from (vLLM's `root`), base model included."""
        r = await self.http.get(f"{self.url}/v1/models", timeout=10)
        r.raise_for_status()
        return {m["id"]: m.get("root") for m in r.json().get("data", [])}

    async def load(self, version: str, path: str | Path) -> bool:
        """Load `version` from `path` and warm it; False when it was already loaded from there."""
        async with self.lock(version):
            path = str(Path(path).resolve())
            models = await self.models()
            if version in models and models[version] in (None, path):
                return False
            self.check(version, path)
            if version in models:
                # Same name, other folder: an engine shared with another registry (or a test's
                # earlier data dir) left it there. Names are only unique within one registry.
                log.warning("engine has %s from %s, not %s: reloading it from ours", version, models[version], path)
                await self._unload(version)
            t0 = time.perf_counter()
            r = await self.http.post(f"{self.url}/v1/load_lora_adapter", json={"lora_name": version, "lora_path": path},
                                     timeout=120)
            if r.status_code >= 400 and version not in await self.models():
                raise AdapterLoadError(
                    f"engine refused adapter {version} from {path}: HTTP {r.status_code} {r.text.strip()[:300]} "
                    f"(check that it was trained on the served base model and its rank <= engine.max_lora_rank)")
            loaded_ms = 1000 * (time.perf_counter() - t0)
            try:
                await self.warm(version)
            except (AdapterLoadError, httpx.HTTPError):
                await self._unload(version)
                raise
            log.info("loaded adapter %s in %.0f ms, warmed in %.0f ms", version, loaded_ms,
                     1000 * (time.perf_counter() - t0) - loaded_ms)
            return True

    def check(self, version: str, path: str) -> None:
        """What can be refused without asking the engine: a folder without an adapter, a rank too large."""
        if not Path(path, "adapter_config.json").is_file():
            raise AdapterLoadError(f"adapter {version}: {path} has no adapter_config.json (folder vanished or incomplete); "
                                   "roll back (`tunewheel adapters rollback`) or restore the folder")
        try:
            check_rank(version, path, self.max_rank)
        except RankTooLarge as exc:
            raise AdapterLoadError(str(exc)) from exc

    async def warm(self, name: str) -> None:
        """One tiny greedy completion so the adapter's weights are resident before users arrive."""
        r = await self.http.post(f"{self.url}/v1/completions", timeout=120,
                                 json={"model": name, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        if r.status_code >= 400:
            raise AdapterLoadError(f"adapter {name} loaded but its warm-up request failed: HTTP {r.status_code} {r.text[:300]}")

    async def unload(self, version: str) -> None:
        async with self.lock(version):
            await self._unload(version)
        log.info("unloaded adapter %s", version)

    async def _unload(self, version: str) -> None:
        r = await self.http.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": version}, timeout=30)
        if r.status_code >= 400 and r.status_code != 404:
            log.warning("unload of %s answered HTTP %s: %s", version, r.status_code, r.text[:200])
