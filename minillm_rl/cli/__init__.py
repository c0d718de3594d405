"""``minillm-rl``: argument parsing only; every subcommand calls a library function.

User errors (bad files, fields, values) are ``ValueError``s with a one-line message; they are
printed as ``minillm-rl: error: ...`` with exit code 2, never as a traceback; run-time failures
(``RunFailed``, timeouts) as ``minillm-rl: run failed: ...`` with exit code 1 (see :mod:`minillm_rl.errors`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path

from minillm_rl.errors import EXIT_BAD_INPUT, EXIT_FAILED, RunFailed

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # models.DTYPES' keys, without importing torch to parse
# init-student's --heal-<name> flags that set healing.HealSettings.<name> when given.
HEAL_SETTING_FLAGS = ("block_size", "batch_size", "lr", "kd_ratio", "validation_blocks", "teacher_dtype",
                      "eval_every_tokens")


def _eval(args: argparse.Namespace) -> None:
    from minillm_rl.data.prompt_record import resolve_eval_template
    from minillm_rl.evaluation.protocol import EvalConfig, check_eval_out_dir, evaluate_on_data, metrics_table
    from minillm_rl.evaluation.stats import BootstrapConfig

    check_eval_out_dir(args.out, args.overwrite)
    template, template_source = resolve_eval_template(args.model, args.template, args.force_template)
    print(template_source, flush=True)
    cfg = EvalConfig.test(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seeds=args.seeds)
    cfg = dataclasses.replace(cfg, temperature=args.temperature, no_repeat_ngram_size=args.no_repeat_ngram_size)
    bootstrap = BootstrapConfig(resamples=args.bootstrap_resamples, seed=args.bootstrap_seed)
    result = evaluate_on_data(args.model, args.data, args.out, cfg, template, args.max_prompt_tokens,
                              args.num_examples, args.split, args.dtype, args.device, args.gguf_file,
                              args.teacher, args.teacher_gguf_file, bootstrap)
    print(metrics_table(result))
    print(f"Rouge-L {result.rouge_l:.2f} ± {result.rouge_l_std:.2f}, exact match {result.exact_match:.2f} "
          f"({result.num_examples} examples, seeds {list(cfg.seeds)}) -> {args.out}")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, e.g. 0,1,29; got {text!r}") from None


def _init_student(args: argparse.Namespace) -> None:
    corpus_given = bool(args.heal_corpus) or args.heal_instructions is not None
    if args.heal_tokens == 0 and corpus_given:
        raise ValueError("--heal-corpus / --heal-instructions need --heal-tokens N > 0 (the healing budget)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: expected >= 1")
    import torch

    from minillm_rl.data.healing_corpus import CorpusSource
    from minillm_rl.healing import HealSettings, init_student
    from minillm_rl.models import torch_dtype
    from minillm_rl.student_manifest import read_student_manifest

    heal = corpus = None
    if args.heal_tokens:
        # Flags left out keep the HealSettings defaults (one place for them).
        given = {name: getattr(args, f"heal_{name}") for name in HEAL_SETTING_FLAGS} | {"seed": args.seed}
        heal = HealSettings(tokens=args.heal_tokens, **{name: value for name, value in given.items() if value is not None})
        corpus = CorpusSource(text=tuple(args.heal_corpus or ()), instructions=args.heal_instructions,
                              template=args.heal_template, reserved_examples=args.heal_reserved_examples)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    interval = {} if args.heal_checkpoint_minutes is None else {"checkpoint_interval_s": 60 * args.heal_checkpoint_minutes}
    layers = args.keep_layers if args.keep_layers is not None else args.layers
    if args.cache:
        if heal is None or args.keep_layers is not None or args.gguf_file or args.dtype != "float32":
            raise ValueError("--cache keeps healed float32 students chosen by --layers and --select: give --heal-tokens "
                             "and a corpus, and no --keep-layers, --gguf-file or --dtype")
        from minillm_rl.healing import healed_student
        from minillm_rl.models import cache_dir

        out = healed_student(args.teacher, cache_dir(), f"{Path(args.teacher).name}-student", layers, heal, corpus,
                             args.select)
    else:
        out = init_student(args.teacher, layers, args.out, gguf_file=args.gguf_file, dtype=torch_dtype(args.dtype),
                           heal=heal, corpus=corpus, select=args.select, **interval)
    kept = read_student_manifest(out)["layers_kept"]
    print(f"student with {len(kept)} layers (teacher layers {kept}) written to {out}" +
          (" (healed; see student_manifest.json)" if heal else " (train it with SFT before use)"))
    if args.cache:
        print(out)  # the last line: the directory, for scripts (`student=$(minillm-rl init-student ... | tail -1)`)


def _train(args: argparse.Namespace) -> int:
    from minillm_rl.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    resume = args.resume if args.resume is not None else cfg.output.resume
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    inputs = None
    if not launched:
        # Bad input is refused here, before any rank starts and before anything is written;
        # under a launcher every rank is a CLI process and checks the same in TrainingRun.
        from minillm_rl.runtime.inputs import check_run_inputs
        from minillm_rl.tracking import log_line

        inputs = check_run_inputs(cfg, resume, cfg.runtime.num_learners, args.overwrite, log_line)
        if cfg.runtime.num_learners > 1:
            from minillm_rl.cli.launch import relaunch_under_deepspeed

            return relaunch_under_deepspeed(cfg.runtime.num_learners, sys.argv[1:], cfg.output.dir)
    from minillm_rl.runtime.coordinator import run_training
    from minillm_rl.runtime.failure import rank_failures

    with rank_failures(cfg.output.dir, int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))):
        return run_training(cfg, resume, inputs, args.overwrite)


def _prepare_data(args: argparse.Namespace) -> None:
    from minillm_rl.data.prepared import PrepareSettings, format_counts, prepare_dataset
    from minillm_rl.models import load_tokenizer

    settings = PrepareSettings(template=args.template, max_prompt_tokens=args.max_prompt_tokens,
                               max_length=args.max_length, num_validation=args.num_validation,
                               split_seed=args.split_seed, split=args.split, skip_bad_records=args.skip_bad_records)
    manifest = prepare_dataset(args.data, load_tokenizer(args.tokenizer), args.tokenizer, args.out, settings,
                               args.pretrain_corpus or (), args.block_size, overwrite=args.overwrite)
    print(format_counts(manifest))
    print(f"prepared dataset written to {args.out} (use it as data.train in a recipe)")


def _report(args: argparse.Namespace) -> None:
    from minillm_rl.evaluation.report import build_report

    report = build_report(args.runs, args.out, baseline=args.baseline)
    print(report.table)
    for table in (report.metrics_table, report.differences_table):
        if table:
            print(table)
    print(f"report: {report.report_path}" + (f"  curves: {report.curves_path}" if report.curves_path else
                                             "  (no curves: none of the directories is a train run)"))


def _plan(args: argparse.Namespace) -> None:
    import json

    from minillm_rl.cli.plan import build_plan, execute, placeholder_cluster, read_hostfile, render_text

    cluster = read_hostfile(args.hostfile) if args.hostfile else placeholder_cluster(args.nodes, args.gpus_per_node)
    overrides, advice = list(args.overrides), None
    if args.balance and not args.calibrate:
        raise ValueError("--balance sizes the rollout workers from measured rates: give --calibrate RUN_DIR")
    if args.calibrate:
        from minillm_rl.config import load_config
        from minillm_rl.runtime.balance import advice_from_run

        advice, _ = advice_from_run(args.calibrate)
        if args.balance:  # the last recipe's learner count, with the calibrated rate per learner rank
            learners = load_config(args.config[-1], overrides).runtime.num_learners
            overrides.append(f"runtime.num_rollout_workers={advice.workers_for(learners)}")
    plan = build_plan(args.config, overrides, cluster, args.eval_split, args.eval_data)
    if advice is not None:
        plan["balance"] = {"calibrated_from": args.calibrate, **dataclasses.asdict(advice),
                           "applied": bool(args.balance)}
    text = json.dumps(plan, indent=2, default=str) if args.json else render_text(plan)
    if advice is not None and not args.json:
        text += (f"\nbalance (measured in {args.calibrate}): {advice.summary()}"
                 + ("; applied to the last recipe (runtime.num_rollout_workers)" if args.balance else
                    "; --balance sizes the last recipe's rollout workers by it"))
    print(text, flush=True)
    if args.execute:
        execute(plan, args.log_dir)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, as argparse's formatter does, except where the help
    text already states it or there is none to show (``None``, a flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm-rl", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # put first by the deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)
    # Every subcommand's --help shows its defaults.
    sub.add_parser = functools.partial(sub.add_parser, formatter_class=DefaultsHelpFormatter)

    ev = sub.add_parser("eval", help="generate on instruction data; Rouge-L, exact match, answer statistics and "
                                     "(with --teacher) distillation metrics, with bootstrap intervals")
    ev.add_argument("--model", required=True, help="HF model directory, hub name, or GGUF directory")
    ev.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    ev.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype the models are loaded in")
    ev.add_argument("--device", default="auto", help="auto (a GPU when one is visible), cpu, cuda or cuda:N")
    ev.add_argument("--data", required=True, help="jsonl / json file, 'sharegpt', or a datasets name/dir")
    ev.add_argument("--out", required=True,
                    help="new (or empty) directory for results.json, answers.jsonl, results.md")
    ev.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out")
    ev.add_argument("--split", default="test", help="dataset split for datasets sources")
    ev.add_argument("--template", default=None, choices=["minillm", "chat"],
                    help="prompt template (default: the one recorded with the model by `minillm-rl train`, else "
                         "minillm); one contradicting the record is refused")
    ev.add_argument("--force-template", action="store_true",
                    help="evaluate with --template even though the model records another")
    ev.add_argument("--num-examples", type=int, default=None, help="evaluate the first N examples (default: all)")
    ev.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts over this are dropped (counted)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="longest answer")
    ev.add_argument("--batch-size", type=int, default=16, help="prompts generated together")
    ev.add_argument("--seeds", type=int, nargs="+", default=[10, 20, 30, 40, 50], help="sampling seeds")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    ev.add_argument("--no-repeat-ngram-size", type=int, default=6,
                    help="no n-gram of this size repeats in an answer (0 = off)")
    ev.add_argument("--teacher", default=None,
                    help="teacher (HF directory, hub name, or GGUF directory) for the reverse KL, teacher NLL and "
                         "teacher-answer metrics; same tokenizer as --model")
    ev.add_argument("--teacher-gguf-file", default=None, help="GGUF file name inside --teacher")
    ev.add_argument("--bootstrap-resamples", type=int, default=1000, help="resamples of the intervals (>= 100)")
    ev.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")
    ev.set_defaults(func=_eval)

    train = sub.add_parser("train", help="run a recipe's phases (SFT, MiniLLM) with Ray workers and DeepSpeed learners")
    train.add_argument("--config", required=True, help="recipe YAML (see launch/recipes/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. sampling.alpha=0.3")
    train.add_argument("--resume", default=None, help="auto | none | a checkpoint path (default: output.resume)")
    train.add_argument("--overwrite", action="store_true",
                       help="start over in an output.dir that holds a previous run, deleting its files")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config (recipe + overrides) as YAML and exit; starts nothing")
    train.set_defaults(func=_train)

    init = sub.add_parser("init-student", help="a student made of some of the teacher's layers (by default the most "
                                               "influential), optionally healed by word-level distillation from the "
                                               "teacher on plain text")
    init.add_argument("--teacher", required=True, help="HF model directory, hub name, or GGUF directory")
    init.add_argument("--gguf-file", default=None, help="GGUF file name inside --teacher")
    layers = init.add_mutually_exclusive_group(required=True)
    layers.add_argument("--layers", type=int, help="number of layers to keep (which ones: --select)")
    layers.add_argument("--keep-layers", type=_layer_list, metavar="I,J,...",
                        help="exactly these teacher layers (0-based indices, comma-separated)")
    init.add_argument("--select", default="influence", choices=["influence", "even"],
                      help="with --layers: 'influence' keeps the layers that change the residual stream most on the "
                           "healing corpus's held-out text (block influence; needs healing), 'even' evenly spaced "
                           "ones, first and last kept (default: influence)")
    init.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                      help="dtype the student is saved in (and the teacher loaded in without healing)")
    out = init.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", help="new directory for the student")
    out.add_argument("--cache", action="store_true",
                     help="keep the healed student in the user cache ($MINILLM_RL_CACHE, default ~/.cache/minillm_rl), "
                          "keyed by its settings: built once (an interrupted build resumes), then reused; the last "
                          "line printed is its directory")
    heal = init.add_argument_group("healing", "word-level distillation from the teacher on plain text (see docs/prune-and-heal.md)")
    heal.add_argument("--heal-tokens", type=int, default=0,
                      help="healing budget in training tokens (0, the default: no healing)")
    source = heal.add_mutually_exclusive_group()
    source.add_argument("--heal-corpus", nargs="+", metavar="FILE", help="plain-text files / directories of *.txt")
    source.add_argument("--heal-instructions", metavar="SOURCE",
                        help="instruction data whose prompt + response texts are the corpus: 'sharegpt', jsonl, json "
                             "or a datasets name/dir")
    heal.add_argument("--heal-template", default="chat", choices=["minillm", "chat"],
                      help="prompt template of --heal-instructions (default: chat)")
    heal.add_argument("--heal-reserved-examples", type=int, default=0,
                      help="leave out the first N examples of --heal-instructions and every later one repeating their "
                           "prompts (keep them for evaluation; default 0)")
    heal.add_argument("--heal-block-size", type=int, default=None, help="tokens per block (default 256)")
    heal.add_argument("--heal-batch-size", type=int, default=None, help="blocks per optimizer step (default 8)")
    heal.add_argument("--heal-lr", type=float, default=None, help="peak lr; 5%% warm-up, cosine to 0 (default 3e-4)")
    heal.add_argument("--heal-kd-ratio", type=float, default=None,
                      help="weight of the soft CE to the teacher; 1 - it goes to next-token CE (default 1)")
    heal.add_argument("--heal-validation-blocks", type=int, default=None,
                      help="held-out blocks for the NLL before/after (never trained on; default 32)")
    heal.add_argument("--heal-teacher-dtype", default=None, choices=DTYPE_NAMES,
                      help="dtype the teacher scores the blocks in (default float32)")
    heal.add_argument("--heal-eval-every-tokens", type=int, default=None,
                      help="held-out NLL every N training tokens, into the manifest's curve (default 0: before/after)")
    heal.add_argument("--heal-checkpoint-minutes", type=float, default=None,
                      help="checkpoint into OUT.healing/ every N minutes of training; the same command resumes it "
                           "(default 10)")
    heal.add_argument("--seed", type=int, default=None, help="document order, held-out choice, block order (default 0)")
    heal.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    init.set_defaults(func=_init_student)

    prep = sub.add_parser("prepare-data", help="split + tokenise instruction data once into a versioned dataset dir")
    prep.add_argument("--data", required=True, help="jsonl / json file, 'sharegpt', or a datasets name/dir")
    prep.add_argument("--tokenizer", required=True, help="the student's model directory (or hub name)")
    prep.add_argument("--out", required=True, help="new directory for the prepared dataset")
    prep.add_argument("--split", default="train", help="dataset split for datasets sources (default: train)")
    prep.add_argument("--template", default="minillm", choices=["minillm", "chat"], help="prompt template")
    prep.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts over this are dropped (counted)")
    prep.add_argument("--max-length", type=int, default=512, help="prompt + response token budget")
    prep.add_argument("--num-validation", type=int, default=1000, help="examples held out for validation")
    prep.add_argument("--split-seed", type=int, default=0, help="seed of the validation split")
    prep.add_argument("--skip-bad-records", action="store_true", help="count malformed records instead of failing")
    prep.add_argument("--pretrain-corpus", nargs="+", default=None, metavar="FILE", help="plain-text PT files/dirs")
    prep.add_argument("--block-size", type=int, default=None, help="tokens per PT block")
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (once the new one is done)")
    prep.set_defaults(func=_prepare_data)

    rep = sub.add_parser("report", help="comparison table (report.md) + training curves (curves.png) of runs")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run or eval directory, or NAME=DIR")
    rep.add_argument("--out", default="runs/report", help="output directory")
    rep.add_argument("--baseline", default=None, metavar="NAME",
                     help="the run name the paired differences are taken against (default: the first name)")
    rep.set_defaults(func=_report)

    plan = sub.add_parser("plan", help="roles, GPUs, memory per GPU and exact commands of recipes run in order "
                                       "(no GPU, no weights); --execute runs them")
    plan.add_argument("--config", required=True, action="append",
                      help="recipe YAML; repeat for stages run in order (e.g. teacher SFT, then the student)")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the last --config")
    plan.add_argument("--nodes", type=int, default=1, help="nodes (without --hostfile; default 1)")
    plan.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (without --hostfile; 0 = CPU)")
    plan.add_argument("--hostfile", default=None, help="DeepSpeed hostfile ('HOST slots=N' lines)")
    plan.add_argument("--eval-split", default=None,
                      help="add a test stage: `minillm-rl eval` of the last recipe's best/ on this split")
    plan.add_argument("--eval-data", default=None, help="test data (default: the last recipe's data.train)")
    plan.add_argument("--calibrate", default=None, metavar="RUN_DIR",
                      help="a minillm-rl train output directory: print how many rollout workers balance the learners, "
                           "from its measured generation and learning rates")
    plan.add_argument("--balance", action="store_true",
                      help="with --calibrate: give the last recipe that many rollout workers (per its learner count)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--execute", action="store_true", help="run the plan's commands after printing it")
    plan.add_argument("--log-dir", default="runs/plan-logs", help="logs of commands run on other hosts")
    plan.set_defaults(func=_plan)
    return parser


def quiet_progress_bars_off_a_terminal() -> None:
    """Progress bars redraw one line with carriage returns: fine on a terminal, hundreds of kilobytes
    of frames in a log file (CI, Slurm, ``tee``). Off a terminal, the libraries' bars (tqdm's,
    Hugging Face's, ``datasets``') are switched off through their environment variables, which the
    ranks and Ray workers inherit; our own progress is whole lines (:class:`~minillm_rl.tracking.ProgressLine`)."""
    if sys.stderr.isatty():
        return
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(variable, "1")
    # The libraries read those variables once, at import: one already imported here (a bench script
    # imports them before parsing its arguments) is switched off through its own call.
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_progress_bars_off_a_terminal()
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ValueError as err:
        print(f"minillm-rl: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RunFailed, TimeoutError) as err:
        if not getattr(err, "reported_elsewhere", False):  # a rank's failure, reported by the launching process
            print(f"minillm-rl: run failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    return code or 0

