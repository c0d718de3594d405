"""Instruction data (jsonl, JSON arrays incl. ShareGPT, HF datasets), templates, PT corpus."""

from minillm_rl.data.instructions import (
    BadRecordError,
    InstructionExample,
    LoadedInstructions,
    example_from_record,
    find_sharegpt_file,
    load_hf_dataset,
    load_instructions,
    load_json_array,
    load_jsonl,
    split_validation,
)
from minillm_rl.data.prepare import (
    PROMPT_NO_INPUT,
    PROMPT_TEMPLATES,
    PROMPT_WITH_INPUT,
    PreparationCounts,
    TokenizedExample,
    fit_response,
    format_prompt,
    tokenize_examples,
)
from minillm_rl.data.pretraining import pack_into_blocks, read_text_documents, text_files

__all__ = [
    "BadRecordError",
    "InstructionExample",
    "LoadedInstructions",
    "PROMPT_NO_INPUT",
    "PROMPT_TEMPLATES",
    "PROMPT_WITH_INPUT",
    "PreparationCounts",
    "TokenizedExample",
    "example_from_record",
    "find_sharegpt_file",
    "fit_response",
    "format_prompt",
    "load_hf_dataset",
    "load_instructions",
    "load_json_array",
    "load_jsonl",
    "pack_into_blocks",
    "read_text_documents",
    "split_validation",
    "text_files",
    "tokenize_examples",
]
