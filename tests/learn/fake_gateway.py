"""A stand-in for the gateways' side of a promotion, for tests without an engine.

    converge = FakeGateway(registry)                     # run_cycle(..., converge=converge): one pass per call
    with FakeGateway(registry, refuse={"chat-v0002"}):   # a gateway polling in the background
        CliRunner().invoke(app, ["adapters", "promote", "chat-v0002"])

Like serve/reconcile.py's pass: claim the pending promotions (learn/promotion.py), "load" each
(a version in `refuse`, or any with `refuse_all`, fails as an engine refusal would), then finish it, which is the registry's
compare-and-swap. `loaded` lists what was loaded, in order.
"""

from __future__ import annotations

import threading

from learn import promotion
from learn.registry import Registry, RegistryError


class FakeGateway:
    def __init__(self, registry: Registry, *, refuse: set[str] | frozenset = frozenset(), refuse_all: bool = False,
                 name: str = "fake-gateway"):
        self.registry, self.refuse, self.refuse_all, self.name = registry, set(refuse), refuse_all, name
        self.loaded: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def run_pass(self) -> None:
        for row, version in promotion.claim(self.registry, self.name):
            refused = self.refuse_all or version.name in self.refuse
            error = f"engine refused adapter {version.name}: HTTP 400 (weights do not fit)" if refused else None
            if error is None:
                self.loaded.append(version.name)
            try:
                promotion.finish(self.registry, row.id, error=error)
            except RegistryError:
                pass  # fell back or superseded: the requester reads the row

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            self.run_pass()

    def __enter__(self) -> FakeGateway:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    __call__ = run_pass  # as a `converge` callable: one pass now
