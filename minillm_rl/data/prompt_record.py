"""The prompt format a trained model was trained with, recorded beside its weights.

``minillm-rl train`` writes ``prompt_format.json`` into every model directory it exports
(``best/``, ``final/``, ``sft_best_loss/``): the template and the prompt budget of the recipe's
``data`` section. ``minillm-rl eval`` reads it (:func:`resolve_eval_template`) so that a model is
evaluated with the prompts it learnt from: the same model scored Rouge-L 4.97 with the wrong
template and 6.79 with its own (issue 27), with no warning. The record travels with the directory
when it is copied elsewhere; for a run directory written before the record existed, the run's
``config.yaml`` beside the model says the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from minillm_rl.tracking import atomic_write_json

PROMPT_RECORD = "prompt_format.json"
TEMPLATES = ("minillm", "chat")
DEFAULT_TEMPLATE = "minillm"
# Model directories a training run writes next to its config.yaml.
RUN_MODEL_DIRS = ("best", "final", "sft_best_loss")


def write_prompt_record(model_dir: str | os.PathLike, template: str, max_prompt_tokens: int) -> None:
    """Record ``template`` and ``max_prompt_tokens`` in ``model_dir`` (atomically)."""
    atomic_write_json(Path(model_dir) / PROMPT_RECORD,
                      {"template": template, "max_prompt_tokens": max_prompt_tokens, "written_by": "minillm-rl train"})


def recorded_template(model_dir: str | os.PathLike) -> tuple[str, str] | None:
    """``(template, where it is recorded)`` of a model directory, or ``None`` when nothing says."""
    model_dir = Path(model_dir)
    record = model_dir / PROMPT_RECORD
    if record.is_file():
        try:
            template = json.loads(record.read_text(encoding="utf-8"))["template"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{record}: unreadable; expected {{\"template\": one of {list(TEMPLATES)}}}") from None
        return str(template), str(record)
    run_config = model_dir.parent / "config.yaml"
    if model_dir.name in RUN_MODEL_DIRS and run_config.is_file():
        try:
            config = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
            template = config["data"]["template"]
        except (yaml.YAMLError, KeyError, TypeError):
            return None
        return str(template), f"{run_config} (data.template)"
    return None


def resolve_eval_template(model_dir: str, requested: str | None, force: bool) -> tuple[str, str]:
    """``(template, one line saying where it came from)`` for evaluating ``model_dir``.

    The recorded template wins; a ``requested`` one that contradicts it is refused (``ValueError``)
    unless ``force``. Without a record: ``requested``, else the default."""
    recorded = recorded_template(model_dir)
    if recorded is None:
        if requested is None:
            return DEFAULT_TEMPLATE, (f"template: {DEFAULT_TEMPLATE} (the default; {model_dir} records no "
                                      f"template: pass --template if it was trained with another)")
        return requested, f"template: {requested} (--template)"
    template, where = recorded
    if requested is None or requested == template:
        return template, f"template: {template} (recorded in {where})"
    if not force:
        raise ValueError(f"--template {requested}: {model_dir} was trained with template '{template}' (recorded in "
                         f"{where}); leave --template out, or add --force-template to evaluate with '{requested}'")
    return requested, f"template: {requested} (--force-template; {model_dir} was trained with '{template}')"
