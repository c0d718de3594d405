"""``docs/config-reference.md``: every recipe key with its type, default, allowed values and meaning,
generated from the schema's own field docs (:mod:`minillm_rl.config.schema`).

Regenerate with ``python -m minillm_rl.config.reference > docs/config-reference.md`` (``make docs``);
``tests/test_config_reference.py`` fails when a field has no doc line or the file is stale.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import Any, Literal

from minillm_rl.config.schema import RunConfig

OUTPUT_PATH = "docs/config-reference.md"

INTRODUCTION = """\
# Recipe reference

A recipe is a YAML file of sections; it states only what differs from the defaults below
(`launch/recipes/` has complete examples). On the command line, `KEY=VALUE` overrides follow the
recipe: `minillm-rl train --config recipe.yaml sampling.alpha=0.3 'train.phases=[sft]'` (the value
is parsed as YAML; quote brackets from the shell). `minillm-rl train --config recipe.yaml --print-config [overrides]` prints the
resolved config and exits without starting anything; a run writes the same to `config.yaml` in
its output directory.

Every problem is refused before anything starts, in one line naming the file and line (or the
override), the key, and what was expected: an unknown key (with a "did you mean"), a value out of
range, a key given twice in one mapping, or settings that contradict each other.

Relative paths in a recipe (models, data, the DeepSpeed file, the output directory) resolve
against the **current directory** of the `minillm-rl` process, not the recipe's directory; run
from the repository root, as `launch/` does. A "not found" error for a relative path says which
directory it was resolved against.

This page is generated from the config dataclasses (`minillm_rl/config/schema.py`):
`make docs` rewrites it.
"""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "str" if all(isinstance(arg, str) for arg in args) else "value"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return f"[{', '.join(_type_name(arg) for arg in args)}]"
    return tp.__name__


def _allowed(tp: Any, metadata: typing.Mapping[str, Any]) -> str:
    """The choices of a Literal (also inside list/optional), or the declared range."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return ", ".join(f"`{arg}`" for arg in args)
    if typing.get_origin(tp) in (list, typing.Union, types.UnionType):
        inner = [_allowed(arg, {}) for arg in args if arg is not type(None)]
        if any(inner):
            return "each of " + "".join(inner) if typing.get_origin(tp) is list else "".join(inner)
    if "range" in metadata:
        low, high, low_open, high_open = metadata["range"]
        if high is None:
            return f"{'>' if low_open else '≥'} {low:g}"
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return ""


def _default(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`" if value != "" else '`""`'


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _paragraph(docstring: str | None) -> str:
    """A section docstring as Markdown: joined lines, reST literals as code spans."""
    text = re.sub(r"``([^`]+)``", r"`\1`", docstring or "")
    return "\n\n".join(" ".join(part.split()) for part in text.split("\n\n") if part.strip())


def _rows(section: Any, prefix: str) -> list[str]:
    hints = typing.get_type_hints(type(section))
    rows = []
    for spec in dataclasses.fields(section):
        dotted, value, tp = f"{prefix}.{spec.name}", getattr(section, spec.name), hints[spec.name]
        if dataclasses.is_dataclass(tp):
            rows += _rows(value, dotted)
            continue
        rows.append(f"| `{dotted}` | {_type_name(tp)} | {_default(value)} | {_allowed(tp, spec.metadata)} | "
                    f"{_cell(spec.metadata.get('doc', ''))} |")
    return rows


def undocumented_fields(config_class: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted names of the fields (sections included) that have no doc line."""
    missing = []
    hints = typing.get_type_hints(config_class)
    for spec in dataclasses.fields(config_class):
        dotted = f"{prefix}{spec.name}"
        if not str(spec.metadata.get("doc", "")).strip():
            missing.append(dotted)
        if dataclasses.is_dataclass(hints[spec.name]):
            missing += undocumented_fields(hints[spec.name], dotted + ".")
    return missing


def render_reference() -> str:
    """The whole Markdown page."""
    defaults = RunConfig()
    parts = [INTRODUCTION]
    sections = dataclasses.fields(RunConfig)
    parts.append("Sections: " + ", ".join(f"[`{spec.name}`](#{spec.name})" for spec in sections) + ".\n")
    for spec in sections:
        section = getattr(defaults, spec.name)
        parts.append(f"## {spec.name}\n\n{_paragraph(type(section).__doc__)}\n")
        parts.append("| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n"
                     + "\n".join(_rows(section, spec.name)) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_reference(), end="")
