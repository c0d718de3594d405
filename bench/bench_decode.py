"""Does a static KV cache and a compiled decode step pay for itself here? (``make bench-decode``)

The sampler (:mod:`minillm_rl.algorithm.cached_lm`) decodes with transformers' ``DynamicCache``
in eager mode. This measures, side by side in one run, one decode step (a ``[B, 1]`` forward of
the base model with its KV cache, then the LM head) of each model of the MiniLLM benchmarks'
setting (SmolLM2-135M-Instruct teacher, its 6-layer pruned student) three ways:

- ``dynamic eager``: what the sampler does (the cache grows by concatenation);
- ``static eager``: ``StaticCache`` preallocated to prompt + new tokens (fixed shapes);
- ``static compiled``: the same step under ``torch.compile`` (inductor, fixed shapes), whose
  first calls compile: the warm-up seconds are reported, and the number of decode steps after
  which the compiled path has paid them back.

Per configuration: the prompt forward, then ``--new-tokens`` steps (greedy: the next input is the
argmax, identical across the three, so the work is the same); ms/step over the steps after
``--warmup-steps``. Ratios are against ``dynamic eager`` of the same model and batch.

    python bench/bench_decode.py [--batch-sizes 1 8] [--new-tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_runtime import left_padded_chat_prompts, model_dirs, short_user_turns  # noqa: E402
from minillm_rl.models import load_causal_lm, load_tokenizer  # noqa: E402

WAYS = ("dynamic eager", "static eager", "static compiled")


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, new_tokens: int, way: str,
           step_fn=None) -> tuple[list[float], float, torch.Tensor]:
    """Prompt forward + ``new_tokens`` greedy decode steps; returns (seconds per step, prompt
    seconds, the tokens). ``step_fn``: the (compiled) ``base_model`` to call for a step."""
    from transformers import DynamicCache, StaticCache

    batch, prompt_len = prompt_ids.shape
    total = prompt_len + new_tokens
    cache = (DynamicCache(config=model.config) if way == "dynamic eager"
             else StaticCache(config=model.config, max_cache_len=total))
    # Static shapes: the mask covers every slot from the start (slots past the current position are
    # masked by causality: a query at position p attends to keys <= p only).
    mask = torch.cat([prompt_mask, torch.ones(batch, new_tokens, dtype=prompt_mask.dtype)], dim=1)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    next_position = positions[:, -1:] + 1
    head = model.get_output_embeddings().weight.detach().t().contiguous()
    started = time.perf_counter()
    with torch.inference_mode():
        hidden = model.base_model(input_ids=prompt_ids, attention_mask=prompt_mask if way == "dynamic eager"
                                  else mask, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
        token = (hidden[:, -1:] @ head).argmax(-1)
        prompt_seconds = time.perf_counter() - started
        tokens, seconds = [token], []
        step = model.base_model if step_fn is None else step_fn
        for index in range(new_tokens - 1):
            started = time.perf_counter()
            step_mask = mask[:, : prompt_len + index + 1] if way == "dynamic eager" else mask
            hidden = step(input_ids=token, attention_mask=step_mask, position_ids=next_position + index, cache=cache,
                          use_cache=True).last_hidden_state
            token = (hidden[:, -1:] @ head).argmax(-1)
            seconds.append(time.perf_counter() - started)
            tokens.append(token)
    return seconds, prompt_seconds, torch.cat(tokens, dim=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of ms/step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_dir, student_dir = model_dirs()
    tokenizer = load_tokenizer(student_dir)
    turns = short_user_turns(tokenizer, max(args.batch_sizes), args.prompt_len)
    rows = ["| model | batch | way | ms/step | / dynamic eager | first-call s | pays back after (steps) | same tokens |",
            "|---|---|---|---|---|---|---|---|"]
    for name, directory in (("student (6 layers)", student_dir), ("teacher (30 layers)", teacher_dir)):
        model = load_causal_lm(directory)
        model.eval()
        for batch in args.batch_sizes:
            prompt_ids, prompt_mask = left_padded_chat_prompts(tokenizer, turns[:batch])
            measured: dict[str, tuple[float, float, torch.Tensor]] = {}
            for way in WAYS:
                step_fn = None
                if way == "static compiled":
                    torch._dynamo.reset()
                    step_fn = torch.compile(model.base_model, dynamic=False)
                seconds, prompt_s, tokens = decode(model, prompt_ids, prompt_mask, args.new_tokens, way, step_fn)
                steady = seconds[args.warmup_steps:]
                per_step = sum(steady) / len(steady)
                first = prompt_s + sum(seconds[: args.warmup_steps])  # includes compilation when compiled
                measured[way] = (per_step, first, tokens)
                base_step, base_first, base_tokens = measured["dynamic eager"]
                saved, extra = base_step - per_step, first - base_first
                payback = ("-" if way == "dynamic eager" else "at once" if extra <= 0 and saved >= 0
                           else f"{extra / saved:.0f}" if saved > 0 else "never")
                rows.append(f"| {name} | {batch} | {way} | {1000 * per_step:.1f} | {per_step / base_step:.2f} | "
                            f"{first:.1f} | {payback} | {bool(torch.equal(tokens, base_tokens))} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
