"""``minillm-rl``: argument parsing only; every subcommand calls a library function.

User errors (bad files, fields, values) are ``ValueError``s with a one-line message; they are
printed as ``minillm-rl: error: ...`` with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _demo(args: argparse.Namespace) -> None:
    from minillm_rl.demo import DemoSettings, run_demo

    overrides = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        field_types = {f.name: f.type for f in dataclasses.fields(DemoSettings)}
        if key not in field_types:
            raise ValueError(f"--set {item}: unknown demo setting {key!r}; expected one of {sorted(field_types)}")
        overrides[key] = {"int": int, "float": float, "str": str}[field_types[key]](value)
    run_demo(args.out, DemoSettings(**overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm-rl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="SmolLM2 teacher → pruned student: SFT, MiniLLM, evaluation (CPU)")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--set", action="append", metavar="KEY=VALUE",
                      help="override a demo setting, e.g. --set sft_steps=60 (repeatable)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"minillm-rl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
