# Two commands do all the set-up on a fresh machine; each bootstraps .venv when needed.
PY := .venv/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast bench venv clean

venv:
	@bash scripts/bootstrap.sh

demo: venv  ## profile smollm2-135m on the built-in prompts (super experts, massive activations, sinks)
	$(PY) -m workbench profile smollm2-135m --out runs/demo

test: venv  ## the whole suite, slow tests included (what CI runs; 20-32 min on 2 idle cores after set-up: README)
	.venv/bin/pytest -q

test-fast: venv  ## skip tests marked slow
	.venv/bin/pytest -q -m "not slow"

bench: venv  ## profile pass vs plain forward, nnsight and TransformerLens (10k tokens, ~2 min), then trace hooks alone
	$(PY) bench/profile_overhead.py --model smollm2-135m --tokens 10000 --variants plain,body,profile,nnsight,tl
	$(PY) bench/trace_overhead.py

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
