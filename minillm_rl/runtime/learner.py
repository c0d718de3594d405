"""The DeepSpeed learner: process-group start-up, the ZeRO engine over the student, data-parallel
MiniLLM rounds, weight export and checkpoints.

The training loops in :mod:`minillm_rl.algorithm.ppo` and :mod:`minillm_rl.algorithm.supervised` only talk to an engine's ``backward`` / ``step``,
so the DeepSpeed engine built here runs the same loss code as the single-process
:class:`~minillm_rl.algorithm.engine.TorchEngine`.

Data parallelism (:func:`minillm_rl.algorithm.ppo.ppo_round`): every rank holds the whole round of rollouts and
draws the same seeded global permutation; a global micro-batch of ``W * m`` rows (``W`` ranks,
micro-batch ``m`` per rank) is split across the ranks, and each rank's token-mean loss is scaled
by ``its valid tokens * W / all valid tokens of the global micro-batch``. DeepSpeed averages the
gradients over the ranks, so each optimizer step follows the gradient of the token mean over the
global micro-batch: ``W`` ranks x micro-batch ``m`` is the same optimisation as 1 rank x ``W * m``.
Advantage whitening is pooled over the same ranks (``group``), so it matches too.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import functools
import json
import os
import random
import socket
import sys
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from minillm_rl.config import OptimConfig
from minillm_rl.algorithm.engine import lr_factor, make_adamw
from minillm_rl.algorithm.ppo import rank_and_world as _rank_and_world

DEFAULT_EXPORT_BUCKET_NUMEL = 50_000_000  # 200 MB of fp32 gathered at a time under ZeRO-3
# DeepSpeed merges client_state into its own checkpoint dict (keys like "global_steps", "module"),
# so the caller's state travels under one key of its own and cannot clobber or be filtered out.
CLIENT_STATE_KEY = "minillm_rl_client_state"

# Used when runtime.deepspeed_config is not set: ZeRO-2 in fp32, which runs on CPU and GPU.
DEFAULT_DS_CONFIG = {"gradient_accumulation_steps": 1, "steps_per_print": 10**9, "wall_clock_breakdown": False,
                     "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}}


# --------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------

# Below Linux's default ephemeral range (32768-60999) and above Ray's worker ports (10002-19999):
# a port the kernel hands out for bind(0) or an outgoing connection (Ray, gloo, other jobs) can be
# taken between the moment it is picked and the moment the rendezvous binds it; one from this range
# is only ever taken by another process that picked it the same way.
RENDEZVOUS_PORT_RANGE = (20000, 32768)


def pick_free_port() -> int:
    """A port on 127.0.0.1 that is free now, for a rendezvous whose ranks start later."""
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(*RENDEZVOUS_PORT_RANGE)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {RENDEZVOUS_PORT_RANGE} after 1000 tries")


def launcher_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables
    that ``environ`` lacks for an ``env://`` rendezvous.

    - ``deepspeed`` launcher and ``torchrun`` set ``RANK`` themselves: nothing to add but defaults.
    - ``srun`` sets ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``; the master is
      ``MASTER_ADDR`` if the batch script exported it, else the node ``srun`` was started from,
      and the port is derived from the job id so concurrent jobs on a node do not collide.
    - No launcher: a world of one; no rendezvous address (:func:`init_distributed` gives it an
      in-process store, so there is no port to pick and none another process can take first).
    """
    added: dict[str, str] = {}
    if "RANK" not in environ and "SLURM_PROCID" in environ:
        for name, slurm_name in (("RANK", "SLURM_PROCID"), ("WORLD_SIZE", "SLURM_NTASKS")):
            if slurm_name not in environ:
                raise ValueError(f"srun launch: {slurm_name} is not set (needed for {name})")
            added[name] = environ[slurm_name]
        added["LOCAL_RANK"] = environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in environ:
            if "SLURM_LAUNCH_NODE_IPADDR" not in environ:
                raise ValueError("srun launch: set MASTER_ADDR (neither it nor SLURM_LAUNCH_NODE_IPADDR is set)")
            added["MASTER_ADDR"] = environ["SLURM_LAUNCH_NODE_IPADDR"]
        if "MASTER_PORT" not in environ:
            added["MASTER_PORT"] = str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    elif "RANK" not in environ:
        added = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    else:
        added["LOCAL_RANK"] = environ.get("LOCAL_RANK", "0")
    merged = {**environ, **added}
    needed = ("RANK", "WORLD_SIZE", "LOCAL_RANK") + (() if _alone(merged) else ("MASTER_PORT",))
    for name in needed:
        value = merged.get(name)
        if value is None or not value.isdigit():
            raise ValueError(f"distributed launch: {name}={value!r}; expected a non-negative integer")
    if int(merged["RANK"]) >= int(merged["WORLD_SIZE"]):
        raise ValueError(f"distributed launch: RANK={merged['RANK']} must be < WORLD_SIZE={merged['WORLD_SIZE']}")
    return {name: value for name, value in added.items() if environ.get(name) != value}


def _alone(environ: Mapping[str, str]) -> bool:
    """A world of one that no launcher gave a rendezvous address."""
    return environ.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in environ


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Join (or create) the learners' process group; returns ``(rank, world_size)``.

    gloo when DeepSpeed's accelerator is the CPU (``DS_ACCELERATOR=cpu``), the accelerator's
    backend (NCCL on CUDA) otherwise. ``timeout_s`` bounds every collective, so a dead rank
    surfaces as an error instead of a hang. Idempotent.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    os.environ.update(launcher_env(os.environ))
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
        if _alone(os.environ):
            # DeepSpeed adopts an initialised group as it is.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   auto_mpi_discovery=False, verbose=False)
        _unlink_shm_workspace()
    return dist.get_rank(), dist.get_world_size()


def _unlink_shm_workspace() -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce workspace, once every rank
    has mapped every other's.

    When all ranks share one machine, DeepSpeed's CPU communication op (``deepspeed_shm_comm_op``,
    built at ``init_distributed``) creates, per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB each in DeepSpeed 0.19) and maps the other ranks' ones, and never unlinks them:
    every local multi-rank run left its buffers in RAM (/dev/shm) until reboot (measured: 266 of them,
    18 GB, after a day of test runs here, until Ray's memory monitor started killing actors). The
    mappings outlive the name, so after a barrier (every rank has opened the others' buffers during
    its ``init_distributed``) each rank unlinks its own: the memory is freed when the last rank
    exits, even a killed one.
    """
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def exit_learner_process(code: int) -> NoReturn:
    """End this process with exit status ``code`` without Python's interpreter finalization.

    For a process that joined the process group (:func:`init_distributed`), once its work is done:
    every collective finished (a final barrier), every file written and closed. The ``atexit``
    handlers still run (Ray, W&B, logging) and the standard streams and C stdio buffers are flushed,
    as on a normal exit; only the finalization that follows them is skipped.

    Why (a torch + CPython interaction; reproduced without this project by
    ``tests/gloo_finalization_abort.py``): the gloo backend runs collectives on worker threads
    (``pt_gloo_runloop``), and a worker releases a finished work only after signalling its
    completion. When Python has already let go of the work's tensors (ZeRO-3 all-gathers, broadcasts:
    about a hundred per rank in a short test run), that release deallocates their Python objects and
    takes the GIL on the worker. The process groups are never destroyed before exit (DeepSpeed keeps
    references; ``destroy_process_group`` only unregisters them), so the workers outlive ``main``. A
    worker descheduled after one of the last collectives can reach that release just as CPython
    3.11 marks itself finalizing: its GIL wait then ends the thread with ``pthread_exit``, the forced
    unwind crosses a ``noexcept`` C++ destructor (``~AsyncWork``), and libstdc++ aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that succeeded. Ending
    with ``os._exit`` leaves no finalization for a worker to collide with.
    """
    atexit._run_exitfuncs()  # what Py_FinalizeEx would run first; the interpreter is still whole here
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader is gone (broken or closed pipe): nothing left to deliver
            pass
    ctypes.CDLL(None).fflush(None)  # text printed by native code (printf) that is still buffered
    os._exit(code)


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------

def resolve_ds_config(ds_config: str | os.PathLike | Mapping[str, Any], optim: OptimConfig,
                      micro_batch_size: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict to train with: the file's ZeRO / precision settings plus the
    recipe's batch size and gradient clipping.

    The recipe owns the batch size, the optimizer and the schedule; a file that states them
    differently is refused rather than silently overridden. Batch keys may be ``"auto"`` (filled
    from the recipe, as the shipped ``ds_configs/`` files do).
    """
    if isinstance(ds_config, Mapping):
        source, config = "ds config dict", copy.deepcopy(dict(ds_config))
    else:
        source = f"ds config {ds_config}"
        try:
            config = json.loads(Path(ds_config).read_text())
        except FileNotFoundError:
            raise ValueError(f"{source}: file not found") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object at the top level, got {type(config).__name__}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"{source}: remove the '{section}' section; the recipe's optim settings define it")
    expected = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
                "train_batch_size": micro_batch_size * world_size}
    for key, value in expected.items():
        if key in config and config[key] not in ("auto", value):
            raise ValueError(
                f"{source}: {key}={config[key]!r} contradicts the recipe (micro-batch {micro_batch_size} per rank, "
                f"{world_size} ranks, one optimizer step per micro-batch): expected {value}"
            )
    if config.get("gradient_clipping", "auto") not in ("auto", float(optim.grad_clip)):
        raise ValueError(
            f"{source}: gradient_clipping={config['gradient_clipping']!r} contradicts optim.grad_clip={optim.grad_clip}"
        )
    config.update(expected)
    config["gradient_clipping"] = float(optim.grad_clip)
    return config


@contextlib.contextmanager
def zero3_construction(ds_config: Mapping[str, Any]) -> Iterator[None]:
    """Under ZeRO-3, ``from_pretrained`` inside this block builds the model already partitioned
    over the ranks (transformers' ``deepspeed.zero.Init`` integration) and loads the checkpoint
    into the partitions, so no rank ever holds the whole model (8 ranks x a 13B fp32 copy would be
    416 GB of host memory per node). Other stages: a no-op. ``ds_config`` must be resolved
    (:func:`resolve_ds_config`)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    # transformers keeps only a weak reference: ZeRO-3 construction lasts while this object lives.
    hf_deepspeed_config = HfDeepSpeedConfig(dict(ds_config))
    try:
        yield
    finally:
        del hf_deepspeed_config


def build_engine(model: torch.nn.Module, ds_config: str | os.PathLike | Mapping[str, Any], optim: OptimConfig,
                 micro_batch_size: int, total_steps: int = 0):
    """``deepspeed.initialize`` over ``model`` with AdamW and the warm-up + constant/cosine
    schedule of :func:`~minillm_rl.algorithm.engine.lr_factor` (the TorchEngine's, step for step).

    torch's fused AdamW (:func:`~minillm_rl.algorithm.engine.make_adamw`, not DeepSpeed's fused/CPU
    Adam) keeps the math identical to the single-process engine and needs no compiled op; configs that offload the optimizer set
    ``zero_force_ds_cpu_optimizer: false`` to allow it. Call :func:`init_distributed` first.
    """
    import deepspeed

    _, world_size = _rank_and_world()
    config = resolve_ds_config(ds_config, optim, micro_batch_size, world_size)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(parameters, optim)
    lr_factor(optim.warmup_steps, optim, total_steps)  # a bad schedule fails here, not mid-run
    schedule = functools.partial(lr_factor, cfg=optim, total_steps=total_steps)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        # DeepSpeed hands the callable its base optimizer, whose param groups carry the lr.
        lr_scheduler=lambda base_optimizer: torch.optim.lr_scheduler.LambdaLR(base_optimizer, schedule),
        config=config,
    )
    return engine


# --------------------------------------------------------------------------------------------
# Weight export and checkpoints
# --------------------------------------------------------------------------------------------

def _parameter_buckets(named_parameters: list[tuple[str, torch.nn.Parameter]],
                       bucket_numel: int) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive groups of at most ``bucket_numel`` elements (a larger tensor goes alone)."""
    bucket, size = [], 0
    for name, param in named_parameters:
        numel = getattr(param, "ds_numel", param.numel())  # ZeRO-3 params are empty until gathered
        if bucket and size + numel > bucket_numel:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, param))
        size += numel
    if bucket:
        yield bucket


def export_student_state(engine, bucket_numel: int = DEFAULT_EXPORT_BUCKET_NUMEL) -> dict[str, torch.Tensor] | None:
    """The student's full state dict as fp32 CPU tensors on rank 0, ``None`` on other ranks.

    Collective under ZeRO-3: every rank must call it. Parameters are gathered ``bucket_numel``
    elements at a time, so peak extra memory is one bucket, not the model. Tied parameters (e.g.
    an LM head sharing the embedding) appear once, under their first name in
    ``named_parameters`` order; loaders re-tie them. These are the weights the forward uses:
    the master weights in fp32 training, the 16-bit compute weights upcast under bf16/fp16.
    """
    import deepspeed

    module = engine.module
    rank, _ = _rank_and_world()
    partitioned = engine.zero_optimization_partition_weights()
    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for bucket in _parameter_buckets(list(module.named_parameters()), bucket_numel):
        params = [param for _, param in bucket]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
            if state is not None:
                for name, param in bucket:
                    state[name] = param.detach().to(device="cpu", dtype=torch.float32, copy=True)
    if state is not None:
        persistent = module.state_dict(keep_vars=True).keys()
        for name, buffer in module.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().to(device="cpu", copy=True)
    return state


def save_checkpoint(engine, directory: str | os.PathLike, tag: str, client_state: dict | None = None) -> None:
    """DeepSpeed's checkpoint (module, optimizer, scheduler, ZeRO partitions) plus ``client_state``
    (step, RNG states, data position, ...). Collective: every rank calls it."""
    engine.save_checkpoint(str(directory), tag=tag, client_state={CLIENT_STATE_KEY: client_state or {}})


def load_checkpoint(engine, directory: str | os.PathLike, tag: str | None = None) -> dict:
    """Restore what :func:`save_checkpoint` wrote (``tag=None``: the latest) into a freshly built
    engine (ZeRO-3 cannot load into an engine that already trained); returns ``client_state``."""
    target = Path(directory) / tag if tag is not None else Path(directory) / "latest"
    if not target.exists():
        raise ValueError(f"load_checkpoint: no checkpoint {target} (expected a directory written by save_checkpoint)")
    path, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"load_checkpoint: DeepSpeed could not load {target}")
    return client_state[CLIENT_STATE_KEY]
