"""moe-lab checkpoints: read as data, never as code, and written so that a crash never leaves a broken one.

Every checkpoint moe-lab reads goes through `read_checkpoint`, which unpickles with `torch.load(weights_only=True)`
(tensors, numbers, strings, lists and dicts only: a file cannot run code) and turns every failure into one
CheckpointError line. Lightning's own resume (`trainer.fit(ckpt_path=...)`) is given `weights_only=True` too.
Every checkpoint moe-lab writes goes through `AtomicCheckpointIO`: a temporary file in the checkpoint's own folder,
flushed to disk, then renamed over the old file, so a kill during a save leaves the previous checkpoint whole.
A sharded checkpoint (a torch.distributed.checkpoint folder, `sharded_checkpoint.py`) is read here whole, in one
process, and has the same contents as a single file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moe_lab.data.config import TokenizerConfig
from moe_lab.data.tokenizer import HFTokenizer, build_tokenizer
from moe_lab.errors import CheckpointError, UserError
from moe_lab.files import write_atomically
from moe_lab.memory import check_fits
from moe_lab.model import ModelConfig
from moe_lab.training.module import MoELanguageModel
from moe_lab.training.sharded_checkpoint import (
    ShardedWriter,
    ShardLayout,
    is_sharded_checkpoint,
    read_sharded,
    tensor_bytes,
    verify_sharded,
)

# A model's layout, not what it computes: a checkpoint resumes under any value of these.
LAYOUT_KEYS = ("expert_parallel", "implementation")


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a moe-lab checkpoint by its form (a file, or a sharded checkpoint's folder), rather than a
    Hugging Face model folder or a hub id."""
    path = Path(path).expanduser()
    return path.is_file() or is_sharded_checkpoint(path)


def read_checkpoint(
    path: str | Path, setting: Optional[str] = None, weights: bool = True, layout: Optional[ShardLayout] = None
) -> dict[str, Any]:
    """The contents of a moe-lab checkpoint (a file, memory-mapped; or a sharded checkpoint's folder, read whole or,
    with `layout`, as this rank's part), on the CPU. CheckpointError if it is missing, unreadable or was not written
    by moe-lab; `setting` (e.g. ckpt_path) names where the path came from in the message. `weights=False` may leave
    out the weights and optimizer tensors (a sharded checkpoint's settings, step and origin are read without them)."""
    file = Path(path).expanduser()
    where = f"{setting + '=' if setting else ''}{path}"
    if is_sharded_checkpoint(file):
        ckpt = read_sharded(file, layout, weights=weights)
        if not isinstance((ckpt.get("hyper_parameters") or {}).get("model"), dict):
            raise CheckpointError(f"{path} was not written by moe-lab (it has no model settings)")
        return ckpt
    if file.is_dir():
        refuse_run_dir(file, where)
        raise CheckpointError(f"{where} is a directory; give a checkpoint file (.ckpt)")
    if not file.is_file():
        raise CheckpointError(
            f"{where}: no such checkpoint file" + (" (a link that leads nowhere)" if file.is_symlink() else "")
        )
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a pickle with code in it, a truncated or foreign file, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable moe-lab checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or not isinstance((ckpt.get("hyper_parameters") or {}).get("model"), dict):
        raise CheckpointError(f"{path} was not written by moe-lab (it has no model settings)")
    _verify_checksum(ckpt, file, path)
    return ckpt


def refuse_run_dir(path: Path, where: str | Path) -> None:
    """CheckpointError pointing at a run directory's checkpoint when `path` is a run (or sweep job) directory: what a
    user gives eval, generate or a resume after `ls outputs/DATE`."""
    inside = path / "checkpoints" / "last.ckpt"
    if is_checkpoint(inside):
        raise CheckpointError(f"{where} is a run directory; give its checkpoint, {inside}")


CHECKSUM = "moe_lab_checksum"  # SHA-256 of the weights, written with every checkpoint moe-lab saves
_verified: dict[tuple, dict] = {}  # files already verified in this process, by identity and state


def weights_checksum(state_dict: dict[str, Any]) -> str:
    """SHA-256 over the weights' names, dtypes, shapes and bytes, in name order."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


def optimizer_checksum(optimizer_states: list) -> str:
    """SHA-256 over every optimizer-state tensor (Adam's step and moments), by optimizer, slot and name: a flipped bit
    in `exp_avg_sq` would otherwise resume silently."""
    return weights_checksum(
        {
            f"{i}/{slot}/{key}": value
            for i, saved in enumerate(optimizer_states)
            for slot, state in (saved.get("state") or {}).items()
            for key, value in state.items()
        }
    )


def with_checksum(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint with the checksums of its weights and optimizer state added (what AtomicCheckpointIO and the
    importer write)."""
    if isinstance(checkpoint.get("state_dict"), dict):
        checkpoint[CHECKSUM] = {"sha256": weights_checksum(checkpoint["state_dict"])}
        if isinstance(checkpoint.get("optimizer_states"), list):
            checkpoint[CHECKSUM]["optimizer_sha256"] = optimizer_checksum(checkpoint["optimizer_states"])
    return checkpoint


def dict_at(node: dict[str, Any], key: str) -> dict[str, Any]:
    """node[key] where it is a dict, else {} (a file's contents are data: a field may be missing or of another kind)."""
    value = node.get(key)
    return value if isinstance(value, dict) else {}


def _verify_checksum(ckpt: dict[str, Any], file: Path, path: str | Path) -> None:
    """CheckpointError when the weights or the optimizer state differ from the checksums saved with them (a flipped
    bit, a cut copy). Checkpoints written before moe-lab saved checksums have none and are read as they are."""
    saved = dict_at(ckpt, CHECKSUM)
    if saved.get("sha256") is None or not isinstance(ckpt.get("state_dict"), dict):
        return
    stat = file.stat()
    identity = (str(file.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _verified.get(identity) == saved:
        return
    damaged = "its weights do not" if weights_checksum(ckpt["state_dict"]) != saved["sha256"] else ""
    if not damaged and saved.get("optimizer_sha256") is not None:
        states = ckpt.get("optimizer_states")
        if not isinstance(states, list) or optimizer_checksum(states) != saved["optimizer_sha256"]:
            damaged = "its optimizer state does not"
    if damaged:
        raise CheckpointError(
            f"{path} is damaged: {damaged} match the checksum saved with it (a flipped bit, or a copy cut short); "
            "restore it from a good copy"
        )
    _verified[identity] = dict(saved)


def checkpoint_model_config(ckpt: dict[str, Any], path: str | Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its model settings are not moe-lab's ({e})") from None


def check_resume(
    ckpt_path: Optional[str],
    model: ModelConfig,
    max_steps: Optional[int] = None,
    tokenizer: Optional[TokenizerConfig] = None,
    ckpt: Optional[dict[str, Any]] = None,
) -> Optional[str]:
    """The checkpoint to resume from, after checking that it is moe-lab's, holds the configured model and tokenizer
    (a tokenizer is part of the model: other token ids would land on embeddings learned for others) and has
    training left to do (its step is below `max_steps`, the configured trainer.max_steps). `ckpt`: its contents,
    when already read (without weights)."""
    if ckpt_path is None:
        return None
    if ckpt is None:
        ckpt = read_checkpoint(ckpt_path, setting="ckpt_path", weights=False)
    if is_sharded_checkpoint(Path(ckpt_path).expanduser()):  # every tensor against its checksum, before any claim
        verify_sharded(Path(ckpt_path).expanduser())
    if tokenizer is not None:
        _check_tokenizer(ckpt, ckpt_path, tokenizer)
    saved = dataclasses.asdict(checkpoint_model_config(ckpt, ckpt_path))
    wanted = dataclasses.asdict(model)
    for layout in LAYOUT_KEYS:
        saved["moe"].pop(layout, None)
        wanted["moe"].pop(layout, None)
    if wanted.get("vocab_size") is None:
        wanted["vocab_size"] = saved.get("vocab_size")
    differences = _differences(saved, wanted, "model")
    if differences:
        raise CheckpointError(
            "the checkpoint's model differs from the configured one: "
            + "; ".join(differences[:5])
            + ". A resumed run keeps its model: drop the overrides that change it"
        )
    step = int(ckpt.get("global_step", 0))
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        raise CheckpointError(
            f"nothing to do: {ckpt_path} is at step {step} and trainer.max_steps={max_steps}, so "
            f"the run is already finished; to train on, raise it, e.g. moe-lab train "
            f"ckpt_path={ckpt_path} trainer.max_steps={max(2 * step, step + 1)}"
        )
    return str(Path(ckpt_path).expanduser())


def _check_tokenizer(ckpt: dict[str, Any], ckpt_path: str, tokenizer: TokenizerConfig) -> None:
    """CheckpointError unless `tokenizer` is the checkpoint's: the same vocabulary (compared by the tokenizer file's
    content, so a moved tokenizer.json is the same tokenizer) and the same end-of-document token."""
    settings = ckpt["hyper_parameters"].get("tokenizer") or {}
    saved = (ckpt.get("moe_lab_run") or {}).get("tokenizer")
    if not isinstance(saved, str):  # older checkpoints: the identity of the tokenizer they name
        try:
            saved = tokenizer_identity(checkpoint_tokenizer(Path(ckpt_path).expanduser(), settings))
        except UserError:
            return  # the tokenizer it was trained with is gone; the configured one is all there is
    if tokenizer_identity(build_tokenizer(tokenizer)) == saved:
        return
    here = {"name": tokenizer.name, "eos_token": tokenizer.eos_token}
    differences = [
        f"tokenizer.{k} is {settings.get(k)!r} in the checkpoint but {here[k]!r} here"
        for k in here
        if settings.get(k) != here[k]
    ] or [f"tokenizer.name {tokenizer.name!r} has other contents than the tokenizer the checkpoint was trained with"]
    raise CheckpointError(
        "the checkpoint's tokenizer differs from the configured one: "
        + "; ".join(differences)
        + ". A resumed run keeps its tokenizer (other token ids would land on embeddings learned for "
        "others): drop the tokenizer overrides"
    )


def tokenizer_identity(tokenizer: Any) -> str:
    """What makes two tokenizers the same for a model: their vocabulary file's content and end-of-document id."""
    return f"{tokenizer.fingerprint}:{tokenizer.eos_id}"


def checkpoint_tokenizer(ckpt: Path, settings: dict):
    """The tokenizer a checkpoint was trained with; an imported checkpoint's `tokenizer/` folder beside it first
    (so a moved import still finds its own)."""
    beside = ckpt.parent / "tokenizer"
    if settings.get("name") and (beside / "tokenizer.json").is_file():
        return HFTokenizer(str(beside), settings.get("eos_token"))
    return build_tokenizer(TokenizerConfig(**{k: settings.get(k) for k in ("name", "eos_token")}))


def holds_training_state(ckpt_path: str | Path) -> bool:
    """Whether a checkpoint can resume training (optimizer state, loop counters), as moe-lab's runs write them; an
    imported model (`moe-lab import`) holds weights only, and a run from it starts at step 0 with a fresh optimizer."""
    return "optimizer_states" in read_checkpoint(ckpt_path, setting="ckpt_path", weights=False)


# Overrides that say where a run starts or writes, not what it is: a resumed run does not inherit them. A checkpoint
# saves none of them, nor any other hydra.* override; an older run's .hydra/overrides.yaml may hold them.
WHERE_KEYS = ("ckpt_path", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir")


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def saved(override: str) -> bool:
    """Whether a run saves this command-line override in its checkpoints (for a resume to inherit)."""
    key = _key(override)
    return key != "ckpt_path" and not key.startswith(("hydra.", "hydra/"))


@dataclasses.dataclass
class CheckpointOrigin:
    """Where a checkpoint came from: its optimizer step, the command-line overrides of the run that wrote it (what a
    resumed run inherits) and that run's directory (None if it is gone)."""

    step: int
    overrides: list[str]
    run_dir: Optional[Path]
    imported: Optional[str] = None  # the Hugging Face model it was imported from (`moe-lab import`)
    data: Optional[str] = None  # the cache key (content digest and settings) of the data it was trained on
    source: str = ""  # the file the overrides were read from (the checkpoint, or its run's .hydra/overrides.yaml)


def checkpoint_origin(ckpt_path: str | Path) -> CheckpointOrigin:
    """The origin of a checkpoint. Checkpoints written before moe-lab saved its overrides fall back to the
    `.hydra/overrides.yaml` of the run directory that holds them."""
    import yaml

    from moe_lab.analysis.runs import is_run_dir

    ckpt = read_checkpoint(ckpt_path, setting="ckpt_path", weights=False)
    run = dict_at(ckpt, "moe_lab_run")
    run_dir = Path(run["run_dir"]) if isinstance(run.get("run_dir"), str) else None
    file = Path(ckpt_path).expanduser().absolute()
    holder = file.parent.parent  # RUN/checkpoints/last.ckpt
    if file.parent.name == "checkpoints" and is_run_dir(holder):
        run_dir = holder  # the run that holds it, wherever it was moved (a continued sweep's .attempts/N-K)
    if run_dir is not None and not run_dir.is_dir():
        run_dir = None
    overrides, source = run.get("overrides"), str(ckpt_path)
    if not isinstance(overrides, list) and run_dir is not None and (run_dir / ".hydra" / "overrides.yaml").is_file():
        source = str(run_dir / ".hydra" / "overrides.yaml")
        try:
            overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{source} is damaged ({type(e).__name__}); restore or delete it") from None
    if overrides is not None and not (isinstance(overrides, list) and all(isinstance(o, str) for o in overrides)):
        raise CheckpointError(
            f"{source}: its saved overrides are not a list of strings; the file is damaged or was "
            "not written by moe-lab"
        )
    overrides = [o for o in overrides or [] if _key(o) not in WHERE_KEYS]
    imported = dict_at(ckpt, "moe_lab_imported")
    beside = Path(ckpt_path).expanduser().absolute().parent / "tokenizer"
    weights_only = "optimizer_states" not in ckpt  # an import, or a pruned model (moe-lab prune), with its own
    if weights_only and (beside / "tokenizer.json").is_file():  # tokenizer: moved, it still finds it
        overrides = [o for o in overrides if not o.startswith("tokenizer.name=")] + [f"tokenizer.name='{beside}'"]
    return CheckpointOrigin(
        step=int(ckpt.get("global_step", 0)),
        overrides=overrides,
        run_dir=run_dir,
        imported=str(imported["source"]) if imported.get("source") else None,
        source=source,
        data=run.get("data") if isinstance(run.get("data"), str) else None,
    )


def _differences(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [f"{prefix} is {a!r} in the checkpoint but {b!r} here"]


def load_model(ckpt_path: str | Path, map_location: str | torch.device = "cpu", capacity: str = "dropless"):
    """The trained model of a moe-lab checkpoint, in eval mode: `load_model(p)(ids_BT)` -> logits (B, T, V). Its
    `hparams` hold the run's model, optimizer and tokenizer settings.

    `capacity="dropless"` (the default) routes every token to its experts, as inference should: a token's logits do
    not depend on the other tokens of the batch or on later positions (with a causal router), and they equal the
    Hugging Face export's. `capacity="checkpoint"` keeps the run's `eval_capacity_factor`, as its validation did.
    Expert choice is a capacity by nature and keeps its factor either way.
    """
    if capacity not in ("dropless", "checkpoint"):
        raise ValueError(f"capacity={capacity!r}; choose 'dropless' or 'checkpoint'")
    ckpt = read_checkpoint(ckpt_path)
    hparams = ckpt["hyper_parameters"]
    model_cfg = checkpoint_model_config(ckpt, ckpt_path)
    check_fits(
        model_cfg, 4, f"loading {ckpt_path}", "Its saved model settings are not those of a model this machine can hold."
    )
    if capacity == "dropless" and model_cfg.moe.router.uses_capacity:
        model_cfg.moe.eval_capacity_factor = None
    module = MoELanguageModel(
        model=model_cfg,
        optim=hparams.get("optim") or {},
        domain_names=hparams.get("domain_names"),
        tokenizer=hparams.get("tokenizer"),
        seed=hparams.get("seed", 0),
    )
    try:
        module.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{ckpt_path}: its weights do not fit its model settings ({str(e).splitlines()[0]})"
        ) from None
    module.checkpoint_step = ckpt.get("global_step")  # the optimizer steps it was trained for (analyses plot by it)
    return module.to(map_location).eval()


def refuse_non_finite(model: torch.nn.Module, source: str | Path) -> None:
    """CheckpointError when a model's weights hold NaN or infinite values: its checksum only says they were saved so,
    and nothing it computes (logits, samples, losses, routing) would mean anything."""
    broken = [
        name for name, p in model.state_dict().items() if p.is_floating_point() and not bool(torch.isfinite(p).all())
    ]
    if broken:
        raise CheckpointError(
            f"{source}: its weights hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{', ...' if len(broken) > 3 else ''}); moe-lab does not run or export a broken model (the run's last "
            "good checkpoint is named in its summary.json)"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on any filesystem layout: the bytes go to a temporary file beside
    the checkpoint (never in the system's temp dir, which may be another filesystem, where a rename is a copy), are
    fsync'ed, and replace the old file in one rename. With `sharded`, a one-process run writes the sharded format
    (checkpoint.format=sharded; several processes write it through their strategy), in the background with
    `async_save`. It reads both formats. `last_saved` is the newest checkpoint written whole."""

    def __init__(self, sharded: bool = False, async_save: bool = False) -> None:
        super().__init__()
        self.sharded = sharded
        self.sharded_writer = ShardedWriter(async_save, on_saved=self._saved)
        self.last_saved: Optional[Path] = None

    def _saved(self, path: Path) -> None:
        self.last_saved = path

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.sharded:
            self.sharded_writer.save(checkpoint, path, sharding=None)
        else:
            write_atomically(path, lambda f: torch.save(with_checksum(checkpoint), f))
            self.last_saved = path

    def teardown(self) -> None:
        self.sharded_writer.wait()  # a background save finishes before the run ends

    def load_checkpoint(self, path, map_location: Any = None, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            return read_sharded(path)
        if not Path(path).is_file():
            return super().load_checkpoint(path, weights_only=True)  # Lightning's own error
        # Mapped, not read: a rank under expert parallelism copies out its own experts' rows (and the dense part)
        # and never reads the pages of the experts other ranks hold.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def remove_checkpoint(self, path) -> None:
        if Path(path).is_symlink():  # last.ckpt as a link to a periodic checkpoint: the link only
            Path(path).unlink()
        else:
            super().remove_checkpoint(path)
