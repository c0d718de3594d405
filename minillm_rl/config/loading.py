"""Reading a recipe and its ``key.sub=value`` overrides into a validated :class:`RunConfig`.

Loading is generic: every section is a dataclass of :mod:`~minillm_rl.config.schema`, and
:func:`_convert` walks its fields and type hints, checking each field's declared range; checks
that involve several fields live in :mod:`~minillm_rl.config.checks`.

Every problem becomes one :class:`ConfigError` line naming where it came from (``file:line`` or
the override text), the dotted field, and what was expected, e.g.
``recipe.yaml:7: sampling.alpha: must be in [0, 1], got 1.5``. A key given twice in one mapping
of the recipe is refused too (YAML would silently keep the last one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from minillm_rl.config.checks import check_consistency, relative_to_cwd
from minillm_rl.config.schema import ConfigError, RunConfig


class _Where:
    """Names the origin of a dotted key in error messages: an override, ``file:line``, or the file."""

    def __init__(self, source: str, key_lines: dict[str, int] | None = None,
                 overrides: dict[str, str] | None = None):
        self.source = source
        self.key_lines = key_lines or {}
        self.overrides = overrides or {}

    def __call__(self, dotted: str) -> str:
        prefix = re.sub(r"\[\d+\]", "", dotted)
        for key, text in self.overrides.items():
            if key == prefix or key.startswith(prefix + ".") or prefix.startswith(key + "."):
                return f"override {text!r}"
        while prefix:
            if prefix in self.key_lines:
                return f"{self.source}:{self.key_lines[prefix]}"
            prefix = prefix.rpartition(".")[0]
        return self.source

    def error(self, dotted: str, message: str) -> ConfigError:
        return ConfigError(f"{self(dotted)}: {dotted}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, dotted: str, where: _Where) -> Any:
    """``value`` (parsed YAML) as an instance of the annotation ``tp``, or a ConfigError."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, dotted, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        non_none = [option for option in options if option is not type(None)]
        if len(non_none) == 1:
            return _convert(non_none[0], value, dotted, where)
        raise TypeError(f"config field {dotted}: unions of several types are not supported")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            suffix = f"; did you mean {hint[0]!r}?" if hint else ""
            raise where.error(dotted, f"expected one of {', '.join(map(repr, allowed))}, got {value!r}{suffix}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise where.error(dotted, f"expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is list:
            return [_convert(args[0], item, f"{dotted}[{i}]", where) for i, item in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, f"{dotted}[{i}]", where) for i, item in enumerate(value))
        if len(value) != len(args):
            raise where.error(dotted, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(arg, item, f"{dotted}[{i}]", where) for i, (arg, item) in enumerate(zip(args, value)))
    return _convert_scalar(tp, value, dotted, where)


def _convert_scalar(tp: Any, value: Any, dotted: str, where: _Where) -> Any:
    # bool is an int subclass in Python: `true` must not pass as 1, nor 1 as `true`.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # YAML 1.1 reads `5e-6` (no dot) as a string; accept any text float() understands.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise where.error(dotted, f"expected a finite number, got {value!r}")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {dotted}: unsupported annotation {tp!r}")
    if not ok:
        raise where.error(dotted, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _convert_dataclass(cls: type, value: Any, dotted: str, where: _Where, base: Any = None) -> Any:
    """Fields given in ``value`` replace those of ``base`` (default: ``cls()``), so a nested section
    keeps its parent's defaults for it (``sft.optim`` differs from a plain ``OptimConfig()``)."""
    base = cls() if base is None else base
    if value is None:
        value = {}
    if not isinstance(value, dict):
        label = dotted or "top level"
        raise ConfigError(f"{where(dotted)}: {label}: expected a mapping of fields, got {value!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            full = f"{dotted}.{key}" if dotted else str(key)
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            prefix = f"{dotted}." if dotted else ""
            suffix = f"; did you mean '{prefix}{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"{where(full)}: unknown key '{full}'{suffix}")
    kwargs = {}
    for name, spec in known.items():
        if name not in value:
            continue
        full = f"{dotted}.{name}" if dotted else name
        if dataclasses.is_dataclass(hints[name]):
            converted = _convert_dataclass(hints[name], value[name], full, where, getattr(base, name))
        else:
            converted = _convert(hints[name], value[name], full, where)
        if "range" in spec.metadata and converted is not None:
            _check_range(converted, spec.metadata["range"], full, where)
        kwargs[name] = converted
    return dataclasses.replace(base, **kwargs)


def _check_range(value: float, bounds: tuple, dotted: str, where: _Where) -> None:
    low, high, low_open, high_open = bounds
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return
    if high is None:
        expected = f"must be {'>' if low_open else '>='} {low}"
    elif low is None:
        expected = f"must be {'<' if high_open else '<='} {high}"
    else:
        expected = f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise where.error(dotted, f"{expected}, got {value!r}")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of the recipe gives ``key`` twice: at 1-based ``line`` and first at ``first_line``."""

    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(f"key {key!r} at line {line} repeats line {first_line}")
        self.key, self.line, self.first_line = key, line, first_line


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping giving one key twice (at any nesting level) is an
    error: YAML keeps the last value silently, so a recipe edited in two places would run with
    whichever came last. Merge keys (``<<``) may still be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise DuplicateKeyError(str(key), line, first_lines[key])
            first_lines[key] = line
        return super().construct_mapping(node, deep)


def _key_lines(text: str) -> dict[str, int]:
    """1-based line of every dotted mapping key in a YAML document (for error messages)."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines


def _read_recipe(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    recipe = Path(path)
    if not recipe.is_file():
        raise ConfigError(f"{path}: recipe file not found{relative_to_cwd(path)}")
    try:
        text = recipe.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=RecipeLoader)
        key_lines = _key_lines(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        location = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{location}: invalid YAML: {problem}") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw, key_lines


def apply_override(raw: dict[str, Any], override: str) -> str:
    """Set ``key.sub=value`` in the nested dict ``raw`` (value parsed as YAML); returns the key."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {override!r}: expected key.sub=value, e.g. sampling.alpha=0.3")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: the value is not valid YAML") from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The validated config of a recipe (``None`` = defaults only) with CLI overrides applied.

    Raises:
        ConfigError: one line naming the file (and line) or override, the dotted field, and
            what was expected.
    """
    raw, key_lines = _read_recipe(path) if path is not None else ({}, {})
    override_keys = {apply_override(raw, override): override for override in overrides}
    return _build(raw, _Where(path or "<defaults>", key_lines, override_keys))


def _build(raw: dict[str, Any], where: _Where) -> RunConfig:
    config = _convert(RunConfig, raw, "", where)
    check_consistency(config, where)
    return config


def build_config(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Convert and validate a nested dict (e.g. a parsed config.yaml); errors name ``source``."""
    return _build(raw, _Where(source))
