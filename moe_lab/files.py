"""Files moe-lab writes and reads back: atomic writes, the clean-up of what a killed write left, content digests.

A leaf module (standard library only), shared by training, analysis and the tools.

- `write_atomically`: a temporary file in the target's own folder, fsync'ed, renamed over the target, the rename
  fsync'ed: a kill at any moment leaves the old file whole. The temporary file's name says who wrote it
  (`.NAME.moe-lab-HOST-PID-RANDOM.tmp`), so that
- `remove_stale_temp_files` can delete, at the next write in that folder, the partial files (and the partial
  folders of sharded checkpoints, named the same way) of writers that are gone
  (killed mid-save, SIGKILL or power loss), and never one that a live process is still writing.
- `file_digest` / `files_digest`: SHA-256 of the bytes, the key of every cache of data read from files (a file
  rewritten with its old size and time, as `cp -p`, `rsync -t` and `tar` do, is still new content).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\..+\.moe-lab-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[^.]+\.tmp$")


def write_atomically(path: Path, content: str | bytes | Callable[[BinaryIO], None]) -> None:
    """Write `content` (text, bytes, or a function that writes bytes to a file) to `path` atomically (see above)."""
    path = Path(path)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode any other new file would have (or the old one's).
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        full = disk_full(e, path)
        if full is not None:  # not the serializer's own error around it (torch's zip writer raises one)
            raise full from None
        raise
    fsync_directory(path.parent)  # make the rename itself durable


def disk_full(error: BaseException, path: Path) -> Optional[OSError]:
    """The OSError "no space left on device" (or "disk quota exceeded") behind `error`, as one for the file `path`
    being written, if there is one: serializers wrap it (torch's zip writer raises a RuntimeError while it handles
    one; DCP a CheckpointException listing each rank's failure), and a full disk is a run's outcome to report in one
    line, not a bug to show as a traceback."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return OSError(e.errno, e.strerror, str(path))
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        stack += [e.__cause__, e.__context__]
    return None


def temp_folder_beside(path: Path) -> Path:
    """A new folder beside `path`, named as write_atomically names its temporary files (so that
    `remove_stale_temp_files` removes it once its writer is gone), with a new folder's usual mode; the stale
    temporary files and folders of writers that are gone are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    folder = tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.chmod(folder, 0o777 & ~_umask())  # mkdtemp's folder is private
    return Path(folder)


def temp_file_beside(path: Path) -> Path:
    """A new, empty temporary file beside `path`, named as write_atomically names its own, for a writer that streams
    into it; `replace_with` then puts it in place."""
    path = Path(path)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return Path(tmp)


def replace_with(tmp: Path, path: Path) -> None:
    """Put the finished temporary file `tmp` in place of `path` durably: fsync, rename, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.moe-lab-{_HOST}-{os.getpid()}-"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def fsync_directory(folder: Path) -> None:
    """Make the renames and new names in `folder` durable."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of moe-lab writers on this host that are no longer running (a save killed
    mid-write); a live writer's, another host's (a shared filesystem) and every file moe-lab did not name are
    kept. Returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        if match is None or match["host"] != _HOST or process_alive(int(match["pid"])):
            continue
        stale = Path(folder) / name
        try:
            if stale.is_dir() and not stale.is_symlink():  # a sharded checkpoint's folder (sharded_checkpoint.py)
                shutil.rmtree(stale)
            else:
                stale.unlink()
            removed.append(stale)
        except OSError:
            pass
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (this process included; another user's counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | Path]) -> str:
    """SHA-256 (hex) of the bytes of several files, in the order given (their names do not count)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(file_digest(path).encode())
    return digest.hexdigest()
