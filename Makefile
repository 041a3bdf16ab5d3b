# Quick start: `make demo` then `make test`. Both install what is missing first.
PY ?= python3
# The CPU build that these machines keep on local disk; override for a GPU machine, e.g. TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: demo test test-slow install bench-cpu clean

install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	@$(PY) -c "import star_elastic, transformers, safetensors, gguf, accelerate, tqdm, pytest, fastapi, uvicorn, httpx, matplotlib" 2>/dev/null || \
		$(PY) -m pip install -q -e ".[test]"

demo: install
	$(PY) -m star_elastic demo

test: install
	$(PY) -m pytest -q

# Real-model checks (SmolLM2 parity with transformers); a few minutes on a CPU.
test-slow: install
	$(PY) -m pytest -q -m slow

bench-cpu: install
	$(PY) benchmarks/bench_speed.py --tiny

clean:
	rm -rf build *.egg-info .pytest_cache
