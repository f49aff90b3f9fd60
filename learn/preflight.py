"""Pre-flight: what a long command needs, checked in seconds before it trains or scores anything.

    from learn import preflight
    try:
        preflight.base_model(settings.base_model_path())      # the folder the trainer loads (config.json)
        preflight.heldout(settings.learn.heldout_file)         # parses, as the evaluation will read it
        gateway = preflight.Preflight("http://127.0.0.1:8000", api_key)
        names = gateway.gateway(admin=True)                    # reachable, key accepted, engine ready
        gateway.serves(names, "chat")                          # the model asked for is served
    except preflight.PreflightError as exc:
        fail(str(exc))                                         # one line that says what to fix

`tunewheel learn run`, `learn schedule`, `eval` and `restyle build|train` run these checks
first (learn/cli.py, learn/cli_eval.py, learn/cli_restyle.py), so a wrong key, a stopped
gateway or a broken held-out file costs seconds, not a training run. Every HTTP request has a
short timeout (`timeout`, 5 s): a gateway that does not answer fails the check within it.
"""

from __future__ import annotations

from pathlib import Path

import httpx

KEY_HINT = "set TUNEWHEEL_API_KEY (or pass --api-key) to a key whose hash (`tunewheel keys hash KEY`) is in serve.api_keys"


class PreflightError(RuntimeError):
    """A check failed; the message is one line that says what to fix."""


def base_model(model: str) -> None:
    """The base model the trainer (and the tokenizer) load is there: a folder with config.json.
    A Hugging Face id is not checked here (it may be downloaded at training time)."""
    from learn.train_config import looks_like_path

    if looks_like_path(model) and not (Path(model) / "config.json").is_file():
        raise PreflightError(f"the base model {model} is not there (no config.json): run `tunewheel model prepare`, "
                             "or set engine.model to a model folder or a Hugging Face id")


def heldout(path: str | Path | None, *, what: str = "learn.heldout_file") -> int:
    """The held-out file parses (learner JSONL or CoQA JSON) and has items; returns their turns."""
    from learn.evaluate import HeldoutError, load_heldout

    if path is None:
        return 0
    try:
        items = load_heldout(path)
    except HeldoutError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        problems = lines[1:] or lines
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise PreflightError(f"{what} {path} does not parse: {problems[0]}{more}; fix it or point {what} at another file") from None
    return sum(len(item.turns) for item in items)


class Preflight:
    """The checks that talk to the gateway at `gateway_url` with `api_key` (None: no key sent)."""

    def __init__(self, gateway_url: str, api_key: str | None = None, *, timeout: float = 5.0):
        self.url = gateway_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _get(self, path: str, *, auth: bool = True) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}"} if auth and self.api_key else {}
        try:
            return httpx.get(self.url + path, headers=headers, timeout=self.timeout, trust_env=False)
        except httpx.TimeoutException:
            raise PreflightError(f"the gateway at {self.url} did not answer within {self.timeout:g} s: "
                                 "is `tunewheel serve` running there? (or pass --url)") from None
        except httpx.TransportError as exc:
            raise PreflightError(f"cannot reach the gateway at {self.url} ({type(exc).__name__}): start it with "
                                 "`tunewheel serve`, or pass --url with the address it listens on") from None

    def gateway(self, *, admin: bool = False) -> list[str]:
        """Reachable, a tunewheel gateway, the key accepted (an admin key when `admin` and the gateway
        tells keys apart), the engine ready. Returns the names the gateway serves."""
        health = self._get("/health", auth=False)
        if health.status_code != 200:
            raise PreflightError(f"{self.url} answered {health.status_code} to GET /health: is it a tunewheel gateway? (pass --url)")
        models = self._get("/v1/models")
        if models.status_code == 401:
            if self.api_key is None:
                raise PreflightError(f"the gateway at {self.url} needs an API key: {KEY_HINT}")
            raise PreflightError(f"the gateway at {self.url} refused the API key (401): {KEY_HINT}")
        if models.status_code != 200:
            raise PreflightError(f"the gateway at {self.url} answered {models.status_code} to GET /v1/models: {models.text[:200]}")
        keys_enforced = self.api_key is not None and self._get("/v1/models", auth=False).status_code == 401
        if admin and keys_enforced and self._get("/admin/adapters").status_code == 403:
            raise PreflightError(f"the key is not an admin key of the gateway at {self.url}: the learner scores unpromoted "
                                 "candidates (chat@<version>), which only an admin key may ask for; set TUNEWHEEL_API_KEY "
                                 "(or --api-key) to a key whose hash is in serve.admin_keys")
        ready = self._get("/ready", auth=False)
        if ready.status_code != 200:
            raise PreflightError(f"the gateway at {self.url} is up but its engine is not ready ({ready.status_code}): "
                                 "wait until `tunewheel serve` logs that it is serving, then run this again")
        return [m.get("id") for m in models.json().get("data", [])]

    def serves(self, names: list[str], model: str) -> None:
        """`model` is a name the gateway answers to (an alias, `base`, or `chat@<version>`)."""
        if model not in names and not model.startswith(tuple(f"{n}@" for n in names)):
            raise PreflightError(f"the gateway at {self.url} serves no model named {model!r}; it serves "
                                 f"{', '.join(sorted(names)) or 'nothing yet'} (and <alias>@<version>)")
