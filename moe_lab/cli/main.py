"""`moe-lab`: one console script with subcommands.

`moe-lab train ...` hands everything after `train` to the `@hydra.main` app in `moe_lab/cli/hydra_app.py`, so Hydra's
own flags (-m, --cfg job, --info, --help, -sc) work as they do for any Hydra app. Before that, a preflight
composes the config the way Hydra will (each value of a sweep included) and validates it, so a mistake is one
clear message and nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from moe_lab.errors import UserError
from moe_lab.training.run_dir import launched_worker

SUBCOMMANDS: dict[str, str] = {
    "train": "train an MoE language model (a Hydra app: `moe-lab train --help` lists its config groups)",
    "import": "read a Hugging Face MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): moe-lab import HF_DIR_OR_HUB_ID OUT_DIR",
    "export": "write a checkpoint as a Hugging Face transformers model: moe-lab export CKPT --format hf OUT_DIR",
    "dashboard": "an HTML page of a run, a sweep, or runs side by side: moe-lab dashboard PATH [PATH ...] [--live]",
    "generate": "text from a checkpoint or Hugging Face MoE: moe-lab generate CKPT_OR_HF_DIR --prompt \"def \"",
    "eval": "loss, perplexity, bits per byte and routing on some data: moe-lab eval CKPT_OR_HF_DIR [data=...]",
    "analyze": "routing analyses (specialisation, co-activation, repeats, drops, saturation): moe-lab analyze CKPT",
    "bench": "time the MoE layer and training steps: moe-lab bench [--compare] (see moe-lab bench --help)",
}

USAGE = """usage: moe-lab <command> [arguments]

moe-lab: an experiment runner for Mixture-of-Experts language models.

commands:
{commands}

examples:
  moe-lab train                                          embedded data, tiny MoE, CPU: a few minutes
  moe-lab train experts=e16 model.moe.router.top_k=1 capacity=cf1_25 aux_loss=switch_z
  moe-lab train -m experts=e4,e8 aux_loss=none,switch    a sweep of 4 runs
  moe-lab train ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt
  moe-lab export outputs/DATE/TIME/checkpoints/last.ckpt --format hf hf_model/
  moe-lab import allenai/OLMoE-1B-7B-0924 olmoe/               a Hugging Face MoE as a moe-lab checkpoint
  moe-lab generate olmoe/model.ckpt --prompt "def " --show-experts 3
  moe-lab eval outputs/DATE/TIME/checkpoints/last.ckpt data=text data.path=notes.txt
  moe-lab train model.init_from=DENSE.ckpt upcycle=copy experts=e8   sparse upcycling of a dense run

Tab completion (bash): eval "$(moe-lab train -sc install=bash)"
"""


COMPARISON = "moe-lab-comparison.html"  # where `moe-lab dashboard RUN1 RUN2 ...` writes by default


def fail(message: str) -> int:
    print(f"moe-lab: error: {message}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with moe-lab's one-line errors: `moe-lab: error: ...`, exit 2."""

    def error(self, message: str):
        raise SystemExit(fail(f"{self.prog}: {message} (see {self.prog} --help)"))


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-sc", "--shell-completion"):
        return complete(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        commands = "\n".join(f"  {name:<10} {text}" for name, text in SUBCOMMANDS.items())
        print(USAGE.format(commands=commands))
        return 0
    command, rest = argv[0], argv[1:]
    handlers: dict[str, Callable[[list[str]], int]] = {"train": train_command, "import": import_command,
                                                       "export": export_command,
                                                       "dashboard": dashboard_command, "bench": bench_command,
                                                       "generate": generate_command, "eval": eval_command,
                                                       "analyze": analyze_command}
    if command not in handlers and launched_worker():
        # A data-parallel worker that Lightning started by re-running this process's command line, which Hydra
        # holds without the subcommand: it is the same `train` run (rank 0 already checked the command line).
        return train_command(argv, check=False)
    if command not in handlers:
        return fail(f"unknown command {command!r}; the commands are: {', '.join(SUBCOMMANDS)} (see moe-lab --help)")
    return handlers[command](rest)


def train_command(args: list[str], check: bool = True) -> int:
    from moe_lab.cli.inherited import with_checkpoint_overrides
    from moe_lab.cli.preflight import preflight

    if check:
        try:
            args = with_checkpoint_overrides(expand_seeds(args))
        except UserError as e:
            return fail(str(e))
    message = preflight(args, claim=True) if check else None
    if message is not None:
        return fail(message)
    sys.argv = [sys.argv[0]] + args  # Hydra reads its command line from sys.argv
    from moe_lab.cli.hydra_app import hydra_main

    hydra_main()
    return 0


def expand_seeds(args: list[str]) -> list[str]:
    """`seeds=N`: the same sweep over N seeds, `seed=S,S+1,...` from the given seed (default: the config's), as a
    multirun: `moe-lab train experts=e8,e16 seeds=3` = `moe-lab train -m experts=e8,e16 seed=1234,1235,1236`."""
    given = [a for a in args if a.startswith("seeds=")]
    if not given:
        return args
    if len(given) > 1:
        raise UserError("seeds= is given more than once")
    count = given[0].partition("=")[2]
    if not count.isdigit() or int(count) < 1:
        raise UserError(f"{given[0]}: give the number of seeds, e.g. seeds=3 (or seed=1,2,3 for chosen ones)")
    seed_args = [a for a in args if a.startswith("seed=")]
    if len(seed_args) > 1 or any("," in a or "(" in a for a in seed_args):
        raise UserError(f"{given[0]} and {' '.join(seed_args)}: give seeds=N (N seeds from seed=S) or a list "
                        "seed=1,2,3, not both")
    start = seed_args[0].partition("=")[2] if seed_args else None
    if start is None:
        from moe_lab.training.schemas import TrainConfig

        start = str(TrainConfig.seed)
    if not start.lstrip("-").isdigit():
        raise UserError(f"seed={start} must be an integer to count {given[0]} from")
    seeds = ",".join(str(int(start) + i) for i in range(int(count)))
    rest = [a for a in args if a not in given and a not in seed_args]
    multirun = [] if any(a in ("-m", "--multirun") for a in rest) else ["-m"]
    return multirun + rest + [f"seed={seeds}"]


def import_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab import", description="Turn a Hugging Face transformers MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, "
        "OLMoE) into a moe-lab checkpoint: OUT_DIR/model.ckpt and OUT_DIR/tokenizer/. It loads with "
        "moe_lab.load_model, generates, evaluates, and fine-tunes with moe-lab train ckpt_path=OUT_DIR/model.ckpt. "
        "A part moe-lab cannot represent is refused, never approximated.")
    parser.add_argument("source", help="a directory written by save_pretrained, or a Hugging Face hub id")
    parser.add_argument("out_dir", help="a new (or empty) directory")
    parsed = parser.parse_args(args)
    try:
        from moe_lab.tools.hf_import import import_hf

        result = import_hf(parsed.source, parsed.out_dir)
    except UserError as e:
        return fail(str(e))
    print(f"moe-lab: imported {result['family']} ({result['total'] / 1e6:.1f}M parameters, "
          f"{result['active'] / 1e6:.1f}M active per token; {result['layers']} layers, {result['experts']} experts, "
          f"top-{result['top_k']}) to {result['checkpoint']}\n"
          f"  generate   moe-lab generate {result['checkpoint']} --prompt \"...\"\n"
          f"  fine-tune  moe-lab train ckpt_path={result['checkpoint']} data=text data.path=...")
    return 0


def export_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab export", description="Write a moe-lab checkpoint in another ecosystem's format. --format hf: "
        "a transformers model (Mixtral or Qwen2-MoE, chosen from the router and experts) and its tokenizer, "
        "loadable with AutoModelForCausalLM.from_pretrained(OUT_DIR).")
    parser.add_argument("checkpoint", help="a moe-lab checkpoint, e.g. outputs/DATE/TIME/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="a new (or empty) directory")
    parser.add_argument("--format", required=True, choices=["hf"], help="hf: Hugging Face transformers")
    parsed = parser.parse_args(args)
    try:
        from moe_lab.tools.export import export_hf

        result = export_hf(parsed.checkpoint, parsed.out_dir)
    except UserError as e:
        return fail(str(e))
    print(f"moe-lab: wrote {result['architecture']} to {result['out_dir']} (dropless, as moe_lab.load_model)\n"
          f"  AutoModelForCausalLM.from_pretrained({result['out_dir']!r})")
    return 0


def dashboard_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab dashboard", description="Write one self-contained HTML page (no network needed to open it) "
        "for a run directory (loss, expert load over time, balance, specialisation by domain), a sweep directory, or "
        "any set of run and sweep directories side by side (a table ranked by validation loss, bars, curves; the "
        "table is also printed).")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a run directory (outputs/DATE/TIME) or a sweep (outputs/multirun/DATE/TIME); several "
                             "of either for a comparison")
    parser.add_argument("-o", "--output", help="the HTML file to write (default: PATH/dashboard.html; for several "
                        f"paths, {COMPARISON} in the current directory)")
    parser.add_argument("--live", action="store_true", help="keep rewriting the page while a run or sweep goes on; "
                        "the open page reloads itself")
    parser.add_argument("--interval", type=int, default=30, help="seconds between --live updates (default 30)")
    parsed = parser.parse_args(args)
    if parsed.interval < 1:
        return fail(f"moe-lab dashboard: --interval {parsed.interval} must be at least 1 second")
    from moe_lab.analysis.dashboard import live, write_comparison, write_dashboard
    from moe_lab.analysis.runs import ranked_table

    if len(parsed.paths) == 1:
        def write(refresh):
            return write_dashboard(parsed.paths[0], parsed.output, refresh=refresh)
    else:
        def write(refresh):
            return write_comparison(parsed.paths, parsed.output or COMPARISON, refresh=refresh)[0]
    try:
        if parsed.live:
            live(write, parsed.interval)
            return 0
        if len(parsed.paths) == 1:
            out = write(None)
            from moe_lab.analysis.runs import is_sweep_dir, sweep_runs

            runs = sweep_runs(Path(parsed.paths[0])) if is_sweep_dir(Path(parsed.paths[0])) else []
        else:
            out, runs = write_comparison(parsed.paths, parsed.output or COMPARISON)
            print(ranked_table(runs))
        from moe_lab.analysis.seeds import group_table, has_seed_groups, seed_groups

        groups = seed_groups(runs)
        if has_seed_groups(groups):
            print(f"{len(groups)} configurations over seeds, best mean validation loss first:\n{group_table(groups)}")
    except UserError as e:
        return fail(str(e))
    print(f"moe-lab: wrote {out}")
    return 0


def generate_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab generate", description="Continue prompts with a moe-lab checkpoint or a Hugging Face MoE "
        "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; a directory or a hub id), with a KV cache; dropless routing. "
        "Greedy by default; --temperature > 0 samples.")
    parser.add_argument("source", help="a moe-lab checkpoint (.ckpt) or a Hugging Face model directory or hub id")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several, batched)")
    parser.add_argument("--prompt-file", help="a text file of prompts, one per line (write \\n for a newline "
                        "inside a prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set of tokens "
                        "whose probability reaches p (1 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-experts", type=int, metavar="LAYER", help="colour every token by the expert of "
                        "highest weight it went to in this MoE layer (terminal and --html)")
    parser.add_argument("--html", help="with --show-experts: the HTML snippet to write (default "
                        "moe-lab-experts.html)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parsed = parser.parse_args(args)
    try:
        return _generate(parsed)
    except UserError as e:
        return fail(str(e))


def _generate(parsed: argparse.Namespace) -> int:
    prompts = list(parsed.prompt)
    if parsed.prompt_file:
        try:
            lines = Path(parsed.prompt_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {parsed.prompt_file}: cannot be read ({e})") from None
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    if parsed.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {parsed.max_new_tokens} must be at least 1")
    html_out = Path(parsed.html or "moe-lab-experts.html").expanduser() if parsed.show_experts is not None else None
    if html_out is not None and (html_out.is_dir() or not html_out.parent.is_dir()):
        raise UserError(f"--html {html_out}: give a file in an existing folder")
    if html_out is not None and html_out.exists() and "moe-lab-experts" not in html_out.read_text(errors="ignore"):
        raise UserError(f"--html {html_out} exists and was not written by moe-lab generate; moe-lab never writes "
                        "over files: choose another path")
    check_device(parsed.device)
    from moe_lab.tools.generate import (Sampling, check_prompts, coloured_html, coloured_terminal, generate,
                                        load_for_inference, stream_writer, token_pieces)

    model, tokenizer, described = load_for_inference(parsed.source)
    model = model.to(parsed.device)
    if parsed.show_experts is not None and parsed.show_experts not in model.moe_layers:
        raise UserError(f"--show-experts {parsed.show_experts} is not an MoE layer; the MoE layers are "
                        f"{model.moe_layers}")
    ids = [tokenizer.encode_prompt(p) for p in prompts]
    check_prompts(model, ids)  # before anything is printed: an error line never ends a half-printed prompt
    sampling = Sampling(parsed.temperature, parsed.top_k, parsed.top_p, parsed.seed)
    sampling.check()
    print(f"moe-lab: {described}; {'greedy' if sampling.temperature == 0 else 'sampling'}, up to "
          f"{parsed.max_new_tokens} new tokens", file=sys.stderr, flush=True)
    single = len(prompts) == 1
    if single:
        print(tokenizer.decode(ids[0]), end="", flush=True)
    results = generate(model, ids, parsed.max_new_tokens, sampling, eos_id=getattr(tokenizer, "eos_id", None),
                       show_layer=parsed.show_experts,
                       on_token=stream_writer(tokenizer, ids[0]) if single else None)
    if single:
        print()
    else:
        for i, r in enumerate(results):
            print(f"[{i}] {tokenizer.decode(r.prompt_ids + r.new_ids)}")
    if parsed.show_experts is not None:
        from moe_lab.files import write_atomically

        rows = []
        for r in results:
            pieces = token_pieces(tokenizer, r.prompt_ids + r.new_ids)
            rows.append((pieces, r.experts, len(r.prompt_ids)))
            print(f"\nlayer {parsed.show_experts}, expert of highest weight per token:\n"
                  + coloured_terminal(pieces, r.experts, colour=sys.stdout.isatty()))
        write_atomically(html_out, coloured_html(rows, parsed.show_experts, model.cfg.moe.num_experts))
        print(f"moe-lab: wrote {html_out}", file=sys.stderr)
    return 0


def eval_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab eval", description="Evaluate a moe-lab checkpoint or a Hugging Face MoE on data: loss, "
        "perplexity and bits per byte, overall and per domain, and per MoE layer the routing statistics training "
        "logs (load, imbalance, drops, dead and starved experts, specialisation). The data settings are moe-lab "
        "train's (data=embedded|text|hf, data.KEY=VALUE; default: the embedded corpus); the held-out split of "
        "the packed blocks is evaluated, tokenised with the model's tokenizer.")
    parser.add_argument("source", help="a moe-lab checkpoint (.ckpt) or a Hugging Face model directory or hub id")
    parser.add_argument("overrides", nargs="*", help="data=..., data.KEY=VALUE, paths.cache_dir=...")
    parser.add_argument("--max-batches", type=int, help="evaluate at most this many batches")
    parser.add_argument("--capacity", choices=["dropless", "checkpoint"], default="dropless",
                        help="dropless (default: every token reaches its experts, as at inference) or the "
                        "checkpoint's eval capacity factor (as its validation ran)")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parsed = parser.parse_args(args)
    try:
        return _evaluate(parsed)
    except UserError as e:
        return fail(str(e))


def _evaluate(parsed: argparse.Namespace) -> int:
    import json

    from moe_lab.cli.preflight import compose_checked

    cfg = compose_checked(list(parsed.overrides), ("data", "paths.cache_dir"), "moe-lab eval",
                          "data=OPTION, data.KEY=VALUE and paths.cache_dir=DIR")
    json_out = Path(parsed.json).expanduser() if parsed.json else None
    if json_out is not None and (json_out.is_dir() or not json_out.parent.is_dir()):
        raise UserError(f"--json {json_out}: give a file in an existing folder")
    if parsed.max_batches is not None and parsed.max_batches < 1:
        raise UserError(f"--max-batches {parsed.max_batches} must be at least 1")
    check_device(parsed.device)
    from moe_lab.tools.evaluate import evaluate, format_report
    from moe_lab.tools.generate import load_for_inference

    model, tokenizer, described = load_for_inference(parsed.source, capacity=parsed.capacity)
    model = model.to(parsed.device)
    run, data, loader = held_out_data(cfg, tokenizer, model.cfg.vocab_size, parsed.max_batches)
    print(f"moe-lab: evaluating {described} on {data.describe()}: {len(data.val_blocks)} held-out blocks of "
          f"{run.data.seq_len} tokens; {parsed.capacity}", file=sys.stderr, flush=True)
    report = evaluate(model, loader, tokenizer, data.domain_names)
    report = {"source": parsed.source, "data": data.describe(), "capacity": parsed.capacity, **report}
    print(format_report(report))
    if json_out is not None:
        from moe_lab.files import write_atomically

        write_atomically(json_out, json.dumps(report, indent=2) + "\n")
        print(f"moe-lab: wrote {json_out}", file=sys.stderr)
    return 0


def analyze_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab analyze", description="The routing analyses MoE papers publish, on a checkpoint and data: domain "
        "and vocabulary specialisation (with the random-routing baseline), expert co-activation within a layer and "
        "transitions between layers, the repeat rate of consecutive tokens against chance, drops by position, and, "
        "given several checkpoints of one run (oldest first), router saturation against the last. The data settings "
        "are moe-lab train's (default: the embedded corpus); the held-out blocks are analysed.")
    parser.add_argument("sources", nargs="+", metavar="CKPT_OR_SETTING",
                        help="moe-lab checkpoints or Hugging Face models (the last is analysed), then data=..., "
                        "data.KEY=VALUE, paths.cache_dir=..., and logger=wandb (logger.wandb.KEY=VALUE) to log the "
                        "results to a W&B run too")
    parser.add_argument("--max-batches", type=int, help="analyse at most this many batches")
    parser.add_argument("--capacity", choices=["dropless", "checkpoint"], default="checkpoint",
                        help="checkpoint (default: the run's eval capacity factor, so drops by position are the "
                        "run's) or dropless")
    parser.add_argument("--capacity-factor", type=float, action="append", default=[], metavar="F",
                        help="also measure drops by position under capacity factor F (repeat for several)")
    parser.add_argument("-o", "--output", default="moe-lab-analysis.html", help="the report's page (default "
                        "%(default)s); the same data goes to the .json beside it, and as tables to "
                        "PAGE.TABLE.csv files (layers, domain_shares, expert_tokens, coactivation, transitions, "
                        "drops_by_position, saturation)")
    parser.add_argument("--trace", help="also write every token's routing (id, domain, position; experts, weights "
                        "and drops per layer) to this Parquet file, for pandas, polars or duckdb")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parsed = parser.parse_args(args)
    try:
        return _analyze(parsed)
    except UserError as e:
        return fail(str(e))


def _analyze(parsed: argparse.Namespace) -> int:
    import json

    from moe_lab.cli.preflight import compose_checked

    sources = [a for a in parsed.sources if "=" not in a]
    overrides = [a for a in parsed.sources if "=" in a]
    if not sources:
        raise UserError("no checkpoint: give CKPT [CKPT ...] before the data settings")
    cfg = compose_checked(overrides, ("data", "paths.cache_dir", "logger"), "moe-lab analyze",
                          "data=OPTION, data.KEY=VALUE, paths.cache_dir=DIR and logger=wandb")
    page_out = Path(parsed.output).expanduser()
    json_out = page_out.with_suffix(".json")
    if page_out.is_dir() or not page_out.parent.is_dir():
        raise UserError(f"-o {page_out}: give a file in an existing folder")
    if parsed.max_batches is not None and parsed.max_batches < 1:
        raise UserError(f"--max-batches {parsed.max_batches} must be at least 1")
    check_device(parsed.device)
    from moe_lab.analysis.dashboard import _checked_output

    _checked_output(page_out)  # refuses a file moe-lab did not write, before any work
    trace_path = Path(parsed.trace).expanduser() if parsed.trace else None
    if trace_path is not None and (trace_path.exists() or not trace_path.parent.is_dir()):
        raise UserError(f"--trace {trace_path}: give a new file in an existing folder (moe-lab never writes over "
                        "files)")
    if json_out.exists() and "\"vocab_specialisation_input\"" not in json_out.read_text(errors="ignore")[:100000]:
        raise UserError(f"{json_out} exists and was not written by moe-lab analyze; choose another -o")
    from moe_lab.tools.analyze import (analyze, check_analysable, check_capacity_factors, check_csv_outputs,
                                       format_summary, summary)
    from moe_lab.tools.generate import load_for_inference

    check_csv_outputs(page_out)
    wandb_node = None
    if "wandb" in cfg.logger:
        from omegaconf import OmegaConf

        wandb_node = OmegaConf.to_container(cfg.logger.wandb, resolve=False)
        wandb_node.pop("save_dir", None)  # the run's directory; an analysis logs beside its page

    loaded = [load_for_inference(source, capacity=parsed.capacity) for source in sources]
    models = [model.to(parsed.device).eval() for model, _, _ in loaded]
    final, tokenizer, described = models[-1], loaded[-1][1], loaded[-1][2]
    check_analysable(final)
    check_capacity_factors(final, parsed.capacity_factor)
    for model, source in zip(models[:-1], sources[:-1]):
        if model.moe_layers != final.moe_layers or model.cfg.moe.num_experts != final.cfg.moe.num_experts:
            raise UserError(f"{source} has other MoE layers or experts than {sources[-1]}: saturation compares "
                            "checkpoints of one run")
    run, data, loader = held_out_data(cfg, tokenizer, final.cfg.vocab_size, parsed.max_batches)
    print(f"moe-lab: analysing {described} on {data.describe()}: {len(loader.batch_sampler)} batches of "
          f"{run.data.batch_size} x {run.data.seq_len} tokens", file=sys.stderr, flush=True)

    def progress(done: int, tokens: int) -> None:
        print(f"\rmoe-lab: {done}/{len(loader.batch_sampler)} batches, {tokens:,} tokens", end="", file=sys.stderr,
              flush=True)

    trace = None
    if trace_path is not None:
        from moe_lab.tools.analyze import TraceWriter

        trace = TraceWriter(trace_path, final.moe_layers, data.domain_names)
    try:
        result = analyze(models, loader, final.cfg.vocab_size, len(data.domain_names), run.data.seq_len,
                         progress=progress, trace=trace, capacity_factors=parsed.capacity_factor)
    finally:
        if trace is not None:
            trace.close()
    print(file=sys.stderr)
    report = {"sources": sources, "data": data.describe(), "capacity": parsed.capacity,
              **summary(result, data.domain_names, final.moe_layers, decode=tokenizer.decode)}
    print(format_summary(report))
    from moe_lab.files import write_atomically

    from moe_lab.analysis.dashboard import write_analysis_page

    write_atomically(json_out, json.dumps(report, indent=2) + "\n")
    from moe_lab.tools.analyze import csv_paths, log_to_wandb, write_csv_tables

    write_csv_tables(report, page_out)
    print(f"moe-lab: wrote {write_analysis_page(report, page_out)}, {json_out} and the tables "
          f"{page_out.parent / (page_out.stem + '.*.csv')} ({', '.join(csv_paths(page_out))})", file=sys.stderr)
    if wandb_node is not None:
        print(f"moe-lab: logged to W&B: {log_to_wandb(report, wandb_node, page_out.parent, f'analyze {sources[-1]}')}",
              file=sys.stderr)
    return 0


def check_device(device: str) -> None:
    """--device cuda needs a CUDA device (generate, eval, analyze)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")


def held_out_data(cfg, tokenizer, vocab_size: int, max_batches: Optional[int]):
    """(run settings, data module, loader) of the held-out blocks of the composed data settings, tokenised with the
    model's own tokenizer; at most `max_batches` batches, evenly spaced (the blocks are grouped by domain)."""
    import numpy as np
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from moe_lab.data.config import TokenizerConfig
    from moe_lab.data.datamodule import LMDataModule, validation_batches
    from moe_lab.training.schemas import validate

    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    cfg.paths.output_dir = "."  # these commands write no run directory
    run = validate(cfg)
    # The model's own tokenizer (end-of-text token included): the blocks are packed as its training packed them.
    tokenizer_cfg = (TokenizerConfig() if tokenizer.name == "bytes"
                     else TokenizerConfig(name=tokenizer.name, eos_token=tokenizer.eos_token))
    data = LMDataModule(run.data, tokenizer_cfg, run.paths.cache_dir, run.seed)
    data.prepare_data()
    data.setup("fit")
    if data.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {data.vocab_size} tokens but the model only {vocab_size}")
    batches = validation_batches(len(data.val_blocks), run.data.batch_size, 0, 1)
    if max_batches is not None and max_batches < len(batches):
        picked = np.unique(np.linspace(0, len(batches) - 1, max_batches).round().astype(int))
        batches = [batches[i] for i in picked]
    return run, data, DataLoader(data.val_blocks, batch_sampler=batches, collate_fn=lambda b: b, num_workers=0)


def bench_command(args: list[str]) -> int:
    parser = ArgumentParser(
        prog="moe-lab bench", description="Time the MoE layer (forward, forward + backward, activation memory) over "
        "a grid of shapes, and whole training steps of model presets (tokens/s, MFU on known GPUs). Prints a table "
        "and writes bench.json and bench.csv.")
    parser.add_argument("--compare", action="store_true", help="also time the peers' MoE layers on the same weights "
                        "(transformers' Mixtral block with eager and grouped_mm experts, torchtitan, OLMo-core: "
                        "pip install -e '.[bench-peers]'; each is checked to compute the same output first, or listed "
                        "with why it was not timed), a dense SwiGLU of equal active parameters, and a whole model "
                        "against its transformers export; print the target ratios")
    parser.add_argument("--loop", action="store_true", help="also time moe-lab's per-expert reference loop")
    parser.add_argument("--capacity", action="store_true", help="also time capacity-limited cases (cf 1.25)")
    parser.add_argument("--no-steps", action="store_true", help="skip the whole-training-step timings")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="directory for bench.json and bench.csv (default benchmarks/results/DATE_TIME)")
    parsed = parser.parse_args(args)
    parsed.argv = args
    if parsed.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return fail("moe-lab bench --device cuda: no CUDA device is available here; use --device cpu")
    if (parsed.threads is not None and parsed.threads < 1) or parsed.repeats < 1 or parsed.warmup < 0:
        return fail("moe-lab bench: --threads and --repeats must be at least 1, --warmup at least 0")
    if parsed.out is not None:
        out = Path(parsed.out).expanduser()
        if out.exists() and not out.is_dir():
            return fail(f"moe-lab bench: --out {out} is a file; give a directory (new, or without bench.json)")
        if (out / "bench.json").exists() or (out / "bench.csv").exists():
            return fail(f"moe-lab bench: --out {out} already holds a benchmark (bench.json); moe-lab never writes "
                        "over results: choose a new directory")
    from moe_lab.tools.bench import run

    run(parsed)
    return 0


def complete(argv: list[str]) -> int:
    """Shell completion: Hydra's bash function calls `moe-lab -sc query=bash` with the whole line in COMP_LINE."""
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) >= 2 and words[1] in SUBCOMMANDS and (len(words) > 2 or line.endswith(" ")):
        # Hydra strips the program name from COMP_LINE; strip the subcommand too, and move the cursor with it.
        cut = line.index(words[1]) + len(words[1])
        os.environ["COMP_LINE"] = line[: line.index(words[1])] + line[cut:].lstrip()
        removed = len(line) - len(os.environ["COMP_LINE"])
        os.environ["COMP_POINT"] = str(max(int(os.environ.get("COMP_POINT", len(line))) - removed, 0))
        sys.argv = [sys.argv[0]] + argv
        from moe_lab.cli.hydra_app import hydra_main

        hydra_main()
        return 0
    prefix = words[1] if len(words) == 2 and not line.endswith(" ") else ""
    print(" ".join(name for name in SUBCOMMANDS if name.startswith(prefix)))
    return 0


def entry() -> None:  # pragma: no cover - thin wrapper for `python -m moe_lab`
    raise SystemExit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
