"""The run config: spec defaults, recipe + overrides, round trip, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

from minillm_rl.config import ConfigError, RunConfig, build_config, load_config

REQUIRED = ["model.student=student_dir", "model.teacher=teacher_dir", "data.train=train.jsonl"]

RECIPE = """\
model:
  student: student_dir
  teacher: teacher_dir
data:
  train: train.jsonl
sampling:
  alpha: 0.1
  top_p: 0.9
train:
  phases: [sft, minillm]
  num_rollouts: 64
  micro_batch_size: 8
  optim:
    lr: 1e-5
"""


def write(tmp_path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_defaults_are_the_reference_values():
    cfg = RunConfig()
    assert (cfg.train.optim.lr, cfg.train.optim.betas, cfg.train.optim.weight_decay) == (5e-6, (0.9, 0.95), 1e-6)
    assert (cfg.train.optim.warmup_steps, cfg.train.optim.lr_schedule, cfg.train.optim.grad_clip) == (
        100, "constant", 1.0)
    assert (cfg.sampling.alpha, cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.top_p) == (
        0.2, 1.0, 0, 1.0)
    assert (cfg.sampling.max_new_tokens, cfg.data.max_prompt_tokens, cfg.data.max_length) == (256, 256, 512)
    assert (cfg.advantage.gamma, cfg.advantage.reward_scaling, cfg.advantage.reward_clip) == (0.95, 0.5, 100.0)
    assert (cfg.advantage.baseline, cfg.advantage.length_normalize, cfg.advantage.include_current_reward) == (
        "whiten", True, True)
    assert (cfg.loss.clip_eps, cfg.loss.lm_coef, cfg.loss.kd_ratio, cfg.loss.single_step_weighted) == (
        0.2, 1.0, 0.5, False)
    assert (cfg.train.num_rollouts, cfg.train.ppo_epochs, cfg.train.micro_batch_size) == (256, 4, 16)
    assert (cfg.train.total_steps, cfg.train.eval_interval, cfg.data.num_validation) == (5000, 100, 1000)
    assert (cfg.sft.optim.lr, cfg.sft.optim.lr_schedule, cfg.sft.num_epochs, cfg.sft.batch_size) == (
        5e-5, "cosine", 10, 32)
    assert (cfg.eval.test_seeds, cfg.eval.no_repeat_ngram_size) == (5, 6)
    assert cfg.runtime.max_staleness == 0


def test_advantage_section_matches_the_advantages_module():
    from minillm_rl.algorithm.advantages import AdvantageConfig

    section = dataclasses.asdict(RunConfig().advantage)
    assert AdvantageConfig(**section) == AdvantageConfig()


def test_recipe_then_overrides(tmp_path):
    path = write(tmp_path, RECIPE)
    cfg = load_config(path, ["sampling.alpha=0.3", "train.phases=[kd]", "sft.optim.lr=2e-5",
                             "runtime.ray_address=10.0.0.1:6379"])
    assert cfg.sampling.alpha == 0.3  # the override beats the recipe
    assert cfg.sampling.top_p == 0.9  # the recipe beats the default
    assert cfg.train.phases == ["kd"]
    assert cfg.train.optim.lr == 1e-5 and isinstance(cfg.train.optim.lr, float)  # "1e-5" is a YAML string
    assert cfg.train.optim.warmup_steps == 100
    # A partly overridden nested section keeps its own defaults, not the class defaults.
    assert (cfg.sft.optim.lr, cfg.sft.optim.lr_schedule, cfg.sft.optim.warmup_steps) == (2e-5, "cosine", 0)
    assert cfg.runtime.ray_address == "10.0.0.1:6379"


def test_int_is_accepted_where_a_float_is_expected():
    cfg = load_config(None, REQUIRED + ["advantage.gamma=1", "sampling.temperature=2"])
    assert cfg.advantage.gamma == 1.0 and isinstance(cfg.advantage.gamma, float)
    assert isinstance(cfg.sampling.temperature, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, RECIPE), ["train.optim.betas=[0.8, 0.99]", "data.pretrain_corpus=[a.txt]"])
    dumped = tmp_path / "config.yaml"
    cfg.save(dumped)
    again = load_config(str(dumped), [])
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert build_config(cfg.to_dict(), "<dict>") == cfg
    assert again.train.optim.betas == (0.8, 0.99)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sampling.alpah=0.3", "override 'sampling.alpah=0.3': unknown key 'sampling.alpah'; "
                               "did you mean 'sampling.alpha'?"),
        ("sampling.alpha=1.5", "sampling.alpha: must be in [0.0, 1.0], got 1.5"),
        ("sampling.alpha=-0.1", "sampling.alpha: must be in [0.0, 1.0], got -0.1"),
        ("train.optim.lr=-1e-5", "train.optim.lr: must be > 0.0, got -1e-05"),
        ("sampling.temperature=0", "sampling.temperature: must be > 0.0"),
        ("sampling.top_p=0", "sampling.top_p: must be in (0.0, 1.0]"),
        ("sampling.top_p=nan", "sampling.top_p: expected a finite number"),
        ("sampling.top_k=1.5", "sampling.top_k: expected int, got 1.5 (float)"),
        ("loss.single_step=1", "loss.single_step: expected bool, got 1 (int)"),
        ("train.ppo_epochs=true", "train.ppo_epochs: expected int, got True (bool)"),
        ("advantage.baseline=whitten", "advantage.baseline: expected one of 'whiten', 'constant', 'none', "
                                       "got 'whitten'; did you mean 'whiten'?"),
        ("train.phases=[sft, minilm]", "train.phases[1]: expected one of 'sft', 'kd', 'seqkd', 'minillm'"),
        ("train.phases=[]", "train.phases: must name at least one phase"),
        ("train.phases=[sft, sft]", "train.phases: each phase may appear once"),
        ("train.optim.betas=[0.9]", "train.optim.betas: expected a list of 2 values"),
        ("sampling=3", "sampling: expected a mapping of fields, got 3"),
        ("sampling.alpha.low=1", "sampling.alpha: expected float"),
        ("model.student=", "model.student: expected str, got None"),
        ("train.micro_batch_size=24", "train.micro_batch_size: must divide train.num_rollouts (256), got 24"),
        ("runtime.replay_max_samples=128", "runtime.replay_max_samples: must be >= train.num_rollouts (256)"),
        ("runtime.ray_address=cluster", "runtime.ray_address: expected 'local', 'auto', 'host:port'"),
        ("sampling.max_new_tokens=300", "sampling.max_new_tokens: must be <= data.max_length - "
                                        "data.max_prompt_tokens (256), got 300"),
        ("sampling.teacher_dist=none", "sampling.teacher_dist: is 'none' but loss.single_step is on"),
        ("output.resume=/no/such/ckpt", "output.resume: expected 'none', 'auto' or an existing checkpoint path"),
        ("runtime.deepspeed_config=/no/such.json", "runtime.deepspeed_config: file not found: /no/such.json"),
        ("nonsense", "override 'nonsense': expected key.sub=value"),
        ("sampling.alpha=[1", "override 'sampling.alpha=[1': the value is not valid YAML"),
    ],
)
def test_bad_override_is_one_line_error(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if "=" in override:
        assert message.startswith(f"override {override!r}: ")


@pytest.mark.parametrize("overrides, expected", [
    (["train.phases=[sft]"], "data.pretrain_corpus: feeds the minillm phase's PT term only"),
    (["loss.lm_coef=0"], "data.pretrain_corpus: is set but loss.lm_coef is 0"),
    (["loss.single_step=false", "sampling.teacher_dist=none"],
     "sampling.teacher_dist: is 'none' but the PT term mixes in the teacher (loss.kd_ratio > 0)"),
])
def test_pt_corpus_settings_that_cannot_work_are_refused(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + ["data.pretrain_corpus=[corpus.txt]", *overrides])
    assert expected in str(info.value) and "\n" not in str(info.value)
    # A plain LM term needs no teacher distribution.
    cfg = load_config(None, REQUIRED + ["data.pretrain_corpus=[corpus.txt]", "loss.single_step=false",
                                        "sampling.teacher_dist=none", "loss.kd_ratio=0"])
    assert cfg.data.pretrain_corpus == ["corpus.txt"]


def test_unknown_key_in_recipe_names_file_line_and_hint(tmp_path):
    path = write(tmp_path, RECIPE.replace("  top_p: 0.9", "  topp: 0.9"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml:8: unknown key 'sampling\.topp'; "
                                          r"did you mean 'sampling\.top_p'\?$"):
        load_config(path, [])


def test_unknown_section_hint_or_known_sections(tmp_path):
    path = write(tmp_path, RECIPE + "trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:15: unknown key 'trainer'; did you mean 'train'\?$"):
        load_config(path, [])
    path = write(tmp_path, RECIPE + "zzz: 1\n")
    with pytest.raises(ConfigError, match=r"recipe\.yaml:15: unknown key 'zzz'; known keys: model, data, sampling"):
        load_config(path, [])


def test_bad_value_in_recipe_names_its_line(tmp_path):
    path = write(tmp_path, RECIPE.replace("alpha: 0.1", "alpha: 2"))
    with pytest.raises(ConfigError, match=r"recipe\.yaml:7: sampling\.alpha: must be in \[0\.0, 1\.0\], got 2\.0"):
        load_config(path, [])


def test_required_fields():
    with pytest.raises(ConfigError, match=r"<defaults>: model\.student: required"):
        load_config(None, [])
    with pytest.raises(ConfigError, match=r"model\.teacher: required by phase\(s\) minillm"):
        load_config(None, ["model.student=s", "data.train=t.jsonl"])
    sft_only = load_config(None, ["model.student=s", "data.train=t.jsonl", "train.phases=[sft]"])
    assert sft_only.model.teacher == ""


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"sampling:\n  alpha: [0.1\n", r"recipe\.yaml:\d+: invalid YAML"),
        (b"- a\n- b\n", r"recipe\.yaml: expected a mapping of sections at the top level, got list"),
        (b"sampling:\n  alpha: \xff\n", r"recipe\.yaml: not UTF-8 text"),
    ],
)
def test_unreadable_recipe(tmp_path, content, expected):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path), REQUIRED)


def test_missing_and_empty_recipe(tmp_path):
    with pytest.raises(ConfigError, match=r"no_such\.yaml: recipe file not found"):
        load_config(str(tmp_path / "no_such.yaml"), REQUIRED)
    assert load_config(write(tmp_path, ""), REQUIRED).sampling.alpha == 0.2


def test_world_size_must_split_the_round():
    cfg = load_config(None, REQUIRED + ["train.num_rollouts=64", "train.micro_batch_size=16"])
    cfg.check_world_size(4)
    with pytest.raises(ConfigError, match=r"train\.num_rollouts=64 must be a multiple of world_size \(3\)"):
        cfg.check_world_size(3)


def test_deepspeed_file_must_agree_with_recipe(tmp_path):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"gradient_clipping": "auto", "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, REQUIRED + [f"runtime.deepspeed_config={ds_path}"])
    assert cfg.runtime.deepspeed_config == str(ds_path)
    ds_path.write_text(json.dumps({"gradient_clipping": 0.5}))
    contradiction = r"train\.optim\.grad_clip: is 1\.0 but .*ds\.json sets gradient_clipping=0\.5"
    with pytest.raises(ConfigError, match=contradiction):
        load_config(None, REQUIRED + [f"runtime.deepspeed_config={ds_path}"])
    ds_path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"runtime\.deepspeed_config: .*ds\.json is not valid JSON"):
        load_config(None, REQUIRED + [f"runtime.deepspeed_config={ds_path}"])


def test_validation_protocol_is_the_training_sampling_or_the_test_protocol():
    """``eval.validation`` picks how checkpoint-selection texts are sampled (one seed either way)."""
    from types import SimpleNamespace

    from minillm_rl.runtime.selection import validation_config

    cfg = load_config(None, [*REQUIRED, "sampling.top_k=7", "sampling.max_new_tokens=32", "eval.max_new_tokens=48",
                             "eval.no_repeat_ngram_size=5"])
    sampling = validation_config(SimpleNamespace(cfg=cfg))
    assert (sampling.top_k, sampling.no_repeat_ngram_size, sampling.max_new_tokens) == (7, 0, 32)
    test = validation_config(SimpleNamespace(cfg=load_config(None, [*REQUIRED, "eval.validation=test",
                                                                    "eval.max_new_tokens=48",
                                                                    "eval.no_repeat_ngram_size=5"])))
    assert (test.temperature, test.top_k, test.no_repeat_ngram_size, test.max_new_tokens) == (1.0, 0, 5, 48)
    assert sampling.seeds == test.seeds == (cfg.train.seed,)


@pytest.mark.parametrize("extra, key, line, first", [
    ("sampling:\n  alpha: 0.5\n", "sampling", 15, 6),      # a section given twice
    (None, "alpha", 8, 7),                                  # a field given twice inside one section
])
def test_duplicate_key_is_refused_naming_both_lines(tmp_path, extra, key, line, first):
    text = RECIPE + extra if extra else RECIPE.replace("  alpha: 0.1\n", "  alpha: 0.1\n  alpha: 0.4\n")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, [])
    assert str(info.value) == f"{path}: key '{key}' at line {line} repeats line {first}"


def test_same_key_in_different_sections_and_merge_keys_are_not_duplicates(tmp_path):
    text = RECIPE + "sft:\n  optim:\n    lr: 2.0e-5\n"
    cfg = load_config(write(tmp_path, text), [])
    assert cfg.sft.optim.lr == 2e-5 and cfg.train.optim.lr == 1e-5  # 'optim' and 'lr' in two sections
    # A key overriding one brought in by a YAML merge key (<<) is what merging is for: the loader
    # accepts it (the recipe then fails only on the anchor's own unknown section).
    merged = RECIPE.replace("train:\n", "x_base: &base\n  lr: 3.0e-5\ntrain:\n").replace(
        "  optim:\n    lr: 1e-5\n", "  optim:\n    <<: *base\n    lr: 4.0e-5\n")
    with pytest.raises(ConfigError, match="unknown key 'x_base'"):
        load_config(write(tmp_path, merged), [])
