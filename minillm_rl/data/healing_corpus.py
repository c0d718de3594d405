"""The text a pruned student is healed on (:mod:`minillm_rl.healing`): documents, held-out blocks
and training blocks that share no document.

Documents come from text files (one per file, as ``data.pretrain_corpus``) or from an instruction
source (prompt in its template + response). For an instruction source the first
``reserved_examples`` examples are not used, nor any later example whose prompt (whitespace-
normalised instruction and input) repeats one of theirs: the packaged ShareGPT file repeats many
prompts (819 of the examples after the first 3000 repeat a prompt of the first 3000), so a range of
records alone would not keep evaluation prompts out of the healing text.

Blocks: documents in a seeded order; the first ones fill the held-out blocks (the rest of the last
one is dropped), the following ones give the training blocks; each document is its tokens followed
by EOS (:func:`~minillm_rl.data.pretraining.document_token_ids`). Only the documents needed are
tokenised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from minillm_rl.data.instructions import InstructionExample, load_instructions
from minillm_rl.data.prepare import format_prompt
from minillm_rl.data.pretraining import document_token_ids, read_text_documents


@dataclass(frozen=True)
class CorpusSource:
    """Where the healing text comes from: ``text`` files / directories of ``*.txt``, or an
    ``instructions`` source (``sharegpt``, jsonl, json, datasets) rendered with ``template``, its
    first ``reserved_examples`` examples left out (see the module docstring)."""

    text: tuple[str, ...] = ()
    instructions: str | None = None
    template: str = "chat"
    reserved_examples: int = 0

    def __post_init__(self):
        if bool(self.text) == (self.instructions is not None):
            raise ValueError("healing needs a corpus: --heal-corpus FILES/DIRS or --heal-instructions SOURCE (one of them)")
        if self.reserved_examples < 0:
            raise ValueError(f"--heal-reserved-examples {self.reserved_examples}: expected >= 0")


def prompt_key(example: InstructionExample) -> tuple[str, str]:
    """The prompt of ``example`` with runs of whitespace made one space: what "the same prompt" means."""
    return " ".join(example.instruction.split()), " ".join(example.input.split())


def instruction_documents(examples: list[InstructionExample], reserved_examples: int, template: str,
                          tokenizer) -> tuple[list[str], str]:
    """``(documents, description)``: ``prompt + response`` texts of ``examples[reserved_examples:]``
    minus every example whose :func:`prompt_key` is that of one of the first ``reserved_examples``."""
    if reserved_examples >= len(examples):
        raise ValueError(f"--heal-reserved-examples {reserved_examples}: the source has {len(examples)} examples; "
                         "expected fewer reserved than that")
    reserved = {prompt_key(e) for e in examples[:reserved_examples]}
    kept = [e for e in examples[reserved_examples:] if prompt_key(e) not in reserved]
    documents = [format_prompt(e, template, tokenizer) + e.response for e in kept]
    repeats = len(examples) - reserved_examples - len(kept)
    return documents, (f"examples [{reserved_examples}:{len(examples)}] ({template} template) minus {repeats} "
                       f"repeating a prompt of the first {reserved_examples}")


def load_documents(source: CorpusSource, tokenizer) -> tuple[list[str], str]:
    """``(documents, description)`` of ``source``; ``ValueError`` (one line) for a missing or empty one."""
    if source.text:
        documents, description = read_text_documents(source.text), f"text files {list(source.text)}"
    else:
        loaded = load_instructions(source.instructions, skip_bad=True)
        documents, description = instruction_documents(loaded.examples, source.reserved_examples, source.template,
                                                       tokenizer)
        description = f"{source.instructions} {description}"
    if not documents:
        raise ValueError(f"healing corpus {description}: no non-blank document")
    return documents, description


def documents_fingerprint(documents: Iterable[str]) -> str:
    """SHA-256 of the documents' text, in order."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass
class HealCorpus:
    """``train_blocks`` and ``validation_blocks``, each ``[n, block_size]`` long, from disjoint
    documents of a corpus of ``documents`` documents."""

    train_blocks: torch.Tensor
    validation_blocks: torch.Tensor
    description: str
    fingerprint: str
    documents: int
    validation_documents: int
    train_documents: int

    def summary(self) -> dict[str, Any]:
        """What the student manifest records of the corpus."""
        return {"description": self.description, "fingerprint": self.fingerprint, "documents": self.documents,
                "validation_documents": self.validation_documents, "train_documents_used": self.train_documents,
                "train_blocks": len(self.train_blocks), "validation_blocks": len(self.validation_blocks),
                "validation_fingerprint": hashlib.sha256(self.validation_blocks.numpy().tobytes()).hexdigest()}


def _take_documents(token_lists: Iterator[list[int]], num_tokens: int) -> tuple[list[int], int]:
    """Tokens of whole documents from ``token_lists`` until there are ``num_tokens`` (or none is
    left), and the number of documents taken."""
    stream: list[int] = []
    documents = 0
    for token_ids in token_lists:
        stream.extend(token_ids)
        documents += 1
        if len(stream) >= num_tokens:
            break
    return stream, documents


def build_heal_corpus(documents: list[str], description: str, tokenizer, block_size: int, validation_blocks: int,
                      train_tokens: int, min_train_tokens: int, seed: int) -> HealCorpus:
    """``validation_blocks`` held-out blocks, then training blocks from the following documents
    until ``train_tokens`` (fewer when the corpus ends first: training then goes through them in
    several epochs); at least ``min_train_tokens`` of them, else ``ValueError``."""
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    token_lists = document_token_ids((documents[i] for i in order), tokenizer)
    held_out_tokens = validation_blocks * block_size
    validation, validation_docs = _take_documents(token_lists, held_out_tokens)
    if len(validation) < held_out_tokens:
        raise ValueError(f"healing corpus {description}: {len(validation)} tokens in all; expected more than "
                         f"--heal-validation-blocks {validation_blocks} x --heal-block-size {block_size} to hold out")
    train, train_docs = _take_documents(token_lists, train_tokens)
    if len(train) < max(min_train_tokens, block_size):
        raise ValueError(f"healing corpus {description}: {len(train)} tokens after the {validation_docs} held-out "
                         f"document(s); expected at least {max(min_train_tokens, block_size)} (one batch) to train on: "
                         "a larger corpus, or fewer --heal-validation-blocks")
    num_train = len(train) // block_size
    return HealCorpus(torch.tensor(train[: num_train * block_size]).view(num_train, block_size),
                      torch.tensor(validation[:held_out_tokens]).view(validation_blocks, block_size),
                      description, documents_fingerprint(documents), len(documents), validation_docs, train_docs)
