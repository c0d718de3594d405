"""The recipe reference (docs/config-reference.md) is generated from the schema's field docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from minillm_rl.config import schema
from minillm_rl.config.reference import OUTPUT_PATH, render_reference, undocumented_fields

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_doc_line():
    assert undocumented_fields() == [], "add doc= to these fields in minillm_rl/config/schema.py"


@dataclasses.dataclass
class _Section:
    documented: int = schema.option(1, "has one")
    bare: int = 2


@dataclasses.dataclass
class _Root:
    part: _Section = schema.section(_Section, "a section")
    other: int = dataclasses.field(default=0)


def test_a_field_without_a_doc_line_is_reported():
    assert undocumented_fields(_Root) == ["part.bare", "other"]


def test_docs_are_regenerated():
    written = (ROOT / OUTPUT_PATH).read_text(encoding="utf-8")
    assert written == render_reference(), (
        f"{OUTPUT_PATH} is stale: run `python -m minillm_rl.config.reference > {OUTPUT_PATH}` (make docs)")


@pytest.mark.parametrize("dotted", ["data.max_dropped_share", "sft.optim.lr", "runtime.stop_after_steps",
                                    "eval.test_data", "output.resume"])
def test_reference_lists_every_key_with_its_default(dotted):
    value = schema.RunConfig()
    for part in dotted.split("."):
        value = getattr(value, part)
    line = next((line for line in render_reference().splitlines() if line.startswith(f"| `{dotted}` |")), None)
    assert line is not None, f"{dotted} missing from the reference"
    rendered_default = line.split(" | ")[2]
    assert str(value).lower() in rendered_default.lower() or (value == "" and rendered_default == '`""`')
