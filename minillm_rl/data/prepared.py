"""Prepared datasets: instruction data tokenised once, saved with a manifest, reloaded by training.

``minillm-rl prepare-data`` writes a directory::

    DIR/prepared.json        manifest: format version, source, tokenizer name + fingerprint,
                             template, budgets, split settings, counts per split
    DIR/data/                ``datasets.DatasetDict.save_to_disk``: "train" and "validation" rows
                             (prompt_ids, response_ids, source, instruction, input, response) and,
                             with a PT corpus, "pretrain" rows (input_ids, one block each)

The directory is built in a temporary sibling and renamed into place, so ``DIR`` is either absent or
complete. Loading refuses a manifest of another format version, another tokenizer, or other
budgets/split than the recipe's: the recipe and the data must describe the same run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from minillm_rl.data.instructions import load_instructions, split_validation
from minillm_rl.data.prepare import TokenizedExample, format_prompt, tokenize_examples
from minillm_rl.data.pretraining import pack_into_blocks, read_text_documents
from minillm_rl.tracking import atomic_write_json, staged_directory

PREPARED_FORMAT_VERSION = 1
MANIFEST_NAME = "prepared.json"
DATA_SUBDIR = "data"
# Fields of the manifest that must equal the recipe's ``data`` section for training to use it.
MATCHED_SETTINGS = ("template", "max_prompt_tokens", "max_length", "num_validation", "split_seed")
_FINGERPRINT_PROBE = "Hello world! 123 <|im_start|> ### Response:\n"


@dataclass(frozen=True)
class PrepareSettings:
    """How ``prepare-data`` turns a source into a prepared dataset (the recipe's ``data`` fields)."""

    template: str = "minillm"
    max_prompt_tokens: int = 256
    max_length: int = 512
    num_validation: int = 1000
    split_seed: int = 0
    split: str = "train"
    skip_bad_records: bool = False

    def __post_init__(self):
        if not 1 <= self.max_prompt_tokens < self.max_length:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens}, max_length={self.max_length}; expected "
                             "1 <= max_prompt_tokens < max_length (responses get the difference)")
        if self.num_validation < 1:
            raise ValueError(f"num_validation={self.num_validation}; expected >= 1")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what makes token ids mean the same: vocabulary, special-token ids, chat template,
    and the ids of a probe string with special tokens (catches normalisation / BOS differences)."""
    from minillm_rl.models import _special_token_ids

    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": _special_token_ids(tokenizer),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": tokenizer(_FINGERPRINT_PROBE, add_special_tokens=True)["input_ids"],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _split_rows(examples, kept: list[TokenizedExample], tokenizer, template: str) -> dict[str, list]:
    """Columns of one split: the token ids plus the text they came from (by ``source``)."""
    by_source = {example.source: example for example in examples}
    rows: dict[str, list] = {name: [] for name in
                             ("prompt_ids", "response_ids", "source", "prompt", "instruction", "input", "response")}
    for item in kept:
        example = by_source[item.source]
        rows["prompt_ids"].append(item.prompt_ids)
        rows["response_ids"].append(item.response_ids)
        rows["source"].append(item.source)
        rows["prompt"].append(format_prompt(example, template, tokenizer))
        rows["instruction"].append(example.instruction)
        rows["input"].append(example.input)
        rows["response"].append(example.response)
    return rows


def prepare_dataset(source: str, tokenizer: Any, tokenizer_name: str, out_dir: str | os.PathLike,
                    settings: PrepareSettings, pretrain_corpus: Sequence[str] = (), block_size: int | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Load, split, tokenise and save ``source`` into ``out_dir``; returns the manifest.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` (then it is replaced only once the new
    one is complete).
    """
    import datasets

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ValueError(f"{out_dir}: exists and is not empty; expected a new directory (or pass --overwrite)")
    if pretrain_corpus and block_size is None:
        raise ValueError("--pretrain-corpus needs --block-size (tokens per PT block)")
    loaded = load_instructions(source, split=settings.split, skip_bad=settings.skip_bad_records)
    if len(loaded.examples) <= settings.num_validation:
        raise ValueError(f"num_validation={settings.num_validation} leaves no training examples "
                         f"({source} has {len(loaded.examples)})")
    train, valid = split_validation(loaded.examples, settings.num_validation, settings.split_seed)
    budgets = (settings.max_prompt_tokens, settings.max_length - settings.max_prompt_tokens)
    splits, split_counts = {}, {}
    for name, examples in (("train", train), ("validation", valid)):
        kept, counts = tokenize_examples(examples, tokenizer, *budgets, template=settings.template)
        if not kept:
            raise ValueError(f"{source}: no {name} example has a prompt within max_prompt_tokens="
                             f"{settings.max_prompt_tokens}")
        splits[name] = datasets.Dataset.from_dict(_split_rows(examples, kept, tokenizer, settings.template))
        split_counts[name] = {"examples": len(examples), **dataclasses.asdict(counts)}
    manifest: dict[str, Any] = {
        "format_version": PREPARED_FORMAT_VERSION, "source": str(source),
        "tokenizer": {"name": str(tokenizer_name), "fingerprint": tokenizer_fingerprint(tokenizer)},
        **dataclasses.asdict(settings),
        "counts": {"loaded": len(loaded.examples), "skipped_bad": dict(sorted(loaded.skipped.items())),
                   "truncated_file_after": loaded.truncated_after, **split_counts},
        "pretrain": None,
    }
    if pretrain_corpus:
        blocks = pack_into_blocks(read_text_documents(pretrain_corpus), tokenizer, block_size)
        splits["pretrain"] = datasets.Dataset.from_dict({"input_ids": blocks.tolist()})
        manifest["pretrain"] = {"files": [str(p) for p in pretrain_corpus], "block_size": block_size,
                                "num_blocks": blocks.shape[0]}
    with staged_directory(out_dir) as tmp_dir:
        datasets.DatasetDict(splits).save_to_disk(str(tmp_dir / DATA_SUBDIR))
        atomic_write_json(tmp_dir / MANIFEST_NAME, manifest)
    return manifest


def is_prepared_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a ``prepare-data`` output (even one whose manifest is broken)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST_NAME).exists() or (path / DATA_SUBDIR).is_dir())


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of prepared dataset ``path``, checked to be of this format version."""
    manifest_path = Path(path) / MANIFEST_NAME
    rerun = "re-run `minillm-rl prepare-data`"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: missing; expected the manifest written by `minillm-rl prepare-data` "
                         f"({rerun})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_path}: corrupt ({type(err).__name__}); expected JSON ({rerun})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise ValueError(f"{manifest_path}: no 'format_version'; expected a prepare-data manifest ({rerun})")
    if manifest["format_version"] != PREPARED_FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {manifest['format_version']!r}; expected "
                         f"{PREPARED_FORMAT_VERSION} ({rerun} with this version of minillm_rl)")
    missing = [key for key in ("tokenizer", "counts", *MATCHED_SETTINGS) if key not in manifest]
    if missing:
        raise ValueError(f"{manifest_path}: missing field(s) {missing}; expected a complete manifest ({rerun})")
    return manifest


def load_prepared(path: str | os.PathLike, tokenizer: Any, expected: Any) -> tuple[list[TokenizedExample],
                                                                                      list[TokenizedExample]]:
    """``(train, validation)`` examples of prepared dataset ``path`` for a run whose tokenizer is
    ``tokenizer`` and whose data settings are ``expected`` (anything with the
    :data:`MATCHED_SETTINGS` attributes, e.g. the recipe's ``data`` section)."""
    manifest = read_manifest(path)
    manifest_path = Path(path) / MANIFEST_NAME
    if manifest["tokenizer"].get("fingerprint") != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{manifest_path}: prepared with tokenizer {manifest['tokenizer'].get('name')!r}, which "
                         "differs from the student's (vocabulary, special tokens or chat template); expected the "
                         "same tokenizer (re-run `minillm-rl prepare-data --tokenizer <student>`)")
    for key in MATCHED_SETTINGS:
        if manifest[key] != getattr(expected, key):
            raise ValueError(f"{manifest_path}: prepared with {key}={manifest[key]!r} but data.{key}="
                             f"{getattr(expected, key)!r}; expected the same value (set data.{key}="
                             f"{manifest[key]!r} or re-run prepare-data)")
    splits = _load_splits(path)
    result = []
    for name in ("train", "validation"):
        if name not in splits or splits[name].num_rows != manifest["counts"][name]["kept"]:
            raise ValueError(f"{Path(path) / DATA_SUBDIR}: split {name!r} is missing or its size differs from "
                             f"the manifest; expected {manifest['counts'][name]['kept']} rows (re-run prepare-data)")
        columns = splits[name].select_columns(["prompt_ids", "response_ids", "source"]).to_dict()
        result.append([TokenizedExample(list(p), list(r), s) for p, r, s in
                       zip(columns["prompt_ids"], columns["response_ids"], columns["source"])])
    return result[0], result[1]


def _load_splits(path: str | os.PathLike):
    import datasets

    try:
        return datasets.load_from_disk(str(Path(path) / DATA_SUBDIR))
    except Exception as err:  # datasets raises many types for a damaged directory
        raise ValueError(f"{Path(path) / DATA_SUBDIR}: cannot load ({type(err).__name__}); expected the splits "
                         "written by `minillm-rl prepare-data`") from None


def load_prepared_pretrain(path: str | os.PathLike) -> torch.Tensor | None:
    """The PT corpus blocks ``[num_blocks, block_size]`` of prepared dataset ``path`` (call after
    :func:`load_prepared`, which checks the manifest against the run), or None without a corpus."""
    manifest = read_manifest(path)
    if not manifest["pretrain"]:
        return None
    splits = _load_splits(path)
    expected = manifest["pretrain"]["num_blocks"]
    if "pretrain" not in splits or splits["pretrain"].num_rows != expected:
        raise ValueError(f"{Path(path) / DATA_SUBDIR}: split 'pretrain' is missing or its size differs from the "
                         f"manifest; expected {expected} blocks (re-run prepare-data)")
    return torch.tensor(splits["pretrain"]["input_ids"], dtype=torch.long)


def format_counts(manifest: dict[str, Any]) -> str:
    """A few lines for the terminal: what was loaded, skipped, dropped and truncated."""
    counts = manifest["counts"]
    skipped = ", ".join(f"{k}={v}" for k, v in counts["skipped_bad"].items()) or "none"
    lines = [f"loaded {counts['loaded']} examples from {manifest['source']} (bad records skipped: {skipped}"
             + (f"; file truncated after {counts['truncated_file_after']} records" if
                counts["truncated_file_after"] is not None else "") + ")"]
    for name in ("train", "validation"):
        c = counts[name]
        lines.append(f"{name}: {c['kept']} kept of {c['examples']} ({c['dropped_prompt_too_long']} prompts over "
                     f"{manifest['max_prompt_tokens']} tokens dropped, {c['dropped_empty']} empty dropped, "
                     f"{c['truncated_response']} responses truncated)")
    if manifest["pretrain"]:
        pt = manifest["pretrain"]
        lines.append(f"pretrain: {pt['num_blocks']} blocks of {pt['block_size']} tokens")
    return "\n".join(lines)
