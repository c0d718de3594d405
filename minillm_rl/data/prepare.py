"""Prompt templates and tokenisation of instruction examples under token budgets.

Budgets follow the spec (§7): a prompt over its budget is dropped and counted, never cut (a cut
prompt is a different question); a response over its budget is cut, and ends with EOS only when
the whole response plus EOS fits (a cut response must not teach the model to stop there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from minillm_rl.data.instructions import InstructionExample

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATES = ("minillm", "chat")
_TOKENIZE_CHUNK = 1024


def format_prompt(example: InstructionExample, template: str = "minillm",
                  tokenizer: Any = None) -> str:
    """The prompt text for ``example``.

    ``"minillm"``: the reference (Alpaca/Dolly) template of the spec, with or without input.
    ``"chat"``: the tokenizer's chat template, one user turn (instruction, blank line, input),
    with the generation prompt appended.
    """
    if template == "minillm":
        if example.input.strip():
            return PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return PROMPT_NO_INPUT.format(instruction=example.instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs a tokenizer with a chat_template; "
                             "use template='minillm' for tokenizers without one")
        user_text = example.instruction
        if example.input.strip():
            user_text = f"{example.instruction}\n\n{example.input}"
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"template={template!r}; expected one of {PROMPT_TEMPLATES}")


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one prompt and its reference response (EOS included when it fit)."""

    prompt_ids: list[int]
    response_ids: list[int]
    source: str


@dataclass
class PreparationCounts:
    """What :func:`tokenize_examples` did with each input example."""

    kept: int = 0
    dropped_prompt_too_long: int = 0
    dropped_empty: int = 0
    truncated_response: int = 0


def fit_response(response_ids: list[int], eos_token_id: int,
                 max_response_tokens: int) -> tuple[list[int], bool]:
    """``(ids, was_truncated)``: response + EOS if that fits, else its first tokens, no EOS."""
    if len(response_ids) + 1 <= max_response_tokens:
        return response_ids + [eos_token_id], False
    return response_ids[:max_response_tokens], True


def _token_ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        ids.extend(tokenizer(chunk, add_special_tokens=add_special_tokens)["input_ids"])
    return ids


def tokenize_examples(
    examples: Iterable[InstructionExample],
    tokenizer: Any,
    max_prompt_tokens: int,
    max_response_tokens: int,
    template: str = "minillm",
) -> tuple[list[TokenizedExample], PreparationCounts]:
    """Tokenise prompts and responses under their budgets.

    The "minillm" prompt gets the tokenizer's own special tokens (e.g. OPT's BOS); a chat-template
    prompt already contains them. Responses are tokenised without special tokens.

    Returns:
        the kept examples in input order, and the counts (``kept`` counts truncated ones too).
    """
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens}, max_response_tokens="
                         f"{max_response_tokens}; expected both >= 1")
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; expected one to end responses")
    examples = list(examples)
    prompts = [format_prompt(ex, template, tokenizer) for ex in examples]
    prompt_ids = _token_ids(tokenizer, prompts, add_special_tokens=template == "minillm")
    response_ids = _token_ids(tokenizer, [ex.response for ex in examples],
                              add_special_tokens=False)
    counts = PreparationCounts()
    kept: list[TokenizedExample] = []
    for example, prompt, response in zip(examples, prompt_ids, response_ids):
        if not prompt or not response:
            counts.dropped_empty += 1
            continue
        if len(prompt) > max_prompt_tokens:
            counts.dropped_prompt_too_long += 1
            continue
        fitted, was_truncated = fit_response(response, eos_token_id, max_response_tokens)
        counts.truncated_response += was_truncated
        counts.kept += 1
        kept.append(TokenizedExample(prompt, fitted, example.source))
    return kept, counts
