"""``minillm-rl plan``: the resolved plan of one or more recipes run in order (e.g. teacher SFT,
then student SFT + MiniLLM, then evaluation of ``best/``), without GPUs and without weights.

For every stage it gives the processes and GPUs of each role (learner ranks, rollout workers),
a memory estimate per GPU, and the exact commands; ``--execute`` (``make train-opt13b``) runs
those same commands, so what is printed is what runs.

Placement: learner ranks take the first GPUs of the hosts in order (``deepspeed --include``), the
rollout workers the remaining ones (each host's Ray node is started with
``CUDA_VISIBLE_DEVICES`` = its rollout GPUs), so the two sets are disjoint by construction. Every
host of a stage with rollout workers runs a Ray node (with 0 GPUs where it has no rollout GPU):
a Ray driver (learner rank 0) needs a Ray node on its own host.

Parameter counts are exact: the model is built on the ``meta`` device (no memory, no weights)
from its ``config.json`` -- a local model directory's, or ``launch/model_configs/<name>.json``
for a hub name (``facebook/opt-13b`` -> ``opt-13b.json``).

Longer than ~400 lines because the plan is one computation (placement, memory per role, the
commands that --execute runs) whose parts use each other's numbers; it is read top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minillm_rl.config import PHASES_USING_TEACHER, RunConfig, load_config
from minillm_rl.models import declared_logit_transform, resolve_teacher_dist

GIB = 2**30
RAY_PORT = 6379
MASTER_PORT = 29500
DEFAULT_MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "launch" / "model_configs"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DS_SUB_GROUP_SIZE_DEFAULT = 1_000_000_000  # DeepSpeed's zero_optimization.sub_group_size default


# --------------------------------------------------------------------------------------------
# Model sizes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelStats:
    """What the memory formulas need of a model. ``largest_layer_params``: the most parameters any
    one module holds directly (DeepSpeed's ``model_to_params`` definition); ``kv_width``: key
    (= value) features per token per layer, ``num_key_value_heads * head_dim``; ``head_width``:
    the LM head's input features ``d`` (its weight is ``vocab_size x d``), ``head_bias`` whether it
    has a bias; ``logit_transform``: a config field that transforms the logits after the head."""

    source: str
    config_file: str
    num_params: int
    largest_layer_params: int
    num_layers: int
    kv_width: int
    vocab_size: int
    head_width: int
    head_bias: bool
    logit_transform: str | None


def find_model_config(source: str, model_configs: Path = DEFAULT_MODEL_CONFIGS) -> Path:
    """The ``config.json`` describing ``source``: the model directory's own, else
    ``model_configs/<name>.json`` for the last component of ``source`` that names one
    (``facebook/opt-13b`` -> ``opt-13b.json``; a directory a later stage will write, such as
    ``runs/teacher-sft/opt-13b/best``, -> ``opt-13b.json``)."""
    local = Path(source) / "config.json"
    if local.is_file():
        return local
    for part in reversed(Path(source).parts):
        shipped = Path(model_configs) / f"{part.lower()}.json"
        if shipped.is_file():
            return shipped
    raise ValueError(f"model {source!r}: no {local}, and no part of the name has a config in {model_configs}; "
                     f"put the model's HF config.json there as <name>.json to plan without downloading it")


def model_stats(source: str, config_file: Path) -> ModelStats:
    """Exact parameter counts of the model ``config_file`` describes, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(config_file))
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file}: not a usable HF config.json ({err})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_params = sum(p.numel() for p in model.parameters())  # a tied parameter counts once
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lm_head = model.get_output_embeddings()
    return ModelStats(source, str(config_file), num_params, largest, config.num_hidden_layers,
                      kv_heads * head_dim, config.vocab_size, lm_head.weight.shape[1],
                      getattr(lm_head, "bias", None) is not None, declared_logit_transform(config))


# --------------------------------------------------------------------------------------------
# Memory formulas (bytes; pure)
# --------------------------------------------------------------------------------------------

def zero_model_state_bytes(stage: int, num_params: int, largest_layer_params: int, world_size: int,
                           mixed_precision: bool = True, offload_optimizer: bool = False,
                           offload_params: bool = False,
                           sub_group_size: int = DS_SUB_GROUP_SIZE_DEFAULT) -> dict[str, int]:
    """Model states (weights, gradients, Adam) of one learner rank under ZeRO ``stage`` (0-3).

    Per parameter, mixed precision (bf16/fp16 with fp32 master weights): 16-bit weights 2 bytes
    (partitioned over the ``world_size`` ranks from stage 3), 16-bit gradients 2 (from stage 2),
    fp32 master weights 4 and Adam moments 8 (from stage 1), and the fp32 gradient the optimizer
    step reads, 4 (from stage 1). Under ZeRO-3 that last one is made one optimizer sub-group at a
    time, so it is ``4 * min(P/N, sub_group_size)``, and the largest layer's 16-bit weights and
    gradients are gathered whole while it runs: ``+ 4 * largest_layer``. fp32 training: weights 4,
    gradients 4, Adam 8, no master copy and no extra fp32 gradient; the gathered layer costs 8.
    Offload moves the partitioned optimizer side (``offload_optimizer``) and weights
    (``offload_params``) to CPU memory (``cpu`` = this rank's share).

    So ZeRO-2 mixed = ``2P + 18P/N`` and ZeRO-3 ~ ``16P/N + 4 min(P/N, sub_group) + 4L`` (DeepSpeed's
    estimators: ``2P + 18P/N`` and ``18P/N + 4L``). Not counted: activations, communication
    buckets, prefetched layers beyond the largest, allocator fragmentation.

    Returns:
        ``{"gpu": bytes, "cpu": bytes}`` per rank.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shard = num_params / world_size
    weight, grad, optimizer = (2, 2, 12) if mixed_precision else (4, 4, 8)
    step_grad = 4 if mixed_precision else 0
    weights = weight * (shard if stage >= 3 else num_params)
    grads = grad * (shard if stage >= 2 else num_params)
    optimizer_states = optimizer * (shard if stage >= 1 else num_params)
    if stage >= 3:
        step_grads = step_grad * min(shard, sub_group_size)
        gathered = (weight + grad) * largest_layer_params
    else:
        step_grads = step_grad * (shard if stage >= 1 else num_params)
        gathered = 0
    cpu = 0
    if offload_optimizer:
        cpu += optimizer_states + step_grads + (grads if stage >= 2 else 0)
        optimizer_states = step_grads = 0
        grads = grads if stage < 2 else 0
    if offload_params and stage >= 3:
        cpu, weights = cpu + weights, 0
    return {"gpu": int(weights + grads + optimizer_states + step_grads + gathered), "cpu": int(cpu)}


def kv_cache_bytes(model: ModelStats, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``seq_len`` tokens:
    ``2 * layers * kv_width * batch * seq_len * dtype_bytes``."""
    return 2 * model.num_layers * model.kv_width * batch * seq_len * dtype_bytes


TEACHER_SIGNAL_MODES = ("exact", "hidden", "topk")


def teacher_signal_bytes(cfg: RunConfig, mode: str, teacher: ModelStats, batch: int) -> int:
    """The teacher signal ``batch`` rollouts carry over ``max_new_tokens`` positions in ``mode``:
    the full-vocabulary log-probs (``exact``: ``V`` values), the final hidden states (``hidden``:
    ``d`` values), or top-K values + int64 ids + the tail mass (``topk``); values in
    ``sampling.teacher_dist_dtype``. The PT term's and KD's teacher scores scale the same way."""
    sampling = cfg.sampling
    value = DTYPE_BYTES[sampling.teacher_dist_dtype]
    per_position = {"exact": teacher.vocab_size * value, "hidden": teacher.head_width * value,
                    "topk": sampling.teacher_topk * (value + 8) + 4, "none": 0}[mode]
    return batch * sampling.max_new_tokens * per_position


def rollout_forwards(alpha: float, new_tokens: int, mixing: str) -> dict[str, float]:
    """Expected forward calls of each model per rollout batch of ``new_tokens``-token responses.

    ``lazy`` (a shared coin per position picks the model that runs; the other catches up in one
    forward after the last token unless it drew that token): teacher ``alpha T + 1 - alpha``,
    student ``(1 - alpha) T + alpha``. ``every_step``: the student ``T``, the teacher ``T`` when
    ``alpha > 0`` (else one scoring forward)."""
    if mixing == "lazy":
        return {"teacher": alpha * new_tokens + 1 - alpha, "student": (1 - alpha) * new_tokens + alpha}
    return {"teacher": float(new_tokens if alpha > 0 else 1), "student": float(new_tokens)}


def rollout_cost(cfg: RunConfig, teacher: ModelStats, student: ModelStats) -> dict[str, Any]:
    """The decode cost model of one rollout batch: each model's expected forwards under
    ``sampling.mixing`` and under every-step mixing, and the weight bytes they read (decoding is
    bound by reading the weights on a GPU: a forward over a few new positions costs about one)."""
    sampling, dtype = cfg.sampling, DTYPE_BYTES[cfg.model.dtype]

    def weight_bytes(calls: dict[str, float]) -> int:
        return int((calls["teacher"] * teacher.num_params + calls["student"] * student.num_params) * dtype)

    forwards = {mixing: rollout_forwards(sampling.alpha, sampling.max_new_tokens, mixing)
                for mixing in ("lazy", "every_step")}
    return {"mixing": sampling.mixing, "alpha": sampling.alpha, "new_tokens": sampling.max_new_tokens,
            "forwards": forwards, "weight_bytes": {mixing: weight_bytes(calls) for mixing, calls in forwards.items()}}


def teacher_head_bytes(teacher: ModelStats) -> int:
    """The frozen teacher LM head a learner rank holds in ``hidden`` mode: ``4 (V d + V)`` (fp32)."""
    return 4 * teacher.vocab_size * (teacher.head_width + teacher.head_bias)


def rollout_worker_bytes(cfg: RunConfig, teacher: ModelStats, student: ModelStats, batch: int,
                         mode: str) -> dict[str, int]:
    """GPU memory of one rollout worker: teacher and student weights in ``model.dtype``, both KV
    caches for ``batch`` sequences of ``max_prompt_tokens + max_new_tokens``, and the teacher
    signal (``mode``, resolved) recorded for the batch. Not counted: per-step logits (``3 * batch
    * vocab`` fp32)."""
    dtype = DTYPE_BYTES[cfg.model.dtype]
    seq_len = cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens
    parts = {
        "teacher_weights": teacher.num_params * dtype,
        "student_weights": student.num_params * dtype,
        "teacher_kv_cache": kv_cache_bytes(teacher, batch, seq_len, dtype),
        "student_kv_cache": kv_cache_bytes(student, batch, seq_len, dtype),
        "teacher_signal": teacher_signal_bytes(cfg, mode, teacher, batch),
    }
    return {**parts, "total": sum(parts.values())}


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """Hosts and their GPU slots (0 slots = CPU only); from a DeepSpeed hostfile or placeholders."""

    hosts: tuple[tuple[str, int], ...]
    hostfile: str | None = None

    @property
    def num_gpus(self) -> int:
        return sum(slots for _, slots in self.hosts)


def read_hostfile(path: str) -> Cluster:
    """A DeepSpeed hostfile: ``host slots=N`` per line, ``#`` comments."""
    hosts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the hostfile ({err.strerror})") from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        if len(fields) != 2 or not fields[1].startswith("slots=") or not fields[1][6:].isdigit():
            raise ValueError(f"{path}:{number}: expected 'HOST slots=N', got {line.strip()!r}")
        hosts.append((fields[0], int(fields[1][6:])))
    if not hosts:
        raise ValueError(f"{path}: no 'HOST slots=N' line")
    return Cluster(tuple(hosts), hostfile=path)


def placeholder_cluster(nodes: int, gpus_per_node: int) -> Cluster:
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {nodes} and {gpus_per_node}")
    names = ["localhost"] if nodes == 1 else [f"node{i}" for i in range(nodes)]
    return Cluster(tuple((name, gpus_per_node) for name in names))


def place_roles(cluster: Cluster, num_learners: int, num_workers: int,
                worker_gpus: float) -> tuple[list[tuple[str, int]], list[list[tuple[str, int]]]]:
    """``(learner_gpus, worker_gpus)``: ``[(host, gpu), ...]`` of the learner ranks (the first GPUs
    of the hosts in order) and, per rollout worker, its ``worker_gpus`` GPUs on one host, taken from
    the rest (empty lists for CPU workers). A fraction packs ``floor(1 / worker_gpus)`` workers on
    each GPU, as Ray does (their groups repeat the GPU). On a CPU cluster (no slots) both are empty."""
    if cluster.num_gpus == 0:
        return [], [[] for _ in range(num_workers)]
    free = [(host, gpu) for host, slots in cluster.hosts for gpu in range(slots)]
    if num_learners > len(free):
        raise ValueError(f"runtime.num_learners={num_learners} learner ranks need {num_learners} GPUs; "
                         f"the cluster has {len(free)}")
    learners, by_host = free[:num_learners], {}
    for host, gpu in free[num_learners:]:
        by_host.setdefault(host, []).append(gpu)
    groups = [] if worker_gpus else [[] for _ in range(num_workers)]
    span, per_gpu = (1, math.floor(1 / worker_gpus + 1e-9)) if 0 < worker_gpus < 1 else (int(worker_gpus), 1)
    for host, gpus in by_host.items() if worker_gpus else ():
        for start in range(0, len(gpus) - span + 1, span):
            groups += [[(host, gpu) for gpu in gpus[start : start + span]]] * per_gpu
    if len(groups) < num_workers:
        raise ValueError(f"runtime.num_rollout_workers={num_workers} x runtime.worker_gpus={worker_gpus:g} GPUs do "
                         f"not fit on the {cluster.num_gpus - num_learners} GPUs left after {num_learners} learners")
    return learners, groups[:num_workers]


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------

def _global_batches(cfg: RunConfig) -> dict[str, tuple[int, Any]]:
    """``{phase: (rows per optimizer step over all ranks, optim section)}`` of the phases that run."""
    return {phase: ((cfg.train.micro_batch_size, cfg.train.optim) if phase == "minillm"
                    else (cfg.sft.batch_size, cfg.sft.optim)) for phase in cfg.train.phases}


def resolved_ds_configs(cfg: RunConfig, world_size: int) -> dict[str, dict[str, Any]]:
    """The DeepSpeed config each phase's learners will build (the learner's own resolution), so a
    world size the batches cannot be split over, or a contradicting file, is refused here."""
    from minillm_rl.runtime.learner import DEFAULT_DS_CONFIG, resolve_ds_config

    if "minillm" in cfg.train.phases:
        cfg.check_world_size(world_size)
    resolved = {}
    for phase, (batch, optim) in _global_batches(cfg).items():
        if batch % world_size:
            dotted = "train.micro_batch_size" if phase == "minillm" else "sft.batch_size"
            raise ValueError(f"{dotted}={batch} must be a multiple of runtime.num_learners ({world_size}); "
                             f"it counts rows over all ranks")
        resolved[phase] = resolve_ds_config(cfg.runtime.deepspeed_config or DEFAULT_DS_CONFIG, optim,
                                            batch // world_size, world_size)
    return resolved


def _learner_memory(ds_config: dict[str, Any], student: ModelStats, world_size: int) -> dict[str, Any]:
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    mixed = any(ds_config.get(key, {}).get("enabled", False) for key in ("bf16", "fp16"))
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_params = zero.get("offload_param", {}).get("device", "none") == "cpu"
    states = zero_model_state_bytes(stage, student.num_params, student.largest_layer_params, world_size, mixed,
                                    offload_optimizer, offload_params,
                                    int(zero.get("sub_group_size", DS_SUB_GROUP_SIZE_DEFAULT)))
    precision = "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp16" if mixed else "fp32"
    return {"zero_stage": stage, "precision": precision, "offload_optimizer": offload_optimizer,
            "offload_params": offload_params, "model_state_bytes_per_gpu": states["gpu"],
            "model_state_cpu_bytes_per_rank": states["cpu"]}


def _command(host: str, argv: list[str], env: dict[str, str] | None = None, cleanup: bool = False) -> dict[str, Any]:
    """One command of a stage, run on ``host``; ``cleanup`` commands run even after a failure."""
    return {"host": host, "env": env or {}, "argv": argv, "cleanup": cleanup}


def _train_commands(recipe: str, overrides: list[str], cluster: Cluster, learners: list[tuple[str, int]],
                    workers: list[list[tuple[str, int]]]) -> list[dict[str, Any]]:
    train = ["train", "--config", recipe, *overrides]
    if cluster.num_gpus == 0:
        if len(cluster.hosts) > 1:
            raise ValueError("plan: a CPU run (0 GPUs per node) is planned on one node; for several CPU nodes "
                             "use the deepspeed launcher scripts in launch/")
        return [_command(cluster.hosts[0][0], ["minillm-rl", *train], {"DS_ACCELERATOR": "cpu"})]
    learner_hosts = list(dict.fromkeys(host for host, _ in learners))
    include = "@".join(f"{host}:{','.join(str(g) for h, g in learners if h == host)}" for host in learner_hosts)
    launcher = ["deepspeed", *(["--hostfile", cluster.hostfile] if cluster.hostfile else []), "--include", include,
                "--master_addr", learner_hosts[0], "--master_port", str(MASTER_PORT), "--module", "minillm_rl.cli"]
    if not workers:
        return [_command(learner_hosts[0], [*launcher, *train])]
    worker_gpus = {host: [] for host in learner_hosts}
    for group in workers:
        for host, gpu in group:
            if gpu not in worker_gpus.setdefault(host, []):  # workers sharing a GPU (a fraction each)
                worker_gpus[host].append(gpu)
    head = learner_hosts[0]
    address = f"{head}:{RAY_PORT}"
    commands = []
    for host, gpus in worker_gpus.items():
        start = ["start-head"] if host == head else ["start-worker", address]
        commands.append(_command(host, ["launch/ray_cluster.sh", *start, "--num-gpus", str(len(gpus))],
                                 {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "RAY_PORT": str(RAY_PORT)}))
    commands.append(_command(head, ["launch/ray_cluster.sh", "wait", str(len(worker_gpus)), address]))
    commands.append(_command(head, [*launcher, *train, f"runtime.ray_address={address}"]))
    commands += [_command(host, ["launch/ray_cluster.sh", "stop"], {"RAY_PORT": str(RAY_PORT)}, cleanup=True)
                 for host in reversed(list(worker_gpus))]
    return commands


def _train_stage(recipe: str, overrides: list[str], cluster: Cluster, stats_of) -> dict[str, Any]:
    cfg = load_config(recipe, overrides)
    runtime = cfg.runtime
    uses_teacher = any(phase in PHASES_USING_TEACHER for phase in cfg.train.phases)
    num_workers = runtime.num_rollout_workers if uses_teacher else 0
    world = runtime.num_learners
    ds_configs = resolved_ds_configs(cfg, world)
    learners, workers = place_roles(cluster, world, num_workers, runtime.worker_gpus if cluster.num_gpus else 0)
    student = stats_of(cfg.model.student)
    memory = {"learner": {phase: _learner_memory(ds, student, world) for phase, ds in ds_configs.items()},
              "rank0_eval_copy_cpu_bytes": student.num_params * DTYPE_BYTES[cfg.model.dtype]}
    notes = []
    ranks_per_node = max([sum(1 for h, _ in learners if h == host) for host, _ in cluster.hosts] + [1])
    memory["learner_load_cpu_bytes_per_node"] = ranks_per_node * student.num_params * 4
    if uses_teacher:
        teacher = stats_of(cfg.model.teacher)
        batch = math.ceil(cfg.train.num_rollouts / num_workers)
        try:
            mode = resolve_teacher_dist(cfg.sampling.teacher_dist, teacher.logit_transform)
        except ValueError as err:
            raise ValueError(f"{recipe}: {err}") from None
        rollout = rollout_cost(cfg, teacher, student)
        memory["rollout_worker"] = {"rollout_batch": batch,
                                    "seq_len": cfg.data.max_prompt_tokens + cfg.sampling.max_new_tokens,
                                    "dtype": cfg.model.dtype,
                                    "bytes": rollout_worker_bytes(cfg, teacher, student, batch, mode)}
        head = teacher_head_bytes(teacher) if mode == "hidden" else 0
        memory["teacher_signal"] = {
            "mode": mode, "dtype": cfg.sampling.teacher_dist_dtype, "hidden_width": teacher.head_width,
            "bytes_per_round": {m: teacher_signal_bytes(cfg, m, teacher, cfg.train.num_rollouts)
                                for m in TEACHER_SIGNAL_MODES},
            "learner_teacher_head_bytes": head}
        for phase, learner in memory["learner"].items():
            learner["teacher_head_bytes_per_gpu"] = head if phase in ("minillm", "kd") else 0
        if cluster.num_gpus and not runtime.worker_gpus:
            notes.append("runtime.worker_gpus is 0: the rollout workers (teacher + student copy) run on CPU")
        if cluster.num_gpus and 0 < runtime.worker_gpus < 1:
            notes.append(f"runtime.worker_gpus={runtime.worker_gpus:g}: Ray packs up to "
                         f"{math.floor(1 / runtime.worker_gpus + 1e-9)} rollout workers on one GPU; their memory "
                         f"adds up (that many times the per-worker estimate)")
    output = Path(cfg.output.dir)
    return {
        "name": f"train {Path(recipe).stem}", "kind": "train", "recipe": recipe, "overrides": list(overrides),
        "phases": list(cfg.train.phases), "output_dir": str(output),
        "models": {"student": dataclasses.asdict(student),
                   **({"teacher": dataclasses.asdict(stats_of(cfg.model.teacher))} if uses_teacher else {})},
        "roles": {
            "learners": {"world_size": world, "nodes": len({h for h, _ in learners}) or 1,
                         "gpus": [list(slot) for slot in learners],
                         "deepspeed_config": runtime.deepspeed_config or "built-in ZeRO-2 fp32"},
            "rollout_workers": {"count": num_workers, "gpus_each": runtime.worker_gpus if cluster.num_gpus else 0,
                                "gpus": [[list(slot) for slot in group] for group in workers]},
        },
        "memory": memory, "notes": notes,
        **({"rollout_cost": rollout} if uses_teacher else {}),
        "produces": {str(output / "best"): cfg.model.student, str(output / "sft_best_loss"): cfg.model.student},
        "commands": _train_commands(recipe, list(overrides), cluster, learners, workers),
        "config": cfg,
    }


def _eval_stage(train_stage: dict[str, Any], data: str | None, split: str, cluster: Cluster) -> dict[str, Any]:
    cfg: RunConfig = train_stage["config"]
    model = str(Path(cfg.output.dir) / "best")
    seeds = [str(10 * (i + 1)) for i in range(cfg.eval.test_seeds)]
    argv = ["minillm-rl", "eval", "--model", model, "--data", data or cfg.data.train, "--split", split,
            "--out", str(Path(cfg.output.dir) / "test"), "--template", cfg.data.template,
            "--max-prompt-tokens", str(cfg.data.max_prompt_tokens), "--max-new-tokens", str(cfg.eval.max_new_tokens),
            "--no-repeat-ngram-size", str(cfg.eval.no_repeat_ngram_size), "--seeds", *seeds,
            "--dtype", cfg.model.dtype, "--device", "cuda" if cluster.num_gpus else "cpu"]
    return {"name": f"eval {model}", "kind": "eval", "model": model, "data": data or cfg.data.train, "split": split,
            "commands": [_command(cluster.hosts[0][0], argv)]}


def build_plan(recipes: list[str], overrides: list[str], cluster: Cluster, eval_split: str | None = None,
               eval_data: str | None = None, model_configs: Path = DEFAULT_MODEL_CONFIGS) -> dict[str, Any]:
    """The plan of ``recipes`` run in order (``overrides`` apply to the last one), then, with
    ``eval_split``, the test evaluation of the last recipe's ``best/``. A model a stage reads from
    an earlier stage's output (e.g. the SFT'd teacher's ``best/``) is sized as that stage's model."""
    if not recipes:
        raise ValueError("plan: give at least one --config RECIPE")
    produced: dict[str, str] = {}
    cache: dict[str, ModelStats] = {}

    def stats_of(source: str) -> ModelStats:
        origin = produced.get(os.path.normpath(source), source)
        if origin not in cache:
            cache[origin] = model_stats(origin, find_model_config(origin, model_configs))
        return dataclasses.replace(cache[origin], source=source)

    stages = []
    for index, recipe in enumerate(recipes):
        stage = _train_stage(recipe, overrides if index == len(recipes) - 1 else [], cluster, stats_of)
        produced.update({os.path.normpath(path): origin for path, origin in stage.pop("produces").items()})
        stages.append(stage)
    if eval_split is not None:
        stages.append(_eval_stage(stages[-1], eval_data, eval_split, cluster))
    for stage in stages:
        stage.pop("config", None)
    return {"cluster": {"hosts": [list(host) for host in cluster.hosts], "hostfile": cluster.hostfile,
                        "num_gpus": cluster.num_gpus},
            "stages": stages}


# --------------------------------------------------------------------------------------------
# Output and execution
# --------------------------------------------------------------------------------------------

def command_text(command: dict[str, Any]) -> str:
    env = " ".join(f"{key}={shlex.quote(value)}" for key, value in command["env"].items())
    return (env + " " if env else "") + shlex.join(command["argv"])


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB"


def render_text(plan: dict[str, Any]) -> str:
    """The plan for people: roles, memory per GPU (with the formulas), commands."""
    cluster = plan["cluster"]
    hosts = ", ".join(f"{host} ({slots} GPUs)" for host, slots in cluster["hosts"])
    lines = [f"cluster: {hosts}; hostfile: {cluster['hostfile'] or 'none (host names are placeholders)'}"]
    for number, stage in enumerate(plan["stages"], 1):
        lines += ["", f"stage {number}: {stage['name']}"]
        if stage["kind"] == "train":
            roles, memory = stage["roles"], stage["memory"]
            learners, workers = roles["learners"], roles["rollout_workers"]
            lines.append(f"  phases {', '.join(stage['phases'])} -> {stage['output_dir']}/best")
            on_gpus = bool(_slots(learners["gpus"]))
            device = "GPU" if on_gpus else "rank"  # no GPU: each learner rank holds its share in host RAM
            lines.append(f"  learners: {learners['world_size']} ranks on {learners['nodes']} node(s), "
                         + (f"GPUs {_slots(learners['gpus'])}" if on_gpus else "on CPU")
                         + f"; {learners['deepspeed_config']}")
            for phase, mem in memory["learner"].items():
                offload = " + CPU offload" if mem["offload_optimizer"] or mem["offload_params"] else ""
                lines.append(f"    {phase}: ZeRO-{mem['zero_stage']} {mem['precision']}{offload}: model states "
                             f"{_gib(mem['model_state_bytes_per_gpu'])}/{device}"
                             + (f", {_gib(mem['model_state_cpu_bytes_per_rank'])} CPU/rank" if offload else "")
                             + f" (P = {stage['models']['student']['num_params']:,} params, "
                             f"largest layer {stage['models']['student']['largest_layer_params']:,})"
                             + (f" + teacher LM head {_gib(mem['teacher_head_bytes_per_gpu'])}/{device} (fp32)"
                                if mem.get("teacher_head_bytes_per_gpu") else ""))
            if workers["count"]:
                shared = {tuple(slot) for group in workers["gpus"] for slot in group}  # a fraction shares GPUs
                lines.append(f"  rollout workers: {workers['count']} x {workers['gpus_each']:g} GPU(s), GPUs "
                             f"{_slots(sorted(shared)) or 'none (CPU)'}")
                worker = memory["rollout_worker"]
                parts = ", ".join(f"{key} {_gib(value)}" for key, value in worker["bytes"].items() if key != "total")
                lines.append(f"    per worker ({worker['dtype']}, batch {worker['rollout_batch']} x "
                             f"{worker['seq_len']} tokens): {_gib(worker['bytes']['total'])} = {parts}")
                signal = memory["teacher_signal"]
                per_round = ", ".join(f"{mode} {value / GIB:.2f} GiB" for mode, value
                                      in signal["bytes_per_round"].items() if mode != signal["mode"])
                cost = stage["rollout_cost"]
                mine, every = cost["forwards"][cost["mixing"]], cost["forwards"]["every_step"]
                saving = cost["weight_bytes"]["every_step"] / cost["weight_bytes"][cost["mixing"]]
                lines.append(f"  rollout decode, {cost['mixing']} mixing cost model (sampling.mixing; alpha "
                             f"{cost['alpha']:g}, {cost['new_tokens']} new tokens): per rollout batch "
                             f"{mine['teacher']:.1f} teacher + {mine['student']:.1f} student forwards (every step: "
                             f"{every['teacher']:.0f} + {every['student']:.0f}); weights read "
                             f"{_gib(cost['weight_bytes'][cost['mixing']])} per batch, {saving:.2f} x fewer than "
                             f"every step")
                lines.append(f"  teacher signal: {signal['mode']} ({signal['dtype']}; hidden states are "
                             f"{signal['hidden_width']} wide): {signal['bytes_per_round'][signal['mode']] / GIB:.2f} "
                             f"GiB per round of full-length responses to the learners (other modes: {per_round})")
            lines.append(f"  host RAM at start-up: every learner rank loads the student in fp32 before DeepSpeed "
                         f"partitions it: {_gib(memory['learner_load_cpu_bytes_per_node'])} per node")
            lines.append("  rank 0 CPU copy of the student (weight sync, best/, validation): "
                         f"{_gib(memory['rank0_eval_copy_cpu_bytes'])}")
            lines.extend(f"  note: {note}" for note in stage["notes"])
        lines.append("  commands:")
        lines.extend(f"    [{command['host']}] {command_text(command)}" for command in stage["commands"])
    lines += ["", "formulas (bytes): learner model states per GPU, mixed precision: ZeRO-1 4P + 16P/N; ZeRO-2 "
              "2P + 18P/N; ZeRO-3 16P/N + 4 min(P/N, sub_group_size) + 4L (N learner ranks, L largest layer); "
              "fp32: ZeRO-2 4P + 12P/N, ZeRO-3 16P/N + 8L; activations not included.",
              "rollout worker: (P_teacher + P_student) x dtype + 2 x layers x kv_width x batch x "
              "(max_prompt_tokens + max_new_tokens) x dtype per model + batch x max_new_tokens x S, the teacher "
              "signal per position: S = vocab x t (exact), d x t (hidden; d = the LM head's input width), "
              "K x (t + 8) + 4 (topk), t = teacher_dist_dtype bytes.",
              "rollout decode per batch of T = max_new_tokens tokens (memory-bound: a forward reads every weight "
              "once, over one or a few new positions): lazy mixing runs the teacher alpha T + 1 - alpha times and "
              "the student (1 - alpha) T + alpha times, every-step mixing both T times; weights read = sum of "
              "forwards x P x dtype.",
              "teacher signal per round: num_rollouts x max_new_tokens x S; in hidden mode each minillm/kd learner "
              "rank also holds the teacher LM head, 4 x vocab x (d + bias) bytes."]
    return "\n".join(lines)


def _slots(slots: list[list]) -> str:
    by_host: dict[str, list[str]] = {}
    for host, gpu in slots:
        by_host.setdefault(host, []).append(str(gpu))
    return "; ".join(f"{host}:{','.join(gpus)}" for host, gpus in by_host.items())


def _local_host(name: str, first_host: str) -> bool:
    return name in ("localhost", first_host, socket.gethostname(), socket.gethostname().split(".")[0])


def execute(plan: dict[str, Any], log_dir: str | os.PathLike) -> None:
    """Run the plan's commands in order on the cluster's first host (this machine; others over
    ``ssh``, output to ``log_dir``). A failing command stops the plan (after its stage's cleanup
    commands) with a one-line :class:`~minillm_rl.errors.RunFailed`."""
    import torch

    from minillm_rl.errors import RunFailed

    cluster = plan["cluster"]
    if cluster["num_gpus"] and not torch.cuda.is_available():
        raise RunFailed(f"the plan places learners and workers on {cluster['num_gpus']} GPUs, but this machine sees "
                        f"no CUDA GPU (torch {torch.__version__}, torch.cuda.is_available() is False); run it on "
                        f"the cluster, or print the plan only (DRY_RUN=1 / without --execute)")
    if len(cluster["hosts"]) > 1 and not cluster["hostfile"]:
        raise ValueError("plan --execute on several nodes needs --hostfile (the host names are placeholders)")
    first = cluster["hosts"][0][0]
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    for stage in plan["stages"]:
        failure = None
        for index, command in enumerate(stage["commands"]):
            if failure is not None and not command["cleanup"]:
                continue
            print(f"[{command['host']}] {command_text(command)}", flush=True)
            if _local_host(command["host"], first):
                code = subprocess.run(command["argv"], env={**os.environ, **command["env"]}, check=False).returncode
            else:
                log = Path(log_dir).resolve() / f"{command['host']}-{index}.log"
                remote = f"cd {shlex.quote(os.getcwd())} && nohup {command_text(command)} >{shlex.quote(str(log))} 2>&1"
                code = subprocess.run(["ssh", "-n", command["host"], remote], check=False).returncode
            if code and failure is None:
                failure = f"{stage['name']}: `{command_text(command)}` on {command['host']} exited with {code}"
        if failure is not None:
            raise RunFailed(failure)
