"""``cegppo`` command line: ``cegppo train [--config FILE] [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console


def _train(args: argparse.Namespace, console: Console) -> int:
    from cegppo.config import load_config
    from cegppo.trainer import Interrupted, Trainer, load_run_config, new_run_dir

    try:
        if args.resume:
            run_dir = Path(args.resume)
            config = load_run_config(run_dir, args.overrides)
        else:
            config = load_config(args.config, args.overrides)
            run_dir = new_run_dir(config)
        if args.quiet:
            config.trainer.quiet = True
        console.print(f"run directory: {run_dir}")
        trainer = Trainer(config, run_dir, resume=bool(args.resume))
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names the file or key
        console.print(f"[red]error:[/red] {error}", highlight=False)
        return 2
    try:
        summary = trainer.fit()
    except Interrupted as stop:
        trainer.close()
        console.print(f"interrupted: {stop}. Continue with: cegppo train --resume {run_dir}")
        return 128 + stop.signum
    if "heldout_acc_before" in summary:
        console.print(
            f"held-out accuracy: {summary['heldout_acc_before']:.3f} -> {summary['heldout_acc_after']:.3f} "
            f"({summary['heldout_size']} problems, greedy)"
        )
    console.print(f"{summary['steps']} steps in {summary['wall_s']:.0f} s; run directory: {run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cegppo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="RL fine-tuning with verifiable rewards (CE-GPPO by default)",
        description="Without arguments: the embedded demo (SmolLM2-135M-Instruct learns 2-digit addition on CPU).",
    )
    train.add_argument(
        "--config", type=Path, help="YAML config (see configs/); defaults: configs/demo_cpu.yaml"
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train.set_defaults(handler=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console(stderr=False)
    return args.handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
