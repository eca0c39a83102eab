"""Sharded checkpoints: a torch.distributed.checkpoint (DCP) folder, the format torchtitan and Megatron-Core write.

Under expert parallelism each rank holds E / P of every MoE layer's experts and of their Adam moments. A single-file
checkpoint gathers all of them into one process first, which is what breaks first at the scale expert parallelism
exists for. A sharded checkpoint is a folder in which each rank writes what it holds:

    step000100.ckpt/
        .metadata        DCP's index: every tensor's global shape, and which file holds which slice of it
        __0_0.distcp     the tensors rank 0 wrote (its experts and moments, its share of the dense weights), ...
        meta.pt          everything else: settings, loop counters, optimizer hyper-parameters (torch.save)

Expert weights and their moments are saved as DTensors on an (EDP, EP) device mesh, sharded along the experts over
EP and replicated over EDP, so DCP has exactly one rank write each expert; the dense weights, the same on every rank,
are written once (DCP spreads them over the ranks). No rank gathers anything. Loading builds the same DTensors for
the layout it resumes under and DCP reads each rank's own slice: a checkpoint of P = 2 resumes under P = 1 or 4. In
one process (`load_model`, eval, analyze, generate, export, a one-process resume) the folder is read whole.

Files are data: DCP's `.metadata` is a pickle, read here by an unpickler that builds only DCP's own metadata
classes; every file the index names must be a regular file of the folder's own (no `../`, no link, no FIFO) and long
enough for its items; tensors are read by DCP with `torch.load(weights_only=True)`; DCP's byte items (arbitrary
pickles, which its loader unpickles with weights_only=False) are never requested; `meta.pt` is read with
weights_only=True and carries a checksum of its own, as every weight and optimizer-state tensor does. Every failure
of a read, DCP's CheckpointException (a BaseException) included, is one CheckpointError.
A save is atomic: the folder is written under a temporary name beside the checkpoint (the name `files.py` gives
temporary files, so a killed save's leftovers are removed as theirs are) and renamed into place when whole.

Legend: E experts in a bank, El = E / P the experts a rank holds.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, Replicate, Shard

from moe_lab.errors import CheckpointError
from moe_lab.files import disk_full, fsync_directory, temp_folder_beside, write_atomically

META = "meta.pt"  # the non-tensor part of the checkpoint
INDEX = "moe_lab_sharded"  # meta.pt's record of where each tensor of the checkpoint was taken from
CHECKSUMS = "moe_lab_checksums"  # meta.pt's SHA-256 of the weights, per slice that a rank held (start, length, hex)
TensorPath = tuple  # ("state_dict", NAME) or ("optimizer_states", I, "state", SLOT, KEY)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a folder that a sharded save wrote whole (DCP's index and moe-lab's meta.pt are in it)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / ".metadata").is_file() and (path / META).is_file()


@dataclass(frozen=True)
class ShardLayout:
    """How the tensors this rank holds sit in the checkpoint's whole tensors.

    Expert parallelism: an expert weight or Adam moment holds the rank's E / P experts, written as a DTensor on the
    (EDP, EP) `mesh`, sharded over EP and replicated over EDP. trainer=fsdp: the dense weights and their moments are
    FSDP2's Shard(0) DTensors and are written as they are (each rank its shard); an expert bank that FSDP shards over
    its EDP ranks is written on `expert_mesh`, the same ranks as (EP, EDP), sharded over both: an EP rank's experts,
    cut among the ranks that hold them. In every case no rank gathers anything to save, and a load reads each rank's
    part only, for the layout it resumes under."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh, dims ("edp", "ep")
    bank_of: Callable[[TensorPath], Optional[Any]]  # -> the GroupedExperts whose experts the tensor is indexed by
    # -> the parameter the tensor is, or is an optimizer moment of (trainer=fsdp: a DTensor)
    param_of: Callable[[TensorPath], Optional[Any]] = lambda _: None
    expert_mesh: Any = None  # trainer=fsdp under expert parallelism: dims ("ep", "edp")

    def local_experts(self, path: TensorPath, shape: tuple) -> Optional[Any]:
        """The bank if the tensor at `path` with global (or local) shape is indexed by its experts along dim 0."""
        bank = self.bank_of(path)
        if bank is not None and len(shape) > 0 and shape[0] in (bank.total_experts, bank.num_experts):
            return bank
        return None

    def _shard(self, path: TensorPath, shape: tuple) -> Optional[Any]:
        """The FSDP parameter (a DTensor) whose layout the tensor at `path` with this shape has, if any."""
        param = self.param_of(path)
        return param if isinstance(param, DTensor) and tuple(param.shape) == tuple(shape) else None

    def saved_form(self, path: TensorPath, held: torch.Tensor) -> torch.Tensor:
        """What DCP writes for a tensor this rank holds: a DTensor of the whole tensor, or the tensor itself when every
        rank holds it whole."""
        bank = self.local_experts(path, tuple(held.shape))
        if isinstance(held, DTensor):
            if bank is None or not bank.is_sharded:
                return held  # FSDP's shard of the whole
            return self._experts(held.to_local(), bank.total_experts, self.expert_mesh, _EP_THEN_EDP)
        if bank is None or not bank.is_sharded:
            return held
        return self._experts(held, bank.total_experts, self.mesh, _EP_OF_EDP_EP)

    def template(self, path: TensorPath, size: tuple, dtype: torch.dtype) -> torch.Tensor:
        """What DCP reads a checkpoint tensor of global `size` into: this rank's part of it, in its saved form."""
        bank = self.local_experts(path, size)
        sharded = bank is not None and bank.is_sharded and size[0] == bank.total_experts
        held = self.param_of(path)
        if sharded and isinstance(held, DTensor):
            local = held.to_local()
            return self._experts(torch.empty(local.shape, dtype=dtype), size[0], self.expert_mesh, _EP_THEN_EDP)
        if sharded:
            assert bank is not None
            local = torch.empty((bank.num_experts, *size[1:]), dtype=dtype)
            return self._experts(local, size[0], self.mesh, _EP_OF_EDP_EP)
        param = self._shard(path, size) if bank is None or not bank.is_sharded else None
        if param is not None:
            return torch.empty_like(param, dtype=dtype)
        return torch.empty(size, dtype=dtype)

    def held_form(self, path: TensorPath, read: torch.Tensor) -> torch.Tensor:
        """A tensor read into `template` in the form this rank holds it: its experts' rows, or FSDP's DTensor."""
        if not isinstance(read, DTensor):
            return read
        if read.device_mesh is self.mesh:  # expert parallelism: the rank's experts
            return read.to_local()
        if self.expert_mesh is not None and read.device_mesh is self.expert_mesh:  # FSDP's shard of them
            param = self.param_of(path)
            assert isinstance(param, DTensor)
            shape, stride = param.shape, param.stride()
            return DTensor.from_local(
                read.to_local(), param.device_mesh, param.placements, run_check=False, shape=shape, stride=stride
            )
        return read  # FSDP's shard of a dense weight

    @staticmethod
    def _experts(local: torch.Tensor, total: int, mesh: Any, placements: tuple) -> torch.Tensor:
        local = local.contiguous()
        shape = torch.Size((total, *local.shape[1:]))
        return DTensor.from_local(
            local, mesh, list(placements), run_check=False, shape=shape, stride=_contiguous_stride(shape)
        )


_EP_OF_EDP_EP = (Replicate(), Shard(0))  # on ("edp", "ep"): the EP rank's experts, the same on its EDP ranks
_EP_THEN_EDP = (Shard(0), Shard(0))  # on ("ep", "edp"): the EP rank's experts, cut among its EDP ranks


def first_row(tensor: torch.Tensor) -> int:
    """The row of the whole tensor at which this rank's part starts (0 for a plain tensor): DTensor's placements,
    each Shard(0) cutting what the mesh dimensions before it left in torch.chunk's pieces."""
    if not isinstance(tensor, DTensor) or tensor.ndim == 0:
        return 0
    start, length = 0, tensor.shape[0]
    for dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            chunk = -(-length // tensor.device_mesh.size(dim))
            offset = min(tensor.device_mesh.get_local_rank(dim) * chunk, length)
            start, length = start + offset, min(chunk, length - offset)
    return start


# -- saving --------------------------------------------------------------------------------------------------------


def save_sharded(checkpoint: dict[str, Any], path: str | Path, sharding: Optional[ShardLayout]) -> None:
    """Write `checkpoint` (Lightning's dict, holding this rank's expert slices) as a sharded checkpoint folder at
    `path`, replacing what is there only once the new one is whole. Every rank of the run calls it (a collective);
    in one process (no process group) it writes the folder alone."""
    ShardedWriter().save(checkpoint, path, sharding)


class ShardedWriter:
    """Writes sharded checkpoints, in the foreground or, with `asynchronous`, in the background (checkpoint.async_save):
    DCP's async_save copies this rank's tensors to memory the training step does not touch (a copy of this rank's
    own part, never of every expert) and writes them from a thread, its collectives on a gloo group of their own;
    when every rank's part is written, rank 0 adds meta.pt and renames the folder into place, as in the foreground.
    One save is in flight at a time: the next save, and the end of the run (`wait`), wait for it and raise its error.
    """

    def __init__(self, asynchronous: bool = False, on_saved: Optional[Callable[[Path], None]] = None) -> None:
        self.asynchronous = asynchronous
        self.on_saved = on_saved  # called with the path of each checkpoint once it is in place
        self._pending: Optional[Future] = None
        self._group = None  # the background saves' process group

    def save(self, checkpoint: dict[str, Any], path: str | Path, sharding: Optional[ShardLayout]) -> None:
        self.wait()
        path = Path(path)
        distributed = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if distributed else 0
        tensors, meta = split_checkpoint(checkpoint)
        if sharding is not None:
            tensors = {key: sharding.saved_form(tuple(meta[INDEX][key]), t) for key, t in tensors.items()}
        # Rank 0's staging folder to every rank, every rank's weight checksums to rank 0 (computed on the live weights,
        # before a background save's copy).
        mine = {"staging": str(temp_folder_beside(path)) if rank == 0 else None, "digests": _weight_digests(tensors)}
        every: list[Any] = [None] * dist.get_world_size() if distributed else [mine]
        if distributed:
            dist.all_gather_object(every, mine)
        staging = Path(every[0]["staging"])
        digests = cast(dict, mine["digests"])
        meta[CHECKSUMS] = {
            key: sorted({tuple(c) for part in every for c in part["digests"].get(key, [])}) for key in digests
        }
        writer = dcp.FileSystemWriter(staging, sync_files=True)
        if not self.asynchronous:
            try:
                with _quiet_single_process(not distributed):
                    dcp.save(tensors, storage_writer=writer, no_dist=not distributed)
            except BaseException as e:
                _give_up(staging, rank)
                full = disk_full(e, path)  # behind DCP's CheckpointException
                if full is not None:
                    raise full from None
                raise
            self._finish(staging, path, meta, rank)
            if distributed:
                dist.barrier()
            return
        if distributed and self._group is None:
            self._group = dist.new_group(backend="gloo")  # a collective: every rank saves at the same step
        with _quiet_single_process(not distributed):
            written = dcp.async_save(tensors, storage_writer=writer, process_group=self._group, no_dist=not distributed)
        done: Future = Future()

        def finish(written: Future) -> None:
            try:
                written.result()
                self._finish(staging, path, meta, rank)
                done.set_result(path)
            except BaseException as e:  # the thread's error, raised by wait()
                _give_up(staging, rank)
                done.set_exception(disk_full(e, path) or e)

        cast(Future, written).add_done_callback(finish)  # dcp.async_save's future (its default staging)
        self._pending = done

    def wait(self) -> None:
        """Wait for the save in flight, if any (its checkpoint is then in place); raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _finish(self, staging: Path, path: Path, meta: dict[str, Any], rank: int) -> None:
        """Rank 0, once every rank's part is written: the rest of the checkpoint, then the folder into place."""
        if rank == 0:
            write_atomically(staging / META, lambda f: write_meta(meta, f))
            replace_folder(staging, path)
        if self.on_saved is not None:
            self.on_saved(path)


# meta.pt holds the rest of the checkpoint as the bytes of a torch.save with their SHA-256 beside them: a flipped byte
# anywhere in it is found (a zip member's contents are not checked on reading, so it could load as other settings).
META_PAYLOAD, META_SHA256 = "moe_lab_meta", "moe_lab_meta_sha256"


def write_meta(meta: dict[str, Any], f: Any) -> None:
    payload = io.BytesIO()
    torch.save(meta, payload)
    data = payload.getvalue()
    torch.save({META_PAYLOAD: torch.frombuffer(bytearray(data), dtype=torch.uint8), META_SHA256: _sha256(data)}, f)


def read_meta(path: Path) -> dict[str, Any]:
    """The folder's meta.pt, read as data (weights_only) and checked against its checksum (folders written before it
    had one are read as they are). CheckpointError for a damaged or foreign file."""
    file = _own_file(path, META)
    try:
        outer = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(outer, dict) and META_PAYLOAD in outer:
            data = tensor_bytes(outer[META_PAYLOAD])
            if _sha256(data) != outer.get(META_SHA256):
                raise CheckpointError(
                    f"{file} is damaged: it does not match the checksum saved with it (a flipped bit, or a copy cut "
                    "short); restore the checkpoint from a good copy"
                )
            outer = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{file} is not readable ({type(e).__name__}); the checkpoint is damaged") from None
    if not isinstance(outer, dict):
        raise CheckpointError(f"{file} is not readable (not a dictionary); the checkpoint is damaged")
    return outer


def _sha256(data: Any) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _give_up(staging: Path, rank: int) -> None:
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # the checkpoint at `path` is untouched


@contextlib.contextmanager
def _quiet_single_process(single: bool) -> Iterator[None]:
    """DCP warns that it assumes one process whenever it runs without a process group, as moe-lab means it to."""
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def split_checkpoint(checkpoint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """({key: tensor} of every weight and optimizer-state tensor, the rest of the checkpoint with an index of where
    each key's tensor was taken from)."""
    tensors, index = {}, {}
    for tensor_path, tensor in _tensor_paths(checkpoint):
        key = "/".join(str(part) for part in tensor_path)
        tensors[key], index[key] = tensor.detach(), list(tensor_path)
    meta = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
    if "state_dict" in checkpoint:
        meta["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not torch.is_tensor(v)}
    if "optimizer_states" in checkpoint:
        meta["optimizer_states"] = [
            {
                **saved,
                "state": {
                    slot: {k: v for k, v in state.items() if not torch.is_tensor(v)}
                    for slot, state in saved["state"].items()
                },
            }
            for saved in checkpoint["optimizer_states"]
        ]
    meta[INDEX] = index
    return tensors, meta


def _tensor_paths(checkpoint: dict[str, Any]) -> Iterator[tuple[TensorPath, torch.Tensor]]:
    for name, value in (checkpoint.get("state_dict") or {}).items():
        if torch.is_tensor(value):
            yield ("state_dict", name), value
    for i, saved in enumerate(checkpoint.get("optimizer_states") or []):
        for slot, state in saved["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    yield ("optimizer_states", i, "state", slot, key), value


def _weight_digests(tensors: dict[str, torch.Tensor]) -> dict[str, list[tuple[int, int, str]]]:
    """SHA-256 of this rank's part of every weight and optimizer-state tensor (a flipped bit in Adam's moments would
    resume silently otherwise): (first index along dim 0 in the whole, length, hex)."""
    out = {}
    for key, tensor in tensors.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        out[key] = [(first_row(tensor), local.shape[0] if local.ndim else 0, _digest(local))]
    return out


def tensor_bytes(tensor: torch.Tensor):
    """A tensor's values as bytes, in row-major order, on the CPU (what its checksums are computed over)."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""


def _digest(tensor: torch.Tensor) -> str:
    return _sha256(tensor_bytes(tensor))


def _verify(path: Path, checksums: dict, tensors: dict[str, tuple[torch.Tensor, int]]) -> None:
    """CheckpointError when a weight read differs from the checksum saved with it (a flipped bit, a cut copy). Each
    saved slice inside what was read is checked (a rank that reads its own experts checks the slices they lie in)."""
    for key, slices in checksums.items():
        tensor, first = tensors[key]
        expected: dict[tuple[int, int], set[str]] = {}
        for start, length, digest in slices:  # a weight every rank holds has every rank's digest (any may be written)
            expected.setdefault((start, length), set()).add(digest)
        for (start, length), digests in expected.items():
            if tensor.ndim == 0:
                part = tensor
            elif first <= start and start + length <= first + tensor.shape[0]:
                part = tensor[start - first : start - first + length]
            else:
                continue  # another rank's experts
            if _digest(part) not in digests:
                what = (
                    f"its weights {key.split('/', 1)[1]} do not"
                    if key.startswith("state_dict/")
                    else f"its optimizer state {key.split('/', 1)[1]} does not"
                )
                raise CheckpointError(
                    f"{path} is damaged: {what} match the checksum saved with it (a flipped bit, or a copy cut "
                    "short); restore it from a good copy"
                )


def _contiguous_stride(shape: tuple) -> tuple:
    return torch.empty(shape, device="meta").stride()


def replace_folder(new: Path, path: Path) -> None:
    """Put the folder `new` at `path` (same parent folder). A file or link at `path` is replaced by one rename of
    the folder; a folder there is exchanged with the new one in one atomic step where the system offers it
    (Linux's renameat2 RENAME_EXCHANGE), then deleted. Elsewhere (e.g. NFS) the old folder is first renamed to
    NAME.previous, so a kill between the two renames leaves it whole under that name."""
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link to a periodic checkpoint (save_last="link"), or an older single-file checkpoint
    if path.is_dir():
        if not _exchange(new, path):
            previous = path.with_name(path.name + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(path, previous)
            os.replace(new, path)
            new = previous
        shutil.rmtree(new, ignore_errors=True)  # now the old checkpoint
    else:
        os.replace(new, path)
    fsync_directory(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the system or filesystem
    cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# -- loading -------------------------------------------------------------------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata objects and nothing else: a `.metadata` file that names any other callable is refused."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    } | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader, with its index read by `_MetadataUnpickler` instead of pickle.load."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        folder = Path(self.path)
        with open(_own_file(folder, Path(self._get_metadata_path(rank)).name), "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        _check_storage(folder, metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _own_file(folder: Path, name: str) -> Path:
    """`folder/name`, when it is a plain file of the folder's own: CheckpointError for a name that leaves the folder
    (`../x`, an absolute path), a link (moe-lab writes none inside a checkpoint; one could lead anywhere), or anything
    but a regular file (a FIFO would block the reader forever, a device would never end)."""
    import stat

    relative = Path(name)
    if relative.is_absolute() or len(relative.parts) != 1 or relative.name in ("", ".", ".."):
        raise CheckpointError(f"{folder}: its index names {name!r}, outside the checkpoint folder; it is damaged")
    file = folder / relative
    try:
        mode = os.lstat(file).st_mode
    except OSError:
        raise CheckpointError(f"{folder}: {name} is missing; the checkpoint is damaged or was copied in part") from None
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"{file} is a link; a checkpoint folder holds its own files (copy the real file there)")
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{file} is not a regular file; the checkpoint is damaged")
    return file


def _check_storage(folder: Path, metadata: Any) -> None:
    """Every data file the index names is a file of the folder's own, and long enough for the items in it (a copy cut
    short is named, not read to its end); transforms (DCP's compression extensions) are not moe-lab's and refused."""
    sizes: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if name not in sizes:
            sizes[name] = _own_file(folder, name).stat().st_size
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{folder}/{name}: its items are stored with transforms moe-lab does not write")
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if end > sizes[name]:
            raise CheckpointError(
                f"{folder}/{name} is cut short ({sizes[name]} bytes, its index needs {end}); restore the checkpoint "
                "from a good copy"
            )


def read_sharded(path: str | Path, sharding: Optional[ShardLayout] = None, weights: bool = True) -> dict:
    """A sharded checkpoint as Lightning's dict. Without `sharding` (one process, or a layout without expert
    parallelism) every tensor is read whole; with it, each expert-indexed tensor is read as this rank's slice (every
    rank calls: a collective). `weights=False` reads meta.pt (settings, step, origin) and checks the index and the files
    it names, without reading the tensors. CheckpointError when the folder is damaged or was not written by moe-lab."""
    path = Path(path).expanduser()
    meta, index, checksums = _split_meta(path)
    with _one_error_line(path):
        if not weights:
            SafeFileSystemReader(path).read_metadata()  # the index and the files it names, without their contents
            return meta
        tensors = _read_tensors(path, index, sharding)
    _verify(path, checksums, _parts(tensors))
    for key, tensor_path in index.items():
        held = sharding.held_form(tuple(tensor_path), tensors[key]) if sharding is not None else tensors[key]
        _put(meta, tensor_path, held)
    return meta


def _split_meta(path: Path) -> tuple[dict, dict, dict]:
    """(the rest of meta.pt, its tensor index, its checksums: {} for folders written before moe-lab saved them);
    CheckpointError for a folder moe-lab did not write."""
    meta = read_meta(path)
    index, checksums = meta.pop(INDEX, None), meta.pop(CHECKSUMS, None)
    if not isinstance(index, dict):
        raise CheckpointError(f"{path} was not written by moe-lab (its {META} has no tensor index)")
    return meta, index, checksums if isinstance(checksums, dict) else {}


@contextlib.contextmanager
def _one_error_line(path: Path) -> Iterator[None]:
    """Whatever reading the folder raises, as one CheckpointError: a cut or foreign file, an index that names code,
    and DCP's CheckpointException (a BaseException, which `except Exception` does not catch) around any of them."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as caught:
        error: BaseException = caught
        if isinstance(caught, CheckpointException):  # the first failing rank's error, kept with its traceback
            failures = [f[0] if isinstance(f, tuple) else f for f in getattr(caught, "failures", {}).values()]
            error = next((f for f in failures if isinstance(f, BaseException)), caught)
        if isinstance(error, CheckpointError):
            raise error from None
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(
            f"{path} is not a readable sharded checkpoint ({type(error).__name__}: {reason}); restore it from a good "
            "copy"
        ) from None


VERIFY_BATCH_BYTES = 256 * 2**20  # what verify_sharded holds in memory at once (more for a larger single tensor)


def verify_sharded(path: str | Path) -> None:
    """Read every tensor of a sharded checkpoint once, a batch of about VERIFY_BATCH_BYTES at a time (never the whole
    checkpoint in memory), and check each against the checksum saved with it: what a resume does before it claims a
    run directory."""
    path = Path(path).expanduser()
    _, index, checksums = _split_meta(path)
    with _one_error_line(path):
        stored = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    batches: list[dict[str, Any]] = [{}]
    size = 0
    for key, tensor_path in index.items():
        entry = stored.get(key)
        if isinstance(entry, TensorStorageMetadata):
            size += math.prod(entry.size) * entry.properties.dtype.itemsize
        batches[-1][key] = tensor_path
        if size >= VERIFY_BATCH_BYTES:
            batches.append({})
            size = 0
    for batch in filter(None, batches):
        with _one_error_line(path):
            tensors = _read_tensors(path, batch, None)
        _verify(path, {key: checksums[key] for key in batch if key in checksums}, _parts(tensors))


def _read_tensors(path: Path, index: dict[str, list], sharding: Optional[ShardLayout]) -> dict[str, torch.Tensor]:
    """{key: tensor}: whole tensors, or (with `sharding`) this rank's part of each, as DTensors of the whole."""
    stored = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    template: dict[str, torch.Tensor] = {}
    for key, tensor_path in index.items():
        entry = stored.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: the tensor {key} is missing from its index; the checkpoint is damaged")
        size, dtype = tuple(entry.size), entry.properties.dtype
        template[key] = (
            sharding.template(tuple(tensor_path), size, dtype)
            if sharding is not None
            else torch.empty(size, dtype=dtype)
        )
    collective = sharding is not None and dist.is_available() and dist.is_initialized()
    with _quiet_single_process(not collective):
        dcp.load(template, storage_reader=SafeFileSystemReader(path), no_dist=not collective)
    return template


def _parts(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, int]]:
    """{key: (this rank's part, the row of the whole it starts at)}: what `_verify` checks."""
    return {key: (t.to_local() if isinstance(t, DTensor) else t, first_row(t)) for key, t in tensors.items()}


def _put(tree: dict, tensor_path: list, value: torch.Tensor) -> None:
    node = tree
    for part in tensor_path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]
    node[tensor_path[-1]] = value
