"""The `dsg` command line.

Each subcommand lives in its own module, which provides `configure_parser(parser)` and
`run(args) -> int | None`. Command modules import their heavy dependencies (torch, sae-lens, ...)
inside `run`, so building the parser stays quick.
A `DSGError` (bad input) ends in one `dsg: error: ...` line and exit code 2 (a message that spans lines is
joined into one). A command's `--device` is checked before the command runs.
`python -m modeling_dsg` is the same command line, so launchers can start it over several processes
(`torchrun --nproc_per_node N -m modeling_dsg build ...`); only the commands in `MULTI_PROCESS` (build, eval)
accept that.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util  # not implied by `import importlib` (an editable install's finder imports it)
import os
import sys

from . import distributed
from .errors import DSGError

# name -> (module, one-line help)
COMMANDS = {
    "train-sae": ("modeling_dsg.pipelines.train_sae", "train an SAE on one layer of a model (sae-lens format out)"),
    "build": ("modeling_dsg.pipelines.build", "build an unlearned DSG model from a base model, an SAE and corpora"),
    "explain": (
        "modeling_dsg.analysis.explain",
        "show, per guardrail, the score, the decision and the features that fired",
    ),
    "eval": ("modeling_dsg.evaluation.evaluate", "evaluate base and DSG side by side"),
    "sweep": (
        "modeling_dsg.pipelines.sweep",
        "grid over N, c and the ratio percentile (DSG and static); choose by the paper's rule",
    ),
    "publish": ("modeling_dsg.publishing.publish", "stage, verify and upload a DSG model to the Hub"),
    "rmu": (
        "modeling_dsg.pipelines.rmu",
        "the RMU gradient-unlearning baseline on the same model and data (plain HF folder out)",
    ),
    "results": (
        "modeling_dsg.embedded.results",
        "the evaluation suite on the embedded default: table, attacks, sweep, plots",
    ),
    "demo": ("modeling_dsg.embedded.demo", "the whole path on the embedded default (SmolLM2-135M, biology)"),
    "serve": ("modeling_dsg.serve", "an OpenAI-compatible server for a DSG folder (transformers' serving stack)"),
}

# Commands that run over several processes (WORLD_SIZE > 1, see modeling_dsg.distributed); the others refuse.
MULTI_PROCESS = {"build", "eval"}


def _available_commands() -> dict:
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsg", description="Dynamic SAE Guardrails for Hugging Face causal LMs.")
    parser.add_argument(
        "--shared", metavar="DIR", help="the shared models/data folder (default: $DSG_SHARED_DIR or ../shared)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in _available_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shared:
        os.environ["DSG_SHARED_DIR"] = args.shared
    try:
        processes = distributed.world_size()
        if processes > 1 and args.command not in MULTI_PROCESS:
            raise DSGError(
                f"dsg {args.command} runs in one process, but this was launched as {processes} (WORLD_SIZE); "
                f"only {' and '.join(f'dsg {c}' for c in sorted(MULTI_PROCESS))} can run over several processes"
            )
        if getattr(args, "device", None) is not None:  # an unknown or absent device fails before any work
            from .data.sources import check_device

            check_device(args.device)
        code = importlib.import_module(args._module).run(args)
    except DSGError as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"dsg: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsg: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.close()
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
