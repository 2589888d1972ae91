"""The ``cegppo`` command line: ``train``, ``eval``, ``report``, ``sweep`` and ``probe``."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from cegppo.runfiles import RUN_DIR_RULE

if TYPE_CHECKING:  # the report's modules load numpy and matplotlib: only when a report is asked for
    from cegppo.report.seeds import StepWindow


def print_error(console: Console, error: object) -> None:
    """``error: <message>``, the message as is (a path like ``[a.jsonl]`` is not rich markup)."""
    console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)


def _train(args: argparse.Namespace, console: Console) -> int:
    from cegppo.config import load_config
    from cegppo.presets import variant_overrides
    from cegppo.rewards import RewardFailure
    from cegppo.trainer import Interrupted, Trainer, load_run_config, new_run_dir
    from cegppo.trainer.checkpoint import latest_checkpoint
    from cegppo.trainer.dynamic_sampling import NoRewardSignal

    try:
        if args.resume:
            if args.preset or args.config:
                raise ValueError(
                    "--resume continues a run with its own config: give overrides, not --preset/--config"
                )
            run_dir = Path(args.resume)
            config = load_run_config(run_dir, args.overrides)
        else:
            preset = variant_overrides(args.preset) if args.preset else []
            config = load_config(args.config, [*preset, *args.overrides])
            run_dir = new_run_dir(config)
        if args.quiet:
            config.trainer.quiet = True
        trainer = Trainer(config, run_dir, resume=bool(args.resume))
    except (ValueError, FileNotFoundError, RewardFailure) as error:  # bad input, named in the message
        print_error(console, error)
        return 2
    rule = "resumed" if args.resume else RUN_DIR_RULE
    console.print(f"run directory: {run_dir} ({rule})", highlight=False)
    try:
        summary = trainer.fit()
    except Interrupted as stop:
        trainer.close()
        console.print(f"interrupted: {stop}. Continue with: cegppo train --resume {run_dir}")
        return 128 + stop.signum
    except (RewardFailure, NoRewardSignal) as failure:  # training on would mean nothing
        trainer.close()
        print_error(console, failure)
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            console.print(f"Fix it, then continue with: cegppo train --resume {run_dir}", highlight=False)
        elif not run_dir.exists():
            console.print(
                f"Nothing was trained, so {run_dir} was removed: fix it and run the same command again.",
                highlight=False,
            )
        return 1
    if "heldout_acc_before" in summary:
        console.print(
            f"held-out accuracy: {summary['heldout_acc_before']:.3f} -> {summary['heldout_acc_after']:.3f} "
            f"({summary['heldout_size']} problem{'s' if summary['heldout_size'] != 1 else ''} of "
            f"{summary['heldout']}, greedy)"
        )
    console.print(f"{summary['steps']} steps in {summary['wall_s']:.0f} s; run directory: {run_dir}")
    return 0


def _probe(args: argparse.Namespace, console: Console) -> int:
    from cegppo.config import load_config, validate
    from cegppo.report.probe import probe_table
    from cegppo.trainer import Trainer, new_run_dir

    variants, overrides = _split_variants(args.variants or [], args.overrides)
    try:
        seeds = _seed_list(args.seeds)
        config = load_config(args.config, [*overrides, "analysis.probe_every=1"])
        config.analysis.probe_variants = variants
        validate(config)
        config.trainer.name = config.trainer.name or f"probe-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = new_run_dir(config)
        if args.quiet:
            config.trainer.quiet = True
        trainer = Trainer(config, run_dir)
    except (ValueError, FileNotFoundError) as error:
        print_error(console, error)
        return 2
    console.print(f"probe directory: {run_dir}", highlight=False)
    rows = []
    try:
        for seed, seed_rows in zip(seeds, trainer.probe_from_here(seeds), strict=False):
            trainer.tracker.log_probe(seed_rows)
            rows += seed_rows
            console.print(f"seed {seed}: {len(seed_rows)} rows", highlight=False)
    finally:
        trainer.close()
    if not rows:
        console.print("[red]error:[/red] no seed produced a batch with reward signal", highlight=False)
        return 1
    table = probe_table(rows, args.reference)
    (run_dir / "probe.md").write_text(table)
    console.print(table, markup=False, highlight=False)
    console.print(f"rows: {run_dir / 'probe.jsonl'}; table: {run_dir / 'probe.md'}", highlight=False)
    return 0


def _split_variants(items: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--variants`` takes every word up to the next option: a ``key.sub=value`` among them is an override."""
    is_override = [re.match(r"[\w.]+=", item) is not None for item in items]
    return (
        [item for item, flag in zip(items, is_override, strict=True) if not flag],
        [*overrides, *(item for item, flag in zip(items, is_override, strict=True) if flag)],
    )


def _seed_list(text: str) -> list[int]:
    """``0-7`` or ``0,3,5`` (or both: ``0-3,8``)."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise ValueError(f"--seeds {text!r}: expected numbers and ranges such as 0-7 or 0,3,5")
        seeds += range(int(first), int(last) + 1) if dash else [int(first)]
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seed given")
    return seeds


def _step_window(text: str) -> StepWindow:
    from cegppo.report.seeds import StepWindow

    try:
        return StepWindow.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def resolve_eval_model(model: str) -> str:
    """A run directory means its latest checkpoint's model, a checkpoint directory its ``model/``; anything else
    (a model directory, the embedded default's name) is passed on as given."""
    from cegppo.trainer.checkpoint import MODEL_DIR, latest_checkpoint

    path = Path(model)
    if (path / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(path / "checkpoints")
        if checkpoint is None:
            raise ValueError(f"run directory {path} has no complete checkpoint under checkpoints/")
        return str(checkpoint / MODEL_DIR)
    if (path / MODEL_DIR / "config.json").is_file():
        return str(path / MODEL_DIR)
    return model


def _eval(args: argparse.Namespace, console: Console) -> int:
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from cegppo.evaluation import (
        benchmark_name,
        evaluate_examples,
        load_problems,
        markdown_table,
        write_results,
    )
    from cegppo.models import load_model_and_tokenizer
    from cegppo.rewards import RewardConfig, RewardScorer
    from cegppo.rollout import SamplingParams, build_rollout_engine

    try:
        names = [name.strip() for name in args.benchmarks.split(",") if name.strip()]
        if not names:
            raise ValueError("--benchmarks: give at least one benchmark name or prompt file")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"--benchmarks lists {', '.join(repeated)} more than once")
        problems = {
            benchmark_name(name): load_problems(
                name, limit=args.limit, question_template=args.question_template
            )
            for name in names
        }
        params = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
        )
        reward = RewardConfig(
            name=args.reward,
            strict_boxed=args.reward == "math" and not args.no_strict_boxed,
            num_workers=args.reward_workers,
        )
        reward.validate()
        if args.num_threads is not None:
            if args.num_threads < 1:
                raise ValueError(f"--num-threads must be >= 1, got {args.num_threads}")
            torch.set_num_threads(args.num_threads)
        model_path = resolve_eval_model(args.model)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=getattr(torch, args.dtype))
        model.to(device)
        # On a GPU the trainer's own precision (actor.bf16_autocast); on the CPU float32, as before.
        autocast = (
            args.autocast if args.autocast != "auto" else ("bf16" if model.device.type == "cuda" else "off")
        )
        engine = build_rollout_engine(
            "hf",
            model,
            tokenizer,
            batch_size=args.batch_size,
            autocast_dtype=torch.bfloat16 if autocast == "bf16" else None,
        )
        scorer = RewardScorer(reward)  # last: it starts worker processes
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names the file or option
        print_error(console, error)
        return 2
    console.print(
        f"model: {model_path} ({device}, {args.dtype} weights, autocast {autocast})", highlight=False
    )
    results = []
    progress_console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("problems"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with scorer, Progress(*columns, console=progress_console, disable=args.quiet) as bar:
            for name, examples in problems.items():
                task = bar.add_task(f"{name} (n={params.n})", total=len(examples))
                results.append(
                    evaluate_examples(
                        engine,
                        scorer,
                        tokenizer,
                        name,
                        examples,
                        params,
                        system_prompt=args.system_prompt,
                        progress=lambda done, task=task: bar.advance(task, done),
                    )
                )
    except KeyboardInterrupt:
        console.print("interrupted: no results written")
        return 130
    table = markdown_table(results)
    console.print(table, markup=False, highlight=False)
    if args.output is not None:
        settings = (
            f"n={params.n}, temperature={params.temperature}, top_p={params.top_p}, "
            f"max_new_tokens={params.max_new_tokens}, seed={params.seed}"
        )
        write_results(results, args.output, title=f"{args.model} ({settings})")
        console.print(f"results: {args.output}", highlight=False)
    return 0


def _report(args: argparse.Namespace, console: Console) -> int:
    from cegppo.report import write_report

    try:
        report = write_report(
            args.run_dirs,
            args.output,
            smooth=args.smooth,
            per_seed=args.per_seed,
            probe_reference=args.probe_reference,
            paired_reference=args.paired_reference,
            paired_steps=args.paired_steps,
        )
    except ValueError as error:
        print_error(console, error)
        return 2
    skipped = [panel.title for panel in report.panels if panel.png is None]
    if skipped:
        console.print(f"not logged by any run (shown as a note): {', '.join(skipped)}", highlight=False)
    console.print(f"report: {report.html} (figures in {report.figures_dir})", highlight=False)
    return 0


def _sweep(args: argparse.Namespace, console: Console) -> int:
    from cegppo.config import ConfigError
    from cegppo.presets import VARIANTS
    from cegppo.report import write_report
    from cegppo.sweep import run_sweep, sweep_table

    variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    try:
        if args.paired_steps is not None and args.paired_reference is None:
            raise ValueError(
                "--paired-steps is the window of --paired-reference's panel: give --paired-reference"
            )
        if args.paired_reference is not None and args.paired_reference not in variants:
            raise ValueError(
                f"--paired-reference {args.paired_reference!r} is not one of this sweep's variants: "
                f"{', '.join(variants)}"
            )
        seeds = _seed_list(args.seeds)
        run_dirs = run_sweep(
            args.output_dir,
            config_path=args.config,
            overrides=args.overrides,
            seeds=seeds,
            variants=variants,
            on_run=lambda name, run_dir: console.print(f"sweep run {name}: {run_dir}", highlight=False),
        )
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print_error(console, error)
        return 2
    table = sweep_table(run_dirs)
    (args.output_dir / "sweep.md").write_text(table)
    report = write_report(
        run_dirs,
        args.output_dir / "report.html",
        per_seed=args.per_seed,
        paired_reference=args.paired_reference,
        paired_steps=args.paired_steps,
    )
    console.print(table, highlight=False, markup=False)
    console.print(f"table: {args.output_dir / 'sweep.md'}; report: {report.html}", highlight=False)
    return 0


_PER_SEED_HELP = (
    "draw every run on its own (default: the seeds of a variant, runs named <variant>-s<seed>, as their mean "
    "with a min-max band)"
)


def _add_paired_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--paired-reference",
        metavar="VARIANT",
        help="runs named <variant>-s<seed>: add a report panel of each variant minus VARIANT of the same seed",
    )
    parser.add_argument(
        "--paired-steps",
        type=_step_window,
        metavar="FIRST:LAST",
        help="the steps each run's metrics are averaged over for --paired-reference (default: the second half)",
    )


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help says it already or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


DESCRIPTION = (
    "RL fine-tuning of language models with verifiable rewards, built around CE-GPPO. "
    "Start with 'cegppo train' (the CPU demo), then 'cegppo train data.train_files=my.jsonl "
    "reward.name=my_reward.py:compute_score' for your own data; 'cegppo COMMAND --help' for each command."
)


def build_parser() -> argparse.ArgumentParser:
    from cegppo import __version__

    parser = argparse.ArgumentParser(prog="cegppo", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="RL fine-tuning with verifiable rewards (CE-GPPO by default)",
        description="Without arguments: the embedded demo (SmolLM2-135M-Instruct learns 2-digit addition on CPU). "
        "Each run gets its own directory, trainer.output_dir/trainer.name (runs/<start time> by default), never "
        "inside another run. Every key and its default: configs/demo_cpu.yaml.",
        formatter_class=_DefaultsFormatter,
    )
    train.add_argument(
        "--config", type=Path, help="YAML config (see configs/); defaults: configs/demo_cpu.yaml"
    )
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    train.add_argument(
        "--preset",
        metavar="NAME",
        help="named settings applied before the overrides: grpo, dapo (both the vanilla loss with their clip "
        "ranges), gppo, ce_gppo_b<β1>_<β2>, dapo_80_20, dapo_erc, grpo_adaptive_entropy, ce_gppo_control, or a "
        "loss name with its paper's settings (what cegppo sweep --variants runs)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    train.set_defaults(handler=_train)

    from cegppo.models import DEFAULT_MODEL

    evaluate = commands.add_parser(
        "eval",
        formatter_class=_DefaultsFormatter,
        help="avg@n and pass@k on math benchmarks (or the arithmetic set)",
        description="Sample n responses per problem and score them with the training reward (math-verify on the "
        "last \\boxed{} by default). Reports avg@n and unbiased pass@k with 95% intervals over problems.",
    )
    evaluate.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model directory, run directory (its latest checkpoint), checkpoint directory, or {DEFAULT_MODEL!r}",
    )
    evaluate.add_argument(
        "--benchmarks",
        default="arithmetic",
        help="comma-separated benchmark names (aime24, aime25, amc23, math500, gsm8k, arithmetic) or prompt files",
    )
    evaluate.add_argument("--n", type=int, default=4, help="samples per problem (avg@n, pass@k up to n)")
    evaluate.add_argument("--temperature", type=float, default=0.6, help="0 is greedy")
    evaluate.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling")
    evaluate.add_argument("--top-k", type=int, default=-1, help="-1: off")
    evaluate.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response at most")
    evaluate.add_argument("--limit", type=int, help="only the first K problems of each benchmark")
    evaluate.add_argument("--seed", type=int, default=0, help="sampling seed")
    evaluate.add_argument(
        "--question-template",
        help="how questions are asked, with {problem}; default: the boxed-answer instruction for math "
        "benchmarks, the question as is for arithmetic and prompt files",
    )
    evaluate.add_argument("--system-prompt", help="system turn (default: the chat template's own)")
    evaluate.add_argument(
        "--reward",
        default="math",
        help="'math' or a custom reward 'pkg.module:function' / 'file.py:function'",
    )
    evaluate.add_argument(
        "--no-strict-boxed",
        action="store_true",
        help="math reward: let math-verify find the answer anywhere, not only in the last \\boxed{}",
    )
    evaluate.add_argument("--reward-workers", type=int, default=1, help="scoring processes (0: in-process)")
    evaluate.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    evaluate.add_argument(
        "--num-threads",
        type=int,
        help="CPU threads for torch (trainer.num_threads in training; default: torch's)",
    )
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights dtype")
    evaluate.add_argument(
        "--autocast",
        choices=("auto", "bf16", "off"),
        default="auto",
        help="bfloat16 autocast while sampling (auto: on for CUDA, as the trainer samples; off on the CPU)",
    )
    evaluate.add_argument(
        "--batch-size", type=int, help="sequences per generate call (default: 8 problems x n)"
    )
    evaluate.add_argument("--output", type=Path, help="write eval.json, eval.md and generations/ here")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_eval)

    report = commands.add_parser(
        "report",
        formatter_class=_DefaultsFormatter,
        help="HTML report comparing runs' training curves",
        description="One self-contained HTML page (figures embedded) with the PNGs beside it in <name>_figures/.",
    )
    report.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories, or folders of runs (runs/)",
    )
    report.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="default: report.html")
    report.add_argument(
        "--smooth", type=int, help="moving-average window in steps (default: automatic for long runs; 1: off)"
    )
    report.add_argument("--per-seed", action="store_true", help=_PER_SEED_HELP)
    report.add_argument(
        "--probe-reference",
        default="trajectory",
        help="runs with a paired probe: the variant the others are paired against (default: trajectory)",
    )
    _add_paired_arguments(report)
    report.set_defaults(handler=_report)

    sweep = commands.add_parser(
        "sweep",
        formatter_class=_DefaultsFormatter,
        help="GRPO, DAPO, GPPO and CE-GPPO at several (β1, β2) on the same budget, then a table and a report",
        description="Runs each variant x seed under OUTPUT_DIR (finished runs are skipped, interrupted ones "
        "resumed from their last checkpoint, or started again when killed before their first), then writes "
        "OUTPUT_DIR/sweep.md and OUTPUT_DIR/report.html.",
    )
    sweep.add_argument("--config", type=Path, help="base config (default: the demo)")
    sweep.add_argument(
        "--output-dir", type=Path, default=Path("runs/sweep"), help="the runs, table and report"
    )
    sweep.add_argument("--seeds", default="0", help="e.g. 0-19 or 0,1,2,3")
    sweep.add_argument(
        "--variants",
        default="all",
        help="comma-separated variants (grpo, dapo, gppo, ce_gppo_b<β1>_<β2> at any β), method presets (dapo_erc, "
        "dapo_80_20, grpo_adaptive_entropy, ce_gppo_control) or registered loss names (sapo, geo_mean, dgpo, "
        "gppo_erc, ...), or all (the CE-GPPO study)",
    )
    sweep.add_argument("--per-seed", action="store_true", help=_PER_SEED_HELP)
    _add_paired_arguments(sweep)
    sweep.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    sweep.set_defaults(handler=_sweep)

    probe = commands.add_parser(
        "probe",
        help="the paired probe: what each loss setting's update does to entropy, from the same state and batch",
        description="For each seed, sample a training batch from the model (model.path: a model directory or a "
        "checkpoint's model/), apply every variant's update to it from the same weights (AdamW starting fresh), "
        "and measure it on a held-out probe set; writes probe.jsonl and probe.md in a new directory under "
        "trainer.output_dir and prints the paired table (docs/entropy.md).",
    )
    probe.add_argument("--config", type=Path, help="YAML config (default: the demo)")
    probe.add_argument(
        "--variants",
        nargs="+",
        metavar="SPEC",
        help="loss settings besides the config's own ('trajectory'), e.g. 'ce_gppo(beta1=0,beta2=1)' cispo",
    )
    probe.add_argument("--seeds", default="0", help="batches to probe, e.g. 0-7 or 0,3,5 (default: 0)")
    probe.add_argument(
        "--reference",
        default="trajectory",
        help="variant the others are paired against (default: trajectory)",
    )
    probe.add_argument("--quiet", action="store_true", help="no progress output")
    probe.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    probe.set_defaults(handler=_probe)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may also follow options (``train a=1 --quiet b=2``)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [arg for arg in rest if arg.startswith("-") or "=" not in arg or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Our own progress bars say what is happening; transformers' per-file load/save bars only add noise.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    console = Console(stderr=False, soft_wrap=True)  # no line breaks inside long paths in messages
    return args.handler(args, console)


if __name__ == "__main__":
    sys.exit(main())
