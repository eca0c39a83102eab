"""moe-lab's subcommands: one table (`COMMANDS`) of name, summary, description and arguments, checks and tool.

A command's checks look at what the command line can tell before any work starts (files to write, counts, the
device; for eval and analyze the data settings, composed with Hydra's public API) and raise `UserError`; then its tool
in `moe_lab/tools/` does the work (`run(parsed, *checked)`). Tools and torch are imported only when a command runs,
so `moe-lab --help` and shell completion never pay for them. `train` is the exception: its arguments are Hydra's,
parsed by the Hydra app (`hydra_app.py`) after the pre-flight check (`preflight.py`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from moe_lab.cli import checks
from moe_lab.cli.checks import ArgumentParser
from moe_lab.errors import UserError
from moe_lab.interop.families import titles

COMPARISON = "moe-lab-comparison.html"  # where `moe-lab dashboard RUN1 RUN2 ...` writes by default


def arg(*flags: str, **options: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One argument of a command, as argparse's add_argument takes it: `arg("--seed", type=int, default=0)`."""
    return flags, options


@dataclass(frozen=True)
class Command:
    name: str
    tool: str  # the module of moe_lab/tools/ whose run(parsed, *checked) does the work
    # Before any work: raises UserError for a mistake, returns what the tool needs besides the arguments.
    check: Optional[Callable[[argparse.Namespace], tuple]]
    summary: str  # its line in `moe-lab --help`
    description: str = ""  # its `moe-lab NAME --help`
    arguments: tuple = ()  # arg(...) each
    # Takes the raw arguments instead of a parser and a tool (train: Hydra parses them).
    raw: Optional[Callable[[list[str]], int]] = None

    def parser(self) -> ArgumentParser:
        parser = ArgumentParser(prog=f"moe-lab {self.name}", description=self.description)
        for flags, options in self.arguments:
            parser.add_argument(*flags, **options)
        return parser

    def run(self, parsed: argparse.Namespace) -> int:
        checked = self.check(parsed) if self.check is not None else ()
        return importlib.import_module(f"moe_lab.tools.{self.tool}").run(parsed, *checked)


def train(args: list[str], check: bool = True) -> int:
    """Hand the arguments to the Hydra app, after the pre-flight check (`check=False`: a data-parallel worker that
    Lightning started, whose rank 0 already checked the same command line)."""
    from moe_lab.cli.hydra_args import expand_seeds
    from moe_lab.cli.inherited import with_checkpoint_overrides
    from moe_lab.cli.preflight import preflight

    if check:
        args = with_checkpoint_overrides(expand_seeds(args))
        pinned: list[str] = []
        message = preflight(args, claim=True, pinned=pinned)
        if message is not None:
            raise UserError(message)
        args = args + pinned  # the directory claimed, not one Hydra would name anew from the time it starts
    sys.argv = [sys.argv[0]] + args  # Hydra reads its command line from sys.argv
    from moe_lab.cli.hydra_app import hydra_main

    hydra_main()
    return 0


# ------------------------------------------------------------------------------------------------------------
# The checks of each command


def dashboard_checks(parsed: argparse.Namespace) -> tuple:
    if parsed.interval < 1:
        raise UserError(f"moe-lab dashboard: --interval {parsed.interval} must be at least 1 second")
    if len(parsed.paths) > 1 and parsed.output is None:
        parsed.output = COMPARISON
    return ()


def generate_checks(parsed: argparse.Namespace) -> tuple:
    checks.at_least(parsed.max_new_tokens, "--max-new-tokens")
    if parsed.show_experts is not None:
        if parsed.html is None:
            kind = f"experts-layer{parsed.show_experts}"
            parsed.html = checks.beside_the_run(parsed.source, kind, "moe-lab-experts.html", "--html")
        checks.output_file(parsed.html, "--html")
    checks.device(parsed.device)
    return ()


def data_settings(overrides: list[str], command: str) -> Any:
    """The composed data settings of a command that reads held-out data (eval, prune), checked as train checks them."""
    from moe_lab.cli.preflight import compose_checked

    takes = "data=OPTION, data.KEY=VALUE and paths.cache_dir=DIR"
    return compose_checked(list(overrides), ("data", "paths.cache_dir"), command, takes)


def eval_checks(parsed: argparse.Namespace) -> tuple:
    """(the composed data settings,)"""
    cfg = data_settings(parsed.overrides, "moe-lab eval")
    parsed.json = checks.output_file(parsed.json, "--json")
    if parsed.replay is not None:
        parsed.replay = checks.input_file(parsed.replay, "--replay")
    checks.at_least(parsed.max_batches, "--max-batches")
    checks.device(parsed.device)
    return (cfg,)


def analyze_checks(parsed: argparse.Namespace) -> tuple:
    """(the composed data settings, the checkpoints)"""
    from moe_lab.cli.preflight import compose_checked

    sources = [a for a in parsed.sources if "=" not in a]
    if not sources:
        raise UserError("no checkpoint: give CKPT [CKPT ...] before the data settings")
    cfg = compose_checked(
        [a for a in parsed.sources if "=" in a],
        ("data", "paths.cache_dir", "logger"),
        "moe-lab analyze",
        "data=OPTION, data.KEY=VALUE, paths.cache_dir=DIR and logger=wandb",
    )
    if parsed.output is None:
        parsed.output = checks.beside_the_run(sources[-1], "analysis", "moe-lab-analysis.html", "-o")
    parsed.output = checks.output_file(parsed.output, "-o")
    checks.at_least(parsed.max_batches, "--max-batches")
    checks.device(parsed.device)
    parsed.trace = checks.output_file(parsed.trace, "--trace", new=True)
    return cfg, sources


def prune_checks(parsed: argparse.Namespace) -> tuple:
    """(the composed data settings,)"""
    from pathlib import Path

    cfg = data_settings(parsed.overrides, "moe-lab prune")
    out = Path(parsed.out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory; moe-lab never writes over files: give a new one")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent} does not exist; create it or choose another OUT_DIR")
    if (parsed.keep is None) == (parsed.keep_total is None):
        raise UserError("moe-lab prune: give --keep N (experts kept in every MoE layer) or --keep-total N (in all)")
    checks.at_least(parsed.keep, "--keep")
    checks.at_least(parsed.keep_total, "--keep-total")
    checks.at_least(parsed.max_batches, "--max-batches")
    checks.device(parsed.device)
    return (cfg,)


def bench_checks(parsed: argparse.Namespace) -> tuple:
    checks.device(parsed.device)
    if (parsed.threads is not None and parsed.threads < 1) or parsed.repeats < 1 or parsed.warmup < 0:
        raise UserError("moe-lab bench: --threads and --repeats must be at least 1, --warmup at least 0")
    if parsed.out is not None:
        from pathlib import Path

        out = Path(parsed.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"moe-lab bench: --out {out} is a file; give a directory (new, or without bench.json)")
        if (out / "bench.json").exists() or (out / "bench.csv").exists():
            raise UserError(
                f"moe-lab bench: --out {out} already holds a benchmark (bench.json); moe-lab never "
                "writes over results: choose a new directory"
            )
    return ()


# ------------------------------------------------------------------------------------------------------------
# The table

# Arguments several commands take.
MODEL = arg("source", help="a moe-lab checkpoint (.ckpt) or a Hugging Face model directory or hub id")
OUT_DIR = arg("out_dir", help="a new (or empty) directory")
DEVICE = arg("--device", choices=["cpu", "cuda"], default="cpu")


def max_batches(verb: str) -> tuple:
    return arg("--max-batches", type=int, help=f"{verb} at most this many batches")


def capacity(default: str, help: str) -> tuple:
    """--capacity: dropless routing, or the checkpoint's eval capacity factor."""
    return arg("--capacity", choices=["dropless", "checkpoint"], default=default, help=help)


COMMANDS: tuple[Command, ...] = (
    Command(
        "train",
        "",
        None,
        "train an MoE language model (a Hydra app: `moe-lab train --help` lists its config groups)",
        raw=train,
    ),
    Command(
        "import",
        "hf_import",
        None,
        f"read a Hugging Face MoE ({titles()}): moe-lab import HF_DIR_OR_HUB_ID OUT_DIR",
        f"Turn a Hugging Face transformers MoE model ({titles()}) into a moe-lab checkpoint: OUT_DIR/model.ckpt and "
        "OUT_DIR/tokenizer/. It loads with "
        "moe_lab.load_model, generates, evaluates, and fine-tunes with moe-lab train ckpt_path=OUT_DIR/model.ckpt. "
        "A part moe-lab cannot represent is refused, never approximated.",
        (
            arg("source", help="a directory written by save_pretrained, or a Hugging Face hub id"),
            OUT_DIR,
        ),
    ),
    Command(
        "export",
        "export",
        None,
        "write a checkpoint as a Hugging Face transformers model: moe-lab export CKPT --format hf OUT_DIR",
        "Write a moe-lab checkpoint in another ecosystem's format. --format hf: "
        f"a transformers model ({titles(last='or')}, chosen from the attention, router and experts) "
        "and its tokenizer, "
        "loadable with AutoModelForCausalLM.from_pretrained(OUT_DIR). Reads CKPT (a file or a sharded checkpoint's "
        "folder; tensors only, weights_only=True) and its saved settings; writes OUT_DIR/config.json (the family's "
        "transformers config), model.safetensors (every weight: the experts packed as transformers 5 loads them, "
        "gate_up_proj [E, 2I, H] and down_proj [E, H, I], or gpt-oss's [E, H, 2I] with gate and up interleaved and "
        "[E, I, H] with their biases; a router's bias; latent attention's projections; attention sinks), "
        "mtp.safetensors (a model with multi-token prediction modules: DeepSeek-V3's layout, layers n_layers..), "
        "generation_config.json, tokenizer.json and tokenizer_config.json; nothing where it refuses.",
        (
            arg("checkpoint", help="a moe-lab checkpoint, e.g. outputs/DATE/TIME/checkpoints/last.ckpt"),
            OUT_DIR,
            arg("--format", required=True, choices=["hf"], help="hf: Hugging Face transformers"),
        ),
    ),
    Command(
        "dashboard",
        "dashboard",
        dashboard_checks,
        "an HTML page of a run, a sweep, or runs side by side: moe-lab dashboard PATH [PATH ...] [--live]",
        "Write one self-contained HTML page (no network needed to open it) "
        "for a run directory (loss, expert load over time, balance, specialisation by domain), a sweep directory, or "
        "any set of run and sweep directories side by side (a table ranked by validation loss, bars, curves; the "
        "table is also printed).",
        (
            arg(
                "paths",
                nargs="+",
                metavar="PATH",
                help="a run directory (outputs/DATE/TIME) or a sweep (outputs/multirun/DATE/TIME); several "
                "of either for a comparison",
            ),
            arg(
                "-o",
                "--output",
                help="the HTML file to write (default: PATH/dashboard.html; for several "
                f"paths, {COMPARISON} in the current directory)",
            ),
            arg(
                "--live",
                action="store_true",
                help="keep rewriting the page while a run or sweep goes on; the open page reloads itself",
            ),
            arg("--interval", type=int, default=30, help="seconds between --live updates (default 30)"),
        ),
    ),
    Command(
        "generate",
        "generate",
        generate_checks,
        'text from a checkpoint or Hugging Face MoE: moe-lab generate CKPT_OR_HF_DIR --prompt "def "',
        "Continue prompts with a moe-lab checkpoint or a Hugging Face MoE "
        f"({titles()}; a directory or a hub id), with a KV cache; dropless routing. "
        "Greedy by default; --temperature > 0 samples.",
        (
            MODEL,
            arg("--prompt", action="append", default=[], help="a prompt (repeat for several, batched)"),
            arg("--prompt-file", help="a text file of prompts, one per line (write \\n for a newline inside a prompt)"),
            arg("--max-new-tokens", type=int, default=200),
            arg("--temperature", type=float, default=0.0, help="0 = greedy (default)"),
            arg("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)"),
            arg(
                "--top-p",
                type=float,
                default=1.0,
                help="nucleus sampling: the smallest set of tokens whose probability reaches p (1 = all)",
            ),
            arg("--seed", type=int, default=0),
            arg(
                "--show-experts",
                type=int,
                metavar="LAYER",
                help="colour every token by the expert of highest weight it went to in this MoE layer "
                "(terminal and --html)",
            ),
            arg(
                "--html",
                help="with --show-experts: the HTML snippet to write (default: RUN/analysis/CKPT.experts-layerL.html "
                "in the checkpoint's run, moe-lab-experts.html here for a Hugging Face model)",
            ),
            DEVICE,
        ),
    ),
    Command(
        "eval",
        "evaluate",
        eval_checks,
        "loss, perplexity, bits per byte and routing on some data: moe-lab eval CKPT_OR_HF_DIR [data=...]",
        "Evaluate a moe-lab checkpoint or a Hugging Face MoE on data: loss, "
        "perplexity and bits per byte, overall and per domain, and per MoE layer the routing statistics training "
        "logs (load, imbalance, drops, dead and starved experts, specialisation). The data settings are moe-lab "
        "train's (data=embedded|text|hf, data.KEY=VALUE; default: the embedded corpus); the held-out split of "
        "the packed blocks is evaluated, tokenised with the model's tokenizer.",
        (
            MODEL,
            arg("overrides", nargs="*", help="data=..., data.KEY=VALUE, paths.cache_dir=..."),
            max_batches("evaluate"),
            capacity(
                "dropless",
                "dropless (default: every token reaches its experts, as at inference) or the "
                "checkpoint's eval capacity factor (as its validation ran)",
            ),
            arg("--json", help="also write the report as JSON to this file"),
            arg(
                "--replay",
                metavar="TRACE",
                help="route every sequence as this Parquet trace recorded it (moe-lab analyze --trace, or "
                "training's routing.record): the recorded experts, weighted by this model's own router; the report "
                "says how many of the model's own decisions were overridden",
            ),
            DEVICE,
        ),
    ),
    Command(
        "analyze",
        "analyze",
        analyze_checks,
        "routing analyses (specialisation, co-activation, repeats, drops, saturation, stability): moe-lab analyze CKPT",
        "The routing analyses MoE papers publish, on a checkpoint and data: domain "
        "and vocabulary specialisation (with the random-routing baseline), expert co-activation within a layer and "
        "transitions between layers, the repeat rate of consecutive tokens against chance, drops by position, and, "
        "given several checkpoints of one run (oldest first), router saturation against the last. The data settings "
        "are moe-lab train's (default: the embedded corpus); the held-out blocks are analysed.",
        (
            arg(
                "sources",
                nargs="+",
                metavar="CKPT_OR_SETTING",
                help="moe-lab checkpoints or Hugging Face models (the last is analysed), then data=..., "
                "data.KEY=VALUE, paths.cache_dir=..., and logger=wandb (logger.wandb.KEY=VALUE) to log the "
                "results to a W&B run too",
            ),
            max_batches("analyse"),
            capacity(
                "checkpoint",
                "checkpoint (default: the run's eval capacity factor, so drops by position are the run's) or dropless",
            ),
            arg(
                "--capacity-factor",
                type=float,
                action="append",
                default=[],
                metavar="F",
                help="also measure drops by position under capacity factor F (repeat for several)",
            ),
            arg(
                "-o",
                "--output",
                help="the report's page (default: RUN/analysis/CKPT.analysis.html in the checkpoint's run, "
                "moe-lab-analysis.html here for a Hugging Face model); the same data goes to the .json beside it, "
                "and as tables to "
                "PAGE.TABLE.csv files (layers, domain_shares, expert_tokens, coactivation, transitions, "
                "drops_by_position, saturation, stability)",
            ),
            arg(
                "--stability",
                action="store_true",
                help="also measure how often a token's expert set changes between float32 and bfloat16, evaluation "
                "and training mode, its batch and alone, the same settings twice, and each earlier checkpoint given: "
                "per layer, in any layer, and the tokens that flip most",
            ),
            arg(
                "--trace",
                help="also write every token's routing (id, domain, position; experts, weights "
                "and drops per layer) to this Parquet file, for pandas, polars or duckdb",
            ),
            DEVICE,
        ),
    ),
    Command(
        "prune",
        "prune",
        prune_checks,
        "remove routed experts by a criterion (REAP, EAN, frequency, loss): moe-lab prune CKPT OUT_DIR --keep N",
        "Keep the N best routed experts of every MoE layer (and the router's rows with them), scored on the "
        "held-out blocks of some data (data=..., as moe-lab eval; default: the embedded corpus): frequency (share "
        "of routing slots), reap (mean gate weight x output norm over the tokens routed to the expert), ean (sum of "
        "output norms), loss (held-out loss without the expert, measured per expert: L x E passes) or random. "
        "Routers with expert groups keep as many experts of every group. Writes OUT_DIR/model.ckpt, a checkpoint like "
        "any other (eval, generate, analyze, export, moe-lab train ckpt_path=...), and OUT_DIR/pruning.json (every "
        "score, the experts kept, the held-out loss before and after).",
        (
            MODEL,
            OUT_DIR,
            arg("overrides", nargs="*", help="data=..., data.KEY=VALUE, paths.cache_dir=..."),
            arg("--keep", type=int, help="routed experts to keep in every MoE layer"),
            arg(
                "--keep-total",
                type=int,
                help="routed experts to keep over all MoE layers, spread by score (the layers then differ)",
            ),
            arg("--criterion", choices=["frequency", "reap", "ean", "loss", "random"], default="reap"),
            arg("--seed", type=int, default=0, help="the random criterion's seed"),
            max_batches("score the experts on"),
            DEVICE,
        ),
    ),
    Command(
        "bench",
        "bench",
        bench_checks,
        "time the MoE layer and training steps: moe-lab bench [--compare] (see moe-lab bench --help)",
        "Time the MoE layer (forward, forward + backward, activation memory) over "
        "a grid of shapes, and whole training steps of model presets (tokens/s, MFU on known GPUs). Prints a table "
        "and writes bench.json and bench.csv.",
        (
            arg(
                "--compare",
                action="store_true",
                help="also time the peers' MoE layers on the same weights "
                "(transformers' Mixtral block with eager and grouped_mm experts, torchtitan, OLMo-core: "
                "pip install -e '.[bench-peers]'; each is checked to compute the same output first, or listed "
                "with why it was not timed), a dense SwiGLU of equal active parameters, and a whole model "
                "against its transformers export; print the target ratios",
            ),
            arg(
                "--baseline",
                action="store_true",
                help="only the default training step against float32 eager (the settings before the fast path), "
                "interleaved, at least 5 rounds, with the spread and the fraction of the machine's GEMM peak",
            ),
            arg(
                "--checkpointing",
                action="store_true",
                help="only model=small's training step under each model.activation_checkpointing (none, moe, "
                "block): step time, interleaved, and the peak memory of its tensors",
            ),
            arg("--loop", action="store_true", help="also time moe-lab's per-expert reference loop"),
            arg("--capacity", action="store_true", help="also time capacity-limited cases (cf 1.25)"),
            arg("--no-steps", action="store_true", help="skip the whole-training-step timings"),
            arg("--quick", action="store_true", help="tiny shapes, for a smoke test"),
            arg("--device", choices=["cpu", "cuda"], help="cpu or cuda (default: cuda if available)"),
            arg("--dtype", default="float32", choices=["float32", "bfloat16"]),
            arg("--threads", type=int, default=None, help="CPU threads (default: torch's)"),
            arg("--warmup", type=int, default=3),
            arg("--repeats", type=int, default=10),
            arg("--out", help="directory for bench.json and bench.csv (default benchmarks/results/DATE_TIME)"),
        ),
    ),
)
