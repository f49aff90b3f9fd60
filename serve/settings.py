"""The top-level settings: the sections each package owns, composed; plus serve's own sections.

    settings = load_settings("tunewheel.toml")   # or load_settings(None) for the defaults

One TOML file plus TUNEWHEEL_* variables, which override the file, nested with a double
underscore (TUNEWHEEL_ENGINE__URL=http://gpu-node:8000, TUNEWHEEL_STORE__URL=postgresql+psycopg://...).
Sections and their owners:
    [serve] [engine]                       serve (this module)
    [store]                                feedback (feedback/settings.py)
    [learn] [learn.*] [restyle]            learn (learn/settings.py)
This module only puts them together and derives the locations under the data dir; a missing
or invalid file is a `ConfigError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from feedback.cli_common import ConfigError
from feedback.settings import StoreSettings
from learn.settings import LearnDirs, LearnSettings, RestyleSettings

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
LORA_RANK_SIZES = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


def hash_key(key: str) -> str:
    """How API keys are stored in config: sha256 hex of the bearer token."""
    return hashlib.sha256(key.encode()).hexdigest()


class AliasSettings(BaseModel):
    """One served name: `chat` by default resolves to the promoted adapter of kind `chat`."""

    adapter: str = Field("prod", description="'prod' (the promoted version), 'base', or a fixed version name.")
    style: str | None = Field(None, description="Restyle every answer of this alias into this style.")


SCOPES = ("chat", "feedback", "metrics", "admin")
Scope = Literal["chat", "feedback", "metrics", "admin"]
API_KEY_SCOPES = ("chat", "feedback")  # what a key in serve.api_keys holds; serve.admin_keys hold every scope
# vLLM's sampling extensions a client may send besides the OpenAI fields (serve.limits.engine_params).
ENGINE_PARAMS = ("top_k", "min_p", "repetition_penalty", "length_penalty", "min_tokens", "ignore_eos",
                 "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
                 "spaces_between_special_tokens", "truncate_prompt_tokens", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar", "structured_outputs", "add_generation_prompt",
                 "continue_final_message")
HASH_HINT = "keys are stored hashed: put sha256 hex here (`tunewheel keys hash KEY` prints it)"


def _check_hash(key: str) -> str:
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise ValueError(HASH_HINT)
    return key


class KeySettings(BaseModel):
    """One bearer key and what it may do: `[[serve.keys]] hash = "<sha256 hex>" scopes = ["chat"]`."""

    model_config = ConfigDict(extra="forbid")

    hash: str = Field(description="sha256 hex of the bearer key (`tunewheel keys hash KEY`).")
    scopes: list[Scope] = Field(default_factory=lambda: list(API_KEY_SCOPES), min_length=1,
                                description="chat (chat completions, the model list), feedback (rate answers), "
                                            "metrics (GET /metrics when serve.metrics_need_key), admin (everything, "
                                            "/admin routes, pinned versions that are not promoted, any answer's feedback).")

    @field_validator("hash")
    @classmethod
    def _hashed(cls, key: str) -> str:
        return _check_hash(key)


class LimitsSettings(BaseModel):
    """`[serve.limits]`: what one request may ask for, and how many a key may send. A request over
    a size limit gets 422 naming the field; over a rate or in-flight limit 429 (per key) or 503
    (the whole gateway), both with Retry-After. Per-key limits apply to keys without the admin
    scope (operators and the learner, which must evaluate at full speed); an open gateway (no
    keys, loopback only) has a single user and only the gateway-wide limits."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens / max_completion_tokens a request may ask for.")
    default_max_tokens: int = Field(512, ge=1, description="max_tokens sent to the engine when the request names none "
                                    "(the engine's own default is the whole context); at most max_tokens.")
    max_prompt_chars: int = Field(32_000, ge=1, description="Characters of all message texts plus the JSON of `tools` "
                                  "and `style_params`.")
    max_messages: int = Field(256, ge=1, description="Messages in one request.")
    max_n: int = Field(4, ge=1, description="Largest `n` (choices per request): each costs a whole generation.")
    max_stop: int = Field(4, ge=0, description="Stop sequences in `stop` (OpenAI's limit is 4), and token ids in "
                          "`stop_token_ids`.")
    max_stop_chars: int = Field(100, ge=1, description="Characters of one stop sequence.")
    max_logit_bias: int = Field(300, ge=0, description="Entries in `logit_bias` (OpenAI's limit is 300).")
    max_grammar_bytes: int = Field(16_384, ge=1, description="Bytes of JSON of each guided-decoding constraint: "
                                   "response_format, guided_json/regex/choice/grammar, structured_outputs.")
    max_json_depth: int = Field(32, ge=4, description="Nesting depth of a request body (objects and arrays).")
    engine_params: list[str] = Field(default_factory=lambda: list(ENGINE_PARAMS),
                                     description="vLLM sampling extensions a request may send besides the OpenAI "
                                                 "fields; any other field is refused (422).")
    max_in_flight: int = Field(128, ge=1, description="Chat requests being answered at once by this gateway process; "
                               "beyond it 503 with Retry-After.")
    max_in_flight_per_key: int = Field(32, ge=1, description="Chat requests being answered at once for one key; "
                                       "beyond it 429 with Retry-After.")
    requests_per_minute: float = Field(600.0, gt=0, description="Per-key token bucket: sustained requests per minute "
                                       "(chat, feedback and the model list together); beyond it 429 with Retry-After.")
    burst: int = Field(100, ge=1, description="Per-key token bucket: requests a key may send at once after a pause.")
    max_feedback_per_completion: int = Field(20, ge=1, description="Ratings one completion may receive (each is kept "
                                             "as history); beyond it 409.")

    @model_validator(mode="after")
    def _default_within_cap(self) -> LimitsSettings:
        if "default_max_tokens" not in self.model_fields_set:
            self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)
        elif self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is over max_tokens ({self.max_tokens})")
        return self


class ServeSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Gateway bind address; with no API keys only loopback is allowed.")
    port: int = Field(8000, description="Gateway port.")
    url: str | None = Field(None, description="The gateway's address as the learner and `tunewheel eval` reach it "
                            "(in compose `http://gateway:8000`); default: from serve.host and serve.port.")
    api_keys: list[str] = Field(default_factory=list, description="sha256 hex of keys with the chat and feedback scopes.")
    admin_keys: list[str] = Field(default_factory=list, description="sha256 hex of keys with every scope (admin routes, "
                                  "pinned unpromoted versions, any completion's feedback).")
    keys: list[KeySettings] = Field(default_factory=list, description="Keys with chosen scopes (`[[serve.keys]]`), "
                                    "besides api_keys and admin_keys.")
    allowed_hosts: list[str] = Field(default_factory=list, description="Host header values the API answers "
                                     "(`example.com`, `*.example.com`, `*`); empty: the loopback names when bound to "
                                     "loopback, any otherwise. Stops DNS rebinding; /health, /ready, /metrics are exempt.")
    metrics_need_key: bool = Field(False, description="GET /metrics needs a key with the metrics (or admin) scope.")
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="Request sizes, rates and requests in flight.")
    max_request_bytes: int = Field(1_000_000, description="Request bodies larger than this get 413.")
    request_timeout_s: float = Field(600.0, description="Timeout of one upstream request to the engine.")
    aliases: dict[str, AliasSettings] = Field(
        default_factory=lambda: {"chat": AliasSettings()},
        description="Served names. `base` and `chat@<version>` always exist besides these.",
    )
    log_queue_size: int = Field(10_000, description="Ignored, kept so older config files load: the turn log is bounded "
                                "in bytes by store.spool.max_bytes.")

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        return [_check_hash(k) for k in keys]

    def key_scopes(self) -> dict[str, frozenset[str]]:
        """key hash -> its scopes, from api_keys, admin_keys and keys together (a key listed twice holds both sets)."""
        scopes: dict[str, set[str]] = {}
        for k in self.api_keys:
            scopes.setdefault(k, set()).update(API_KEY_SCOPES)
        for k in self.admin_keys:
            scopes.setdefault(k, set()).update(SCOPES)
        for key in self.keys:
            scopes.setdefault(key.hash, set()).update(SCOPES if "admin" in key.scopes else key.scopes)
        return {k: frozenset(v) for k, v in scopes.items()}


class EngineSettings(BaseModel):
    url: str | None = Field(None, description="Attach to a running vLLM OpenAI server instead of starting one.")
    urls: list[str] = Field(default_factory=list, description="Attach to several vLLM replicas of the same model: "
                            "the gateway balances requests over the ready ones and loads every adapter version on each "
                            "(serve/pool.py). Use this or `url`, not both.")
    dns: bool = Field(False, description="Treat each engine URL's host name as a set of replicas (a Kubernetes headless "
                      "Service): every address it resolves to is a replica, re-resolved every few seconds.")
    model: str = Field(EMBEDDED_MODEL, description="Base model: the embedded SmolLM2, a Hugging Face id, or a local folder.")
    served_name: str = Field("base", description="Name the engine serves the base model under.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="auto: gpu when the CUDA `vllm` package is installed, else cpu.")
    port: int = Field(8001, description="Loopback port of a child engine.")
    max_model_len: int = Field(2048, description="vLLM --max-model-len.")
    max_loras: int = Field(4, description="vLLM --max-loras: adapters resident at once.")
    max_lora_rank: int | None = Field(None, description="vLLM --max-lora-rank; default: the smallest size vLLM accepts "
                                      "that holds learn.train.rank and every adapter the registry serves (a promoted, fallback or restyler version of a "
                                      "larger rank, trained before the rank was lowered). A larger capacity than the adapters need makes every "
                                      "adapter request slower (measured on CPU: 64 for rank-16 adapters, 0.12x the base speed).")
    grouped_lora: bool = Field(True, description="CPU: apply each LoRA with one matrix product per adapter in the batch "
                               "(serve/lora_ops.py, a vLLM plugin) in place of vLLM's per-token weight gather; false: vLLM's own.")
    dtype: str = Field("auto", description="vLLM --dtype; auto means float32 on CPU (bf16 is off the AVX2 fast path), bfloat16 on GPU.")
    kv_cache_gib: int = Field(1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    cpu_threads_bind: str | None = Field(None, description="VLLM_CPU_OMP_THREADS_BIND; default 0-(ncpu-1).")
    intel_openmp: bool = Field(True, description="CPU, x86-64 Linux: run the engine on Intel's OpenMP runtime (libiomp5 "
                               "from the intel-openmp package, which tunewheel[cpu] installs) in place of GNU's, as vLLM's "
                               "CPU guide advises: it goes in the engine's LD_PRELOAD, and vLLM then binds its threads and "
                               "lets them sleep 5 ms after each step. Measured on 2 cores: 7-17% faster answers. Skipped "
                               "where the library is not installed or LD_PRELOAD already names an OpenMP runtime.")
    gpu_memory_utilization: float = Field(0.85, description="vLLM --gpu-memory-utilization on GPU.")
    prompt_lookup: int = Field(0, ge=0, le=16, description="Speculative decoding by prompt lookup (vLLM's ngram proposer): "
                               "up to this many tokens per step drafted from where the last 4 tokens appear in the prompt, "
                               "checked in one pass; greedy answers stay the same. 0: off. It pays where answers copy their "
                               "prompt and few requests run at once: a restyler's rewrite (4, on 2 CPU cores: 1.7 instead of "
                               "4.4 s per answer); with 8 requests in flight it cost 30-40% throughput on CPU.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM command-line flags.")
    startup_timeout_s: float = Field(300.0, description="How long to wait for the engine's /health.")
    restart_backoff_s: list[float] = Field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 30.0], description="Waits between restarts of a dead engine.")
    nice: int = Field(5, ge=0, le=19, description="Linux nice value of a child engine, and of its session's scheduling group "
                      "where the kernel groups by session (autogroup). Above the gateway's 0, so that on shared cores "
                      "/health, the turn log and the relay keep answering while the engine starts or computes.")

    @model_validator(mode="after")
    def _one_way_to_attach(self) -> EngineSettings:
        if self.url is not None and self.urls:
            raise ValueError("set engine.url (one engine) or engine.urls (several replicas), not both")
        if self.dns and not self.attached:
            raise ValueError("engine.dns needs engine.url or engine.urls: the host name to resolve")
        return self

    @property
    def attached(self) -> bool:
        """The gateway attaches to running engines instead of starting its own child."""
        return self.url is not None or bool(self.urls)

    @property
    def pooled(self) -> bool:
        """Several replicas (urls), or a name to resolve (dns): the gateway's engine pool probes them itself
        (serve/pool.py), instead of an EngineManager supervising one engine."""
        return bool(self.urls) or self.dns

    @property
    def replica_urls(self) -> list[str]:
        """The attached engines' root URLs (without /v1), as configured (before any DNS lookup)."""
        return [re.sub(r"/v1/?$", "", u.rstrip("/")) for u in ([self.url] if self.url else self.urls)]



class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEWHEEL_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(Path(".tunewheel"), description="Model, adapters, SQLite file, datasets, run reports.")
    serve: ServeSettings = Field(default_factory=ServeSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    learn: LearnSettings = Field(default_factory=LearnSettings)
    restyle: RestyleSettings = Field(default_factory=RestyleSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        toml = os.environ.get("_TUNEWHEEL_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # Derived locations, one place for all of them.
    @property
    def store_url(self) -> str:
        return self.store.url_for(self.data_dir)

    @property
    def learn_dirs(self) -> LearnDirs:
        return LearnDirs.under(self.data_dir)

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "models" / "SmolLM2-135M-Instruct"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def gateway_url(self) -> str:
        """Where the learner and `tunewheel eval` reach the gateway: serve.url, else from host and port."""
        if self.serve.url:
            return self.serve.url.rstrip("/")
        host = "127.0.0.1" if self.serve.host in ("0.0.0.0", "::") else self.serve.host
        return f"http://{host}:{self.serve.port}"

    def curation(self, max_tokens: int | None = None):
        """feedback.curate.CurationConfig from the learner's section (token limit, PII, held-out share)."""
        return self.learn.curation(max_tokens)

    @property
    def lora_capacity(self) -> int:
        """The engine's --max-lora-rank: engine.max_lora_rank, or the smallest size vLLM accepts that
        holds the adapters this learner trains (learn.train.rank). `tunewheel serve` sizes its engine
        with `lora_capacity_for` the registry's adapters and keeps the result in engine.max_lora_rank."""
        return self.lora_capacity_for(None)

    def lora_capacity_for(self, served_rank: int | None) -> int:
        """engine.max_lora_rank, or the smallest size vLLM accepts that holds both learn.train.rank and
        `served_rank`, the largest rank the registry may serve (learn/promotion.py served_rank)."""
        if self.engine.max_lora_rank is not None:
            return self.engine.max_lora_rank
        need = max(self.learn.train.rank, served_rank or 0)
        return next((r for r in LORA_RANK_SIZES if r >= need), LORA_RANK_SIZES[-1])

    @property
    def seed_files(self) -> list[str]:
        """The operator's seed datasets added to every snapshot (learn.seed_files)."""
        return list(self.learn.seed_files)

    def base_model_path(self) -> str:
        """The model the engine and the trainer load: the prepared embedded folder or the configured one."""
        return str(self.model_dir) if self.engine.model == EMBEDDED_MODEL else self.engine.model


def load_settings(path: str | Path | None = None, **overrides) -> Settings:
    """Settings from a TOML file (optional) and the environment. A missing or invalid file is a
    ConfigError whose one-line message names the file and what is wrong with it."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path is not None:
        os.environ["_TUNEWHEEL_CONFIG_FILE"] = str(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        where = f"config file {path}" if path is not None else "settings (TUNEWHEEL_* environment)"
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: {problems}") from None
    except ValueError as exc:  # the TOML itself does not parse
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    finally:
        os.environ.pop("_TUNEWHEEL_CONFIG_FILE", None)
