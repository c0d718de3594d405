"""Prune + heal: a student made of a subset of the teacher's layers (chosen by
:mod:`minillm_rl.layer_selection`, by default the most influential ones), healed by word-level
distillation from the teacher on plain text, so that it starts able to speak (``minillm-rl
init-student --heal-tokens N``).

Why: a layer-pruned student is far from its teacher before any training (SmolLM2-135M-Instruct,
held-out answer NLL in nats/token: teacher 1.82; 12 of 30 layers evenly spaced 14.50, the 12 most
influential 8.87), and SFT on a few thousand examples does not bring a small student back to
language. Healing trains it towards the teacher's full next-token distribution on generic text
first, with the repo's PT machinery:

- Corpus (:mod:`minillm_rl.data.healing_corpus`): text files, or an instruction source whose
  first ``reserved_examples`` examples (and later repeats of their prompts) are left out, so the
  evaluations that draw test prompts from the first examples (the demo, ``bench_quality``) never
  see a prompt that was healed on. Held-out blocks and training blocks share no document: held-out
  blocks are never trained on.
- Steps: the teacher scores a batch of blocks (full distribution, no grad, in ``teacher_dtype``);
  the student's loss is :func:`~minillm_rl.algorithm.ppo.pretrain_micro_batch_loss` (``kd_ratio`` x
  soft cross-entropy to the teacher + ``(1 - kd_ratio)`` x next-token CE); AdamW with linear
  warm-up and cosine decay (:class:`~minillm_rl.algorithm.engine.TorchEngine`), one step per
  batch. The budget counts input tokens (``batch rows x block_size``), rounded down to whole blocks
  (the last batch may have fewer rows). Blocks are drawn in seeded permutations by epoch.
- The student trains in eval mode (no dropout): healing fits the teacher's distribution and
  dropout would only add noise; it also makes a resumed run equal to an uninterrupted one.
- Held-out NLL (next-token cross-entropy, nats/token) of the student before and after and of the
  teacher on the same blocks, and optionally along the run (``eval_every_tokens``), goes to the
  student's ``student_manifest.json`` (:mod:`minillm_rl.student_manifest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from minillm_rl.algorithm.engine import TorchEngine
from minillm_rl.algorithm.losses import sft_loss
from minillm_rl.algorithm.ppo import PretrainBatch, pretrain_micro_batch_loss
from minillm_rl.config import OptimConfig
from minillm_rl.data.healing_corpus import CorpusSource, HealCorpus, build_heal_corpus, load_documents
from minillm_rl.layer_selection import SelectionRule, block_influence, check_layer_list, select_layers
from minillm_rl.models import (
    cache_dir,
    load_causal_lm,
    load_tokenizer,
    prune_student,
    save_model_dir,
    smollm2_teacher,
    torch_dtype,
)
from minillm_rl.student_manifest import check_student_manifest, read_student_manifest
from minillm_rl.tracking import ProgressLine, log_line, write_atomic


@dataclass(frozen=True)
class HealSettings:
    """Healing settings; each is the CLI flag ``--heal-<name>`` (``_`` as ``-``).

    Defaults (measured, see the README): blocks of 256 tokens in batches of 8 (2048 tokens a step),
    lr 3e-4 with 5 % warm-up and cosine decay to 0, the teacher's distribution alone
    (``kd_ratio`` 1: healing is about the teacher, the text is only where to ask it), the teacher in
    float32, 32 held-out blocks.
    """

    tokens: int
    block_size: int = 256
    batch_size: int = 8
    lr: float = 3e-4
    warmup_fraction: float = 0.05
    kd_ratio: float = 1.0
    validation_blocks: int = 32
    teacher_dtype: str = "float32"
    eval_every_tokens: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"--heal-block-size {self.block_size}: expected >= 2 (a block predicts its own next tokens)")
        if self.batch_size < 1 or self.validation_blocks < 1:
            raise ValueError(f"--heal-batch-size {self.batch_size}, --heal-validation-blocks {self.validation_blocks}: "
                             "expected both >= 1")
        if self.tokens < self.batch_size * self.block_size:
            raise ValueError(f"--heal-tokens {self.tokens}: expected at least one batch of --heal-batch-size "
                             f"{self.batch_size} x --heal-block-size {self.block_size} = "
                             f"{self.batch_size * self.block_size} tokens")
        if not self.lr > 0 or not 0 <= self.warmup_fraction < 1 or not 0 <= self.kd_ratio <= 1:
            raise ValueError(f"--heal-lr {self.lr}, warm-up fraction {self.warmup_fraction}, --heal-kd-ratio "
                             f"{self.kd_ratio}: expected lr > 0, 0 <= warm-up < 1, 0 <= kd-ratio <= 1")
        if self.eval_every_tokens < 0:
            raise ValueError(f"--heal-eval-every-tokens {self.eval_every_tokens}: expected >= 0 (0: before and after only)")
        torch_dtype(self.teacher_dtype)

    def training_key(self) -> dict[str, Any]:
        """The settings that decide the healed weights (``eval_every_tokens`` only adds held-out
        measurements along the way): what a cached student and a resumed checkpoint are keyed by."""
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "eval_every_tokens"}

    @property
    def budget_blocks(self) -> int:
        return self.tokens // self.block_size

    @property
    def steps(self) -> int:
        return -(-self.budget_blocks // self.batch_size)

    @property
    def warmup_steps(self) -> int:
        """At least one step of warm-up, and at least one step after it (none for a one-step budget)."""
        return min(max(1, round(self.warmup_fraction * self.steps)), self.steps - 1)


def batch_block_indices(step: int, settings: HealSettings, num_train_blocks: int) -> list[int]:
    """Rows of ``train_blocks`` in optimizer step ``step``: position ``p`` of the budget is block
    ``perm_e[p % n]`` of epoch ``e = p // n``'s seeded permutation."""
    positions = range(step * settings.batch_size, min((step + 1) * settings.batch_size, settings.budget_blocks))
    permutations: dict[int, list[int]] = {}
    rows = []
    for position in positions:
        epoch = position // num_train_blocks
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch + 1)
            permutations[epoch] = torch.randperm(num_train_blocks, generator=generator).tolist()
        rows.append(permutations[epoch][position % num_train_blocks])
    return rows


@torch.no_grad()
def held_out_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over ``blocks`` ``[n, L]``."""
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        total += sft_loss(logits, batch[:, 1:])[0].item() * len(batch)
    return total / len(blocks)


@dataclass
class HealState:
    """What a checkpoint holds besides the weights and optimizer: enough to continue exactly."""

    step: int = 0
    train_seconds: float = 0.0
    nll_before: float | None = None
    teacher_nll: float | None = None
    curve: list[dict[str, float]] = field(default_factory=list)
    nonfinite_skipped: int = 0


def _save_checkpoint(path: Path, key: dict[str, Any], state: HealState, engine: TorchEngine) -> None:
    payload = {"key": key, "state": dataclasses.asdict(state), "model": engine.module.state_dict(),
               "optimizer": engine.optimizer.state_dict(), "scheduler": engine.scheduler.state_dict(),
               "global_steps": engine.global_steps}
    write_atomic(path, lambda handle: torch.save(payload, handle), binary=True)


def _load_checkpoint(path: Path, key: dict[str, Any], engine: TorchEngine) -> HealState:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload["key"] != key:
        differing = sorted(name for name in set(key) | set(payload["key"]) if key.get(name) != payload["key"].get(name))
        raise ValueError(f"{path}: an unfinished healing with other settings (differing: {', '.join(differing)}); "
                         "run with the same settings to resume it, or remove it")
    engine.module.load_state_dict(payload["model"])
    engine.optimizer.load_state_dict(payload["optimizer"])
    engine.scheduler.load_state_dict(payload["scheduler"])
    engine.global_steps = payload["global_steps"]
    return HealState(**payload["state"])


def heal_student(student: torch.nn.Module, teacher: torch.nn.Module, corpus: HealCorpus, settings: HealSettings,
                 checkpoint: tuple[Path, dict[str, Any]] | None = None, checkpoint_interval_s: float = 600.0,
                 log: Callable[[str], None] = log_line) -> dict[str, Any]:
    """Heal ``student`` (float32, trained in place) towards ``teacher`` (converted in place to
    ``settings.teacher_dtype``) on ``corpus``; returns the manifest's ``healing`` record.

    ``checkpoint``: ``(path, key)``; a checkpoint at ``path`` with the same ``key`` (settings,
    corpus) is resumed, one with another key refused; one is written every ``checkpoint_interval_s``
    seconds of training (0: after every step). The caller removes it once the student is saved.
    """
    teacher = teacher.to(torch_dtype(settings.teacher_dtype)).eval()
    student = student.float().eval()
    steps = settings.steps
    optim = OptimConfig(lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=settings.warmup_steps,
                        lr_schedule="cosine")
    engine = TorchEngine(student, optim, total_steps=steps)
    state = HealState()
    if checkpoint is not None and checkpoint[0].is_file():
        state = _load_checkpoint(*checkpoint, engine)
        log(f"heal: resuming {checkpoint[0]} at step {state.step}/{steps}")
    validation, batch_size = corpus.validation_blocks, settings.batch_size
    if state.nll_before is None:
        state.nll_before = held_out_nll(student, validation, batch_size)
        state.teacher_nll = held_out_nll(teacher, validation, batch_size)
        log(f"heal: held-out NLL ({len(validation)} blocks of {settings.block_size} tokens): student "
            f"{state.nll_before:.3f}, teacher {state.teacher_nll:.3f} nats/token; {steps} steps of "
            f"{batch_size} x {settings.block_size} tokens, {len(corpus.train_blocks)} training blocks")
    progress = ProgressLine("heal", steps, start=state.step)
    started = time.monotonic()
    last_checkpoint = time.monotonic()
    next_eval = _next_multiple(state.step * batch_size * settings.block_size, settings.eval_every_tokens)
    while state.step < steps:
        step_started = time.monotonic()
        input_ids = corpus.train_blocks[batch_block_indices(state.step, settings, len(corpus.train_blocks))]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits[:, :-1]
        loss, stats = pretrain_micro_batch_loss(engine, PretrainBatch(input_ids, teacher_logits), settings.kd_ratio)
        engine.backward(loss)
        engine.step()
        del teacher_logits, loss
        state.nonfinite_skipped += not engine.was_step_applied()
        state.step += 1
        state.train_seconds += time.monotonic() - step_started
        tokens = min(state.step * batch_size, settings.budget_blocks) * settings.block_size
        progress.update(state.step, loss=stats["loss"], soft_ce=stats.get("soft_ce", float("nan")), ce=stats["ce"],
                        tokens_per_s=tokens / max(state.train_seconds, 1e-9))
        if next_eval and (tokens >= next_eval or state.step == steps):
            state.curve.append({"tokens": tokens, "train_seconds": state.train_seconds,
                                "nll": held_out_nll(student, validation, batch_size)})
            log(f"heal: {tokens} tokens, {state.train_seconds / 60:.1f} min: held-out NLL {state.curve[-1]['nll']:.3f}")
            next_eval = _next_multiple(tokens, settings.eval_every_tokens)
        if checkpoint is not None and state.step < steps and time.monotonic() - last_checkpoint >= checkpoint_interval_s:
            _save_checkpoint(checkpoint[0], checkpoint[1], state, engine)
            last_checkpoint = time.monotonic()
    progress.close()
    nll_after = state.curve[-1]["nll"] if state.curve and state.curve[-1]["tokens"] == settings.budget_blocks * \
        settings.block_size else held_out_nll(student, validation, batch_size)
    log(f"heal: held-out NLL {state.nll_before:.3f} -> {nll_after:.3f} nats/token (teacher {state.teacher_nll:.3f})")
    tokens_seen = settings.budget_blocks * settings.block_size
    return {"tokens_budget": settings.tokens, "tokens_seen": tokens_seen, "steps": steps,
            "nonfinite_skipped": state.nonfinite_skipped, "corpus": corpus.summary(),
            "held_out_nll": {"student_before": state.nll_before, "student_after": nll_after,
                             "teacher": state.teacher_nll, "blocks": len(validation), "block_size": settings.block_size},
            "curve": state.curve, "train_seconds": state.train_seconds,
            "tokens_per_second": tokens_seen / max(state.train_seconds, 1e-9),
            "wall_seconds_this_process": time.monotonic() - started,
            "settings": dataclasses.asdict(settings) | {"warmup_steps": settings.warmup_steps}}


def _next_multiple(tokens: int, every: int) -> int:
    """The first multiple of ``every`` above ``tokens`` (0 when ``every`` is 0: no evaluations)."""
    return (tokens // every + 1) * every if every else 0


def init_student(teacher_source: str | os.PathLike, num_layers: int | list[int], out_dir: str | os.PathLike,
                 gguf_file: str | None = None, dtype: torch.dtype = torch.float32, heal: HealSettings | None = None,
                 corpus: CorpusSource | None = None, checkpoint_interval_s: float = 600.0,
                 log: Callable[[str], None] = log_line, select: SelectionRule = "influence") -> Path:
    """Write a student of ``num_layers`` teacher layers chosen by ``select`` (``num_layers`` a list:
    exactly those layers), in ``dtype``, the teacher's tokenizer and ``student_manifest.json`` to
    ``out_dir`` (atomically: a staged directory renamed into place, the manifest written last);
    healed first when ``heal`` is given (with ``corpus``). ``select="influence"`` measures the block
    influence on the corpus's held-out blocks, so it needs the corpus (healing).

    Every input is checked (``ValueError``, one line) before anything is written. A healing in
    progress keeps a checkpoint in ``<out_dir>.healing/`` (every ``checkpoint_interval_s`` seconds
    of training); running the same command again resumes it, and it is removed once the student is
    saved. Without healing the student needs SFT before it is any use.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ValueError(f"{out_dir} already exists; expected a new output directory")
    explicit = isinstance(num_layers, list)
    if not explicit and num_layers < 1:
        raise ValueError(f"--layers {num_layers}: expected >= 1")
    if (heal is None) != (corpus is None):
        raise ValueError("healing needs --heal-tokens N > 0 and a corpus (--heal-corpus or --heal-instructions) together")
    tokenizer = load_tokenizer(teacher_source, gguf_file=gguf_file)
    if not explicit and select == "influence" and heal is None:
        raise ValueError("--select influence measures the layers on the healing corpus's held-out text: heal the "
                         "student (--heal-tokens N with --heal-corpus or --heal-instructions), or use --select even "
                         "or --keep-layers")
    heal_corpus = None
    if heal is not None:
        heal_corpus = build_heal_corpus(*load_documents(corpus, tokenizer), tokenizer, heal.block_size,
                                        heal.validation_blocks, heal.budget_blocks * heal.block_size,
                                        heal.batch_size * heal.block_size, heal.seed)
    # Healing trains float32 master weights: the teacher is pruned in float32 and scored in heal.teacher_dtype.
    teacher = load_causal_lm(teacher_source, dtype=torch.float32 if heal else dtype, gguf_file=gguf_file)
    n_total = teacher.config.num_hidden_layers
    selection: dict[str, Any]
    if explicit:
        keep = check_layer_list(num_layers, n_total)
        selection = {"rule": "explicit"}
    elif select == "influence":
        influence = block_influence(teacher, heal_corpus.validation_blocks, heal.batch_size)
        keep = select_layers("influence", num_layers, n_total, influence)
        selection = {"rule": "influence", "influence": influence,
                     "measured_on": {"held_out_blocks": len(heal_corpus.validation_blocks),
                                     "fingerprint": heal_corpus.summary()["validation_fingerprint"]}}
        log("init-student: block influence per teacher layer " + " ".join(f"{value:.3f}" for value in influence) +
            f"; keeping {keep}")
    else:
        keep = select_layers(select, num_layers, n_total)
        selection = {"rule": select}
    student = prune_student(teacher, keep)
    manifest: dict[str, Any] = {
        "teacher": {"source": str(teacher_source), "gguf_file": gguf_file, "architecture": type(teacher).__name__,
                    "num_layers": n_total},
        "layers_kept": keep, "layer_selection": selection, "dtype": str(dtype).removeprefix("torch."), "healing": None}
    partial_dir = out_dir.with_name(out_dir.name + ".healing")
    if heal is not None:
        key = {"teacher": manifest["teacher"], "layers_kept": keep, "settings": heal.training_key(),
               "corpus": heal_corpus.summary()}
        manifest["healing"] = heal_student(student, teacher, heal_corpus, heal, (partial_dir / "state.pt", key),
                                           checkpoint_interval_s, log)
    del teacher
    manifest["wall_seconds"] = time.monotonic() - started
    save_model_dir(student.to(dtype), tokenizer, out_dir, manifest=manifest)
    shutil.rmtree(partial_dir, ignore_errors=True)
    return out_dir


# The demo and bench-quality draw every ShareGPT example they use (train, validation, test) from
# the first 3000 examples (their --num-examples defaults are 3000 and 800), so a student healed on
# the examples after these, minus repeats of their prompts, has seen none of their test prompts.
SHAREGPT_RESERVED_EXAMPLES = 3000


def healed_student(teacher_dir: str | os.PathLike, cache: str | os.PathLike, name: str, layers: int,
                   heal: HealSettings, corpus: CorpusSource, select: SelectionRule = "influence") -> Path:
    """A ``layers``-layer student of ``teacher_dir`` (layers chosen by ``select``) healed with
    ``heal`` on ``corpus``, built once under ``cache`` in
    ``<name>-<layers>l-<select>-healed-<tokens>tok-<hash of the settings>`` and reused (an
    interrupted build resumes from its checkpoint); a cached student whose manifest does not match
    it is refused (:func:`check_student_manifest`)."""
    key = json.dumps({"teacher": str(teacher_dir), "layers": layers, "select": select, "heal": heal.training_key(),
                      "corpus": dataclasses.asdict(corpus)}, sort_keys=True)
    student_dir = Path(cache) / (f"{name}-{layers}l-{select}-healed-{heal.tokens}tok-"
                                 f"{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    if read_student_manifest(student_dir) is None:
        init_student(teacher_dir, layers, student_dir, heal=heal, corpus=corpus, select=select)
    check_student_manifest(student_dir)
    return student_dir


def healed_smollm2_student(cache: str | os.PathLike | None, layers: int, heal_tokens: int,
                           select: SelectionRule = "influence", reserved_examples: int = SHAREGPT_RESERVED_EXAMPLES,
                           **settings: Any) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)``: the SmolLM2-135M-Instruct teacher (:func:`smollm2_teacher`)
    and a ``layers``-layer student (chosen by ``select``) healed for ``heal_tokens`` tokens on the
    ShareGPT examples after the first ``reserved_examples`` (chat template; ``settings``: other
    :class:`HealSettings` fields), cached under ``cache`` (default :func:`cache_dir`;
    :func:`healed_student`)."""
    cache = Path(cache or cache_dir())
    teacher_dir = smollm2_teacher(cache)
    corpus = CorpusSource(instructions="sharegpt", template="chat", reserved_examples=reserved_examples)
    heal = HealSettings(tokens=heal_tokens, **settings)
    # Named as `minillm-rl init-student --cache` names it, so that both find the same student.
    return teacher_dir, healed_student(teacher_dir, cache, f"{teacher_dir.name}-student", layers, heal, corpus, select)
