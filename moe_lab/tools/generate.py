"""`moe-lab generate CKPT_OR_HF_DIR --prompt "..."`: text from a moe-lab checkpoint or a Hugging Face MoE.

Generation runs the model with a KV cache (`moe_lab/model/gpt.py`): the prompts once, batched and left-padded (the
padding takes no position and no token attends to it), then one token per step. Decoding is greedy (temperature 0,
the default) or sampled with temperature, top-k and top-p (nucleus; Holtzman et al. 2020) from a seeded generator.
Inference is dropless, as `moe_lab.load_model` is: a token's routing never depends on the other prompts of the
batch. `--show-experts LAYER` colours every token by the expert of highest weight it went to in that layer, in the
terminal and in an HTML snippet.
"""

from __future__ import annotations

import html
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moe_lab.errors import UserError
from moe_lab.model import MoETransformer
from moe_lab.model.attention import KVCache

# Distinct background colours for experts (ANSI 256-colour codes and the same colours in hex), cycled past 16.
ANSI = [25, 166, 28, 160, 30, 136, 97, 205, 94, 244, 33, 208, 34, 196, 37, 178]
HEX = [
    "#1f5fbf",
    "#d75f00",
    "#008700",
    "#d70000",
    "#008787",
    "#af8700",
    "#875faf",
    "#ff5faf",
    "#875f00",
    "#808080",
    "#0087ff",
    "#ff8700",
    "#00af00",
    "#ff0000",
    "#00afaf",
    "#d7af00",
]


@dataclass
class Sampling:
    """How the next token is chosen: greedy at temperature 0, else sampled from the tempered distribution, cut to
    the top_k most likely tokens (0 = all) and to the smallest set whose probability reaches top_p (1 = all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        # not (t >= 0) also refuses NaN, which every comparison fails; an infinite temperature would sample uniformly.
        if not (0 <= self.temperature < math.inf) or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(
                f"--temperature {self.temperature}, --top-k {self.top_k}, --top-p {self.top_p}: the "
                "temperature must be a finite number >= 0, top-k >= 0 and top-p in (0, 1]"
            )


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    # With a layer to show: the expert of every token (prompt, then generated); -1 = none took it.
    experts: list[int] = field(default_factory=list)


def next_tokens(logits_BV: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    if sampling.temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / sampling.temperature
    if sampling.top_k:
        kth = logits_BV.topk(min(sampling.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the tokens more likely than it already reach top_p (the most likely is always kept).
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV >= sampling.top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def check_prompts(model: MoETransformer, prompts: list[list[int]]) -> None:
    """UserError unless the model can continue these prompts: a router that needs a domain label cannot, an empty
    prompt or one that fills the model's context leaves nothing to do."""
    oracle = [m.router.registered_name for m in model.moe_modules() if m.router.needs_domain]
    if oracle:
        raise UserError(
            f"router={oracle[0]} routes by the data's domain label, which a prompt does not have: it cannot generate"
        )
    if any(not p for p in prompts):
        raise UserError("a prompt is empty (it has no tokens); give some text")
    longest = max(len(p) for p in prompts)
    if longest >= model.cfg.max_seq_len:
        raise UserError(
            f"the longest prompt has {longest} tokens and the model's context is "
            f"{model.cfg.max_seq_len}: it leaves no room for a new token; shorten the prompt"
        )


@torch.no_grad()
def generate(
    model: MoETransformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling,
    eos_id: Optional[int] = None,
    show_layer: Optional[int] = None,
    on_token: Optional[Callable[[int, int], None]] = None,
) -> list[Generation]:
    """Continue each prompt by up to `max_new_tokens` tokens (stopping at `eos_id`). `on_token(i, token)` is called
    as each token of prompt i is chosen (streaming)."""
    sampling.check()
    check_prompts(model, prompts)
    model.eval()
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - longest)
    ids_BS = torch.zeros(B, longest, dtype=torch.long, device=device)
    valid_BS = torch.zeros(B, longest, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at the same position
        ids_BS[i, longest - len(p) :] = torch.tensor(p, device=device)
        valid_BS[i, longest - len(p) :] = True
    cache = KVCache(model.cfg, B, longest + max_new_tokens, device, next(model.parameters()).dtype)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    results = [Generation(list(p)) for p in prompts]
    out = model(ids_BS, cache=cache, valid_BS=valid_BS)
    if show_layer is not None:
        experts_BS = out.moe[show_layer].top_expert_T(B * longest).view(B, longest)
        for i, p in enumerate(prompts):
            results[i].experts += experts_BS[i, longest - len(p) :].tolist()
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token_B = next_tokens(out.logits[:, -1], sampling, generator)
        for i in range(B):
            if not done[i]:
                results[i].new_ids.append(int(token_B[i]))
                if on_token is not None:
                    on_token(i, int(token_B[i]))
        if eos_id is not None:
            done |= token_B == eos_id
        if bool(done.all()) or (step == max_new_tokens - 1 and show_layer is None):
            break  # (with a layer to show, the last token still goes through the model for its routing)
        out = model(token_B[:, None], cache=cache, valid_BS=~done[:, None])
        if show_layer is not None:
            expert_B = out.moe[show_layer].top_expert_T(B)
            for i in range(B):
                if not done[i]:
                    results[i].experts.append(int(expert_B[i]))
    return results


# ------------------------------------------------------------------------------------------------------------
# Loading a model to generate with


def load_for_inference(source: str, capacity: str = "dropless") -> tuple[MoETransformer, Any, str]:
    """(model, tokenizer, description) of a moe-lab checkpoint or a Hugging Face MoE (directory or hub id), in eval
    mode; dropless unless `capacity="checkpoint"` (a moe-lab checkpoint's eval capacity factor)."""
    path = Path(source).expanduser()
    if not path.exists() and (source.endswith(".ckpt") or path.is_absolute() or source.startswith((".", "~"))):
        raise UserError(f"{source}: no such checkpoint file or model directory")
    from moe_lab.training.checkpoint import is_checkpoint, refuse_run_dir

    refuse_run_dir(path, source)
    if is_checkpoint(path):
        from moe_lab.training.checkpoint import checkpoint_tokenizer, load_model, refuse_non_finite

        module = load_model(path, capacity=capacity)
        refuse_non_finite(module.model, source)
        module.model.checkpoint_step = module.checkpoint_step
        tokenizer = checkpoint_tokenizer(path, module.hparams.get("tokenizer") or {})
        return module.model, tokenizer, f"{path} ({module.model.cfg.name})"
    from transformers import AutoModelForCausalLM

    from moe_lab.data.tokenizer import HFTokenizer
    from moe_lab.interop.huggingface import build_model, load_hf, read_hf_config

    hf_config, _ = read_hf_config(source)  # refuses what it cannot represent (or would run code) before reading weights
    hf = load_hf(
        lambda: AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, trust_remote_code=False),
        source,
        "weights",
    )
    model = build_model(hf)
    from moe_lab.training.checkpoint import refuse_non_finite

    refuse_non_finite(model, source)
    folder = (
        path
        if path.is_dir()
        else Path(
            load_hf(
                lambda: __import__("huggingface_hub").snapshot_download(
                    source, allow_patterns=["tokenizer*", "*.json"]
                ),
                source,
                "tokenizer",
            )
        )
    )
    from tokenizers import Tokenizer

    eos = hf_config.eos_token_id if isinstance(hf_config.eos_token_id, int) else None
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{source} has no tokenizer.json (a slow tokenizer); moe-lab reads fast tokenizers only")
    eos_token = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(eos) if eos is not None else None
    tokenizer = HFTokenizer(str(folder), eos_token)
    return model, tokenizer, f"{source} ({hf_config.model_type})"


# ------------------------------------------------------------------------------------------------------------
# Showing routing


def coloured_terminal(pieces: list[str], experts: list[int], colour: bool = True) -> str:
    """The text with each token on its expert's colour; without colour (output to a file or pipe), runs of tokens
    that went to the same expert as [E3:text]."""
    if colour:
        return "".join(
            f"\033[48;5;{ANSI[e % len(ANSI)]}m\033[97m{text}\033[0m" if e >= 0 else text
            for text, e in zip(pieces, experts)
        )
    runs: list[list] = []
    for text, e in zip(pieces, experts):
        if runs and runs[-1][0] == e:
            runs[-1][1] += text
        else:
            runs.append([e, text])
    return "".join(f"[E{e}:{text}]" if e >= 0 else f"[-:{text}]" for e, text in runs)


def coloured_html(rows: list[tuple[list[str], list[int], int]], layer: int, num_experts: int) -> str:
    """A self-contained HTML snippet: each row's tokens on the colour of their expert (hover: the expert), the
    generated part underlined, and a legend."""
    style = "font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; font-size: 14px"
    legend = " ".join(
        f'<span style="background:{HEX[e % len(HEX)]};color:#fff;padding:1px 5px">E{e}</span>'
        for e in range(num_experts)
    )
    body = []
    for pieces, experts, prompt_len in rows:
        spans = []
        for i, (text, e) in enumerate(zip(pieces, experts)):
            colour = HEX[e % len(HEX)] if e >= 0 else "#ffffff"
            line = "text-decoration: underline;" if i >= prompt_len else ""
            spans.append(
                f'<span title="expert {e}" style="background:{colour};color:#fff;{line}">{html.escape(text)}</span>'
            )
        body.append(f'<div style="{style}; margin: 8px 0">{"".join(spans)}</div>')
    return (
        f'<div class="moe-lab-experts"><p style="font: 13px sans-serif">Expert of highest weight per token, '
        f"layer {layer} (underlined: generated)</p><p>{legend}</p>{''.join(body)}</div>\n"
    )


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text of each token, such that the pieces join to the decoded text (a multi-byte character split over
    tokens goes to its last token)."""
    pieces, done = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if text.endswith("\ufffd"):  # an unfinished character: wait for its last byte
            pieces.append("")
            continue
        pieces.append(text[len(done) :] if text.startswith(done) else text)
        done = text
    return pieces


def stream_writer(tokenizer: Any, prompt: list[int], out: Optional[Any] = None) -> Callable[[int, int], None]:
    """An on_token callback that prints the new text of prompt 0 as it comes (whole characters only), to `out` (the
    standard output of the moment it is made: not the one of the moment this module was imported)."""
    out = sys.stdout if out is None else out
    state = {"ids": list(prompt), "shown": tokenizer.decode(prompt)}

    def write(i: int, token: int) -> None:
        if i != 0:
            return
        state["ids"].append(token)
        text = tokenizer.decode(state["ids"])
        if text.endswith("\ufffd") or not text.startswith(state["shown"]):
            return
        out.write(text[len(state["shown"]) :])
        out.flush()
        state["shown"] = text

    return write


# ------------------------------------------------------------------------------------------------------------
# The command


def run(args: Any) -> int:
    """`moe-lab generate` with its parsed arguments (moe_lab/cli/commands.py): the prompts, then the continuations,
    streamed for one prompt; with --show-experts, the tokens coloured by expert in the terminal and an HTML file."""
    prompts = read_prompts(args.prompt, args.prompt_file)
    html_out = Path(args.html).expanduser() if args.show_experts is not None else None  # set by its check
    if html_out is not None and html_out.exists() and "moe-lab-experts" not in html_out.read_text(errors="ignore"):
        raise UserError(
            f"--html {html_out} exists and was not written by moe-lab generate; moe-lab never writes "
            "over files: choose another path"
        )
    model, tokenizer, described = load_for_inference(args.source)
    model = model.to(args.device)
    if args.show_experts is not None and args.show_experts not in model.moe_layers:
        raise UserError(
            f"--show-experts {args.show_experts} is not an MoE layer; the MoE layers are {model.moe_layers}"
        )
    ids = [tokenizer.encode_prompt(p) for p in prompts]
    check_prompts(model, ids)  # before anything is printed: an error line never ends a half-printed prompt
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    sampling.check()
    print(
        f"moe-lab: {described}; {'greedy' if sampling.temperature == 0 else 'sampling'}, up to "
        f"{args.max_new_tokens} new tokens",
        file=sys.stderr,
        flush=True,
    )
    single = len(prompts) == 1
    if single:
        print(tokenizer.decode(ids[0]), end="", flush=True)
    results = generate(
        model,
        ids,
        args.max_new_tokens,
        sampling,
        eos_id=getattr(tokenizer, "eos_id", None),
        show_layer=args.show_experts,
        on_token=stream_writer(tokenizer, ids[0]) if single else None,
    )
    if single:
        print()
    else:
        for i, r in enumerate(results):
            print(f"[{i}] {tokenizer.decode(r.prompt_ids + r.new_ids)}")
    if html_out is not None:
        show_experts(results, tokenizer, args.show_experts, model.cfg.moe.num_experts, html_out)
    return 0


def read_prompts(given: list[str], prompt_file: Optional[str]) -> list[str]:
    """The --prompt texts, then the lines of --prompt-file (`\\n` in a line is a newline)."""
    prompts = list(given)
    if prompt_file:
        try:
            lines = Path(prompt_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompt-file {prompt_file}: cannot be read ({e})") from None
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def show_experts(results: list[Generation], tokenizer: Any, layer: int, num_experts: int, html_out: Path) -> None:
    """Every token coloured by its expert of highest weight in `layer`: printed, and written to `html_out`."""
    from moe_lab.files import write_atomically

    rows = []
    for r in results:
        pieces = token_pieces(tokenizer, r.prompt_ids + r.new_ids)
        rows.append((pieces, r.experts, len(r.prompt_ids)))
        print(
            f"\nlayer {layer}, expert of highest weight per token:\n"
            + coloured_terminal(pieces, r.experts, colour=sys.stdout.isatty())
        )
    write_atomically(html_out, coloured_html(rows, layer, num_experts))
    print(f"moe-lab: wrote {html_out}", file=sys.stderr)
