"""Tiny offline assets for an end-to-end run: a Llama teacher and student (hidden size 16) that
share a word-level tokenizer, and a Dolly-format jsonl.

Also a script: ``python tests/tiny_assets.py runs/tiny-assets`` writes what
``launch/recipes/tiny-e2e.yaml`` points at.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["alpha", "beta", "gamma", "delta", "say", "hello", "world", "the", "answer", "is", "list", "three",
         "colors", "red", "green", "blue", "name", "a", "fruit", "apple"]
# The "minillm" prompt template's words, so prompts are not mostly <unk>.
TEMPLATE_WORDS = ["Below", "is", "an", "instruction", "that", "describes", "task", ".", "Write", "response",
                  "appropriately", "completes", "request", "###", "Instruction", ":", "Response", ",",
                  "paired", "with", "input", "provides", "further", "context", "Input"]


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ``<pad>`` = 0, ``</s>`` (EOS) = 1, ``<unk>`` = 2, then
    ``words`` in order (duplicates once)."""
    vocab: dict[str, int] = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS + TEMPLATE_WORDS)


def tiny_llama(vocab_size: int, num_layers: int, seed: int, init_std: float) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=init_std, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).float().eval()


def dolly_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"instruction": " ".join(rng.choices(WORDS, k=rng.randint(2, 5))) + f" {i}",
             "context": " ".join(rng.choices(WORDS, k=rng.randint(0, 3))),
             "response": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))} for i in range(count)]


def write_assets(out: str | Path, num_examples: int = 56) -> dict[str, Path]:
    """``{"teacher", "student", "data", "corpus"}`` paths under ``out`` (created); ``corpus`` is a
    plain-text PT corpus of 600 words (7 blocks of the tiny recipe's 80 tokens)."""
    out = Path(out)
    tokenizer = tiny_tokenizer()
    paths = {"teacher": out / "teacher", "student": out / "student", "data": out / "dolly.jsonl",
             "corpus": out / "corpus.txt"}
    for name, layers, seed, std in (("teacher", 2, 0, 0.3), ("student", 1, 1, 0.1)):
        tiny_llama(len(tokenizer), layers, seed, std).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["data"].write_text("".join(json.dumps(r) + "\n" for r in dolly_records(num_examples)))
    rng = random.Random(1)
    paths["corpus"].write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(50)) + "\n")
    return paths


if __name__ == "__main__":
    print(write_assets(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-assets"))
