"""Learner run for tests/test_learner.py: trains the saved student on the saved rollouts.

Launched as ``deepspeed --num_gpus N tests/ds_learner_script.py ...`` (or plain ``python`` for a
world of one). Every run starts from the same student weights and replays the same round of
rollouts ``--rounds`` times through :func:`ppo_round` (DeepSpeed engine), each step with a PT batch
(corpus blocks + teacher log-probs, cycled in order over the global micro-batches); rank 0 saves
the per-step stats and the exported weights. With ``--checkpoint-dir`` it also saves a checkpoint, trains one
more round, then rebuilds a fresh engine, loads the checkpoint and trains that round again.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minillm_rl.algorithm.advantages import AdvantageConfig
from minillm_rl.runtime.learner import (
    build_engine,
    exit_learner_process,
    export_student_state,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
)
from minillm_rl.algorithm.sampler import SamplingConfig
from minillm_rl.config import OptimConfig
from minillm_rl.algorithm.ppo import MiniLLMLossConfig, PretrainBatch, ppo_round


def build_student(data: dict) -> torch.nn.Module:
    student = LlamaForCausalLM(LlamaConfig(**data["student_config"]))
    student.load_state_dict(data["student_state"])
    return student.float().eval()


def pretrain_batch(data: dict, step: int, rank: int, world_size: int) -> PretrainBatch:
    """This rank's rows of global PT micro-batch ``step``: ``world_size * micro_batch_size`` blocks."""
    blocks, teacher = data["pt_blocks"], data["pt_teacher_logprobs"]
    size = world_size * data["micro_batch_size"]
    rows = [(step * size + j) % len(blocks) for j in range(size)][rank::world_size]
    return PretrainBatch(blocks[rows], teacher[rows])


def train_rounds(engine, data: dict, rounds: int, generator: torch.Generator, rank: int = 0,
                 world_size: int = 1, first_step: int = 0) -> list[dict[str, float]]:
    history = []
    for _ in range(rounds):
        offset = first_step + len(history)
        history += ppo_round(engine, data["rollout"], SamplingConfig(**data["sampling"]),
                             AdvantageConfig(), MiniLLMLossConfig(), data["ppo_epochs"], data["micro_batch_size"],
                             generator, pretrain=lambda i: pretrain_batch(data, offset + i, rank, world_size))
    return history


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--ds-config", required=True)
    parser.add_argument("--micro-batch-size", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--local_rank", type=int)  # passed by the deepspeed launcher
    args = parser.parse_args()

    torch.set_num_threads(1)
    rank, world_size = init_distributed(timeout_s=120)
    data = torch.load(args.data, weights_only=False)
    data["micro_batch_size"] = args.micro_batch_size
    optim = OptimConfig(**data["optim"])

    engine = build_engine(build_student(data), args.ds_config, optim, args.micro_batch_size)
    generator = torch.Generator().manual_seed(data["seed"])
    history = train_rounds(engine, data, args.rounds, generator, rank, world_size)
    result = {"world_size": world_size, "history": history, "export": export_student_state(engine, bucket_numel=600)}

    if args.checkpoint_dir:
        save_checkpoint(engine, args.checkpoint_dir, "after_rounds",
                        {"global_steps": engine.global_steps, "generator": generator.get_state()})
        result["continued_history"] = train_rounds(engine, data, 1, generator, rank, world_size, len(history))
        result["continued_export"] = export_student_state(engine)
        resumed = build_engine(build_student(data), args.ds_config, optim, args.micro_batch_size)
        client_state = load_checkpoint(resumed, args.checkpoint_dir, "after_rounds")
        resumed_generator = torch.Generator()
        resumed_generator.set_state(client_state["generator"])
        result["resumed_global_steps"] = (client_state["global_steps"], resumed.global_steps)
        result["resumed_history"] = train_rounds(resumed, data, 1, resumed_generator, rank, world_size, len(history))
        result["resumed_export"] = export_student_state(resumed)

    if rank == 0:
        torch.save(result, args.out)
    torch.distributed.barrier()  # no rank exits while another still trains or saves


if __name__ == "__main__":
    main()
    exit_learner_process(0)  # as minillm-rl train's learners end (a normal shutdown can abort natively)
