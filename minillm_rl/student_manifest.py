"""``student_manifest.json``: what a student directory written by ``minillm-rl init-student`` is.

The manifest records the teacher it was pruned from, the teacher layers it kept, the healing (corpus,
tokens, held-out NLL before/after and the teacher's) and a SHA-256 of every weight file. It is written
last, inside the staged directory that is renamed into place, so a student directory with a manifest
is complete. Loading a directory that has one (:func:`check_student_manifest`, called by
:func:`minillm_rl.models.check_model_files`) refuses it in one line when the directory no longer is
what the manifest describes: weights edited or replaced, a different number of layers. Directories
without a manifest (training outputs such as ``best/``, hub models) are not checked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from minillm_rl.tracking import atomic_write_json, file_sha256

MANIFEST_NAME = "student_manifest.json"
MANIFEST_FORMAT = "minillm-rl student"
MANIFEST_VERSION = 1
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The directory's weight files (``*.safetensors``, ``*.bin``), sorted by name."""
    model_dir = Path(model_dir)
    return sorted({path for pattern in _WEIGHT_PATTERNS for path in model_dir.glob(pattern) if path.is_file()})



def weight_checksums(model_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{file name: {"sha256", "bytes"}}`` of every weight file of ``model_dir``."""
    return {path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
            for path in weight_files(model_dir)}


def write_student_manifest(model_dir: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the format, the layer count and the weights' checksums to ``manifest`` (which must give
    ``layers_kept``) and write it atomically into ``model_dir``, after the weights. Returns what
    was written."""
    if "layers_kept" not in manifest:
        raise ValueError("student manifest: 'layers_kept' is required")
    payload = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **manifest,
               "num_layers": len(manifest["layers_kept"]), "weights": weight_checksums(model_dir)}
    atomic_write_json(Path(model_dir) / MANIFEST_NAME, payload)
    return payload


def read_student_manifest(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``model_dir``, or None when it has none; a manifest that is not one (bad
    JSON, another format or version) is refused in one line."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable student manifest ({err}); expected the JSON written by "
                         "`minillm-rl init-student`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a student manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r}); "
                         f"expected format {MANIFEST_FORMAT!r}")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: student manifest version {manifest.get('version')!r}; this minillm-rl reads "
                         f"version {MANIFEST_VERSION}")
    return manifest


def _config_num_layers(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).num_hidden_layers


def check_student_manifest(model_dir: str | os.PathLike) -> None:
    """Refuse ``model_dir`` when its manifest does not describe it: the config's layer count is not
    the number of layers kept, or the weight files (names, sizes, SHA-256) differ. No manifest: no
    check. The first difference is named in the one-line ``ValueError``."""
    model_dir = Path(model_dir)
    manifest = read_student_manifest(model_dir)
    if manifest is None:
        return
    where = f"{model_dir / MANIFEST_NAME} does not match {model_dir}"
    remedy = "re-create the student with `minillm-rl init-student`, or remove the manifest if the change is intended"
    num_layers = _config_num_layers(model_dir)
    if num_layers != manifest["num_layers"]:
        raise ValueError(f"{where}: config.json has {num_layers} layers, the manifest {manifest['num_layers']} "
                         f"(teacher layers {manifest['layers_kept']}); {remedy}")
    recorded = manifest["weights"]
    present = {path.name: path for path in weight_files(model_dir)}
    if set(present) != set(recorded):
        raise ValueError(f"{where}: weight files {sorted(present)} on disk, {sorted(recorded)} in the manifest; "
                         f"{remedy}")
    for name, path in present.items():
        if path.stat().st_size != recorded[name]["bytes"] or file_sha256(path) != recorded[name]["sha256"]:
            raise ValueError(f"{where}: {name} differs from the weights the manifest recorded (SHA-256); {remedy}")
