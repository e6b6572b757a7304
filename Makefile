# metallm — two commands on a fresh machine: `make demo` and `make test`.
#
# The slow step (compiling llama-cpp-python, ~5 min) is done once into a wheel cache outside
# the repo ($(WHEEL_CACHE)) and reused by every later install.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
WHEEL_CACHE ?= $(HOME)/.cache/metallm/wheels
LLAMA_VER   := 0.3.36
LLAMA_WHEEL := $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_VER)-py3-none-linux_x86_64.whl
# A portable build: the default native build dies with SIGILL on CPUs it misdetects.
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
               -DGGML_BMI2=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
               -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
PG_HOST     ?= 127.0.0.1
PG_PORT     ?= 5432
PYTEST_ARGS ?=

.PHONY: demo test install llama-wheel postgres prometheus-bin lint bench clean

demo: install
	@# the local Postgres if this machine has one (started if down); else the demo embeds one
	-@[ ! -d /etc/postgresql ] || $(MAKE) --no-print-directory postgres
	$(BIN)/python -m producers.demo

test: install postgres prometheus-bin
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

llama-wheel: $(LLAMA_WHEEL)

$(LLAMA_WHEEL): | $(VENV)/bin/python
	@mkdir -p $(WHEEL_CACHE)
	@echo "building llama-cpp-python $(LLAMA_VER) once into $(WHEEL_CACHE) (about 5 minutes)"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE)" \
		$(BIN)/pip wheel --no-deps --wheel-dir $(WHEEL_CACHE) llama-cpp-python==$(LLAMA_VER)

$(VENV)/.installed: pyproject.toml $(LLAMA_WHEEL) | $(VENV)/bin/python
	$(BIN)/pip install --find-links $(WHEEL_CACHE) -e '.[local,cloud,demo,dev]'
	@# the embedding model's ONNX exports, once, into ~/.cache/metallm/models (~20 s)
	$(BIN)/python -m service.onnx_export
	@touch $@

postgres:
	@pg_isready -q -h $(PG_HOST) -p $(PG_PORT) || { \
		echo "starting the local Postgres"; \
		pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start; \
		for i in $$(seq 30); do pg_isready -q -h $(PG_HOST) -p $(PG_PORT) && break; sleep 1; done; \
		pg_isready -h $(PG_HOST) -p $(PG_PORT); }

# Debian's prometheus for the dashboard test (tests/test_dashboard.py runs its own server on a
# free port; without one it skips, saying so). Where apt is not at hand, this only says so.
prometheus-bin:
	@command -v prometheus >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		if command -v apt-get >/dev/null; then \
			echo "installing Debian's prometheus (the dashboard test queries a real one)"; \
			$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install \
				-y -qq --no-install-recommends prometheus >/dev/null || \
			echo "could not install prometheus: the dashboard test will skip"; \
		else echo "no prometheus and no apt-get: the dashboard test will skip"; fi; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/policy_speed.py
	$(BIN)/python benchmarks/embedding_backends.py
	$(BIN)/python benchmarks/storage_writes.py
	$(BIN)/python benchmarks/pipeline_throughput.py
	$(BIN)/python benchmarks/faults_report.py
	$(BIN)/python benchmarks/evaluation_gsm8k.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info demo-output
