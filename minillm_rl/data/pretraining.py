"""The plain-text pre-training corpus (spec §4.4) as fixed-length token blocks.

Documents: by default one per file; with ``one_document_per_line=True`` every non-blank line of
every file is a document. Documents are tokenised without special tokens, each followed by EOS,
concatenated in order and cut into ``[num_blocks, block_size]``; the last partial block is dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from minillm_rl.data.instructions import read_utf8_text


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The given files, with each directory replaced by its ``*.txt`` files (sorted)."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files.extend(sorted(p for p in entry.rglob("*.txt") if p.is_file()))
        elif entry.is_file():
            files.append(entry)
        else:
            raise ValueError(f"{entry}: not found; expected a text file or a directory of *.txt")
    if not files:
        raise ValueError(f"no text files in {[str(p) for p in paths]}; expected *.txt files")
    return files


def read_text_documents(paths: Iterable[str | Path],
                        one_document_per_line: bool = False) -> list[str]:
    """Documents from text files (UTF-8); blank documents are skipped."""
    documents: list[str] = []
    for path in text_files(paths):
        text = read_utf8_text(path)
        parts = text.splitlines() if one_document_per_line else [text]
        documents.extend(part for part in parts if part.strip())
    return documents


def document_token_ids(documents: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Each document's tokens (no special tokens) followed by EOS, one list per document, lazily."""
    eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; expected one to separate documents")
    for document in documents:
        yield tokenizer(document, add_special_tokens=False)["input_ids"] + [eos_token_id]


def pack_into_blocks(documents: Iterable[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """``[num_blocks, block_size]`` long: the documents' tokens, EOS after each, in blocks."""
    if block_size < 2:
        raise ValueError(f"block_size={block_size}; expected >= 2 (a block predicts its own "
                         "next tokens)")
    stream: list[int] = []
    for token_ids in document_token_ids(documents, tokenizer):
        stream.extend(token_ids)
    num_blocks = len(stream) // block_size
    if num_blocks == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens; expected at least one block of "
                         f"{block_size}")
    return torch.tensor(stream[: num_blocks * block_size], dtype=torch.long).view(
        num_blocks, block_size)
