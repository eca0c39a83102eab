"""The Hugging Face hub, asked once before a download: a machine that cannot reach it hears so in one line at once,
with what to do, instead of huggingface_hub's retries (5, over about 30 seconds) and an error about its cache.

A leaf module: the standard library only (huggingface_hub is imported where its cache is looked up).
"""

from __future__ import annotations

import os
import re
import socket
from typing import Optional
from urllib.parse import urlparse

from moe_lab.errors import UserError

CONNECT_TIMEOUT_S = 5.0


# A hub repository id: NAME or ORG/NAME of letters, digits, '-', '_' and '.' (huggingface_hub's own rule, in short);
# a path (absolute, ./, ~/, or deeper than one folder) never is one.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def looks_like_hub_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and ".." not in name and not name.endswith(".")


def hub_endpoint() -> str:
    """The hub's address, as huggingface_hub reads it ($HF_ENDPOINT, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_by_choice() -> bool:
    """HF_HUB_OFFLINE is set: the user asked for the local cache only (huggingface_hub then never asks the network)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unreachable(timeout_s: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why the hub cannot be reached from here (a name that does not resolve, a refused or timed-out connection), or
    None when a TCP connection to it opens."""
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"


def in_cache(repo_id: str, filename: str, repo_type: str) -> bool:
    """Whether huggingface_hub's cache on this machine holds `filename` of `repo_id`."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, filename, repo_type=repo_type), str)
    except Exception:  # an id huggingface_hub rejects: the download that follows says why
        return False


def check_hub(
    repo_id: str, what: str, error: type[UserError], filename: Optional[str], repo_type: str = "model"
) -> None:
    """Before downloading `repo_id` (a hub id, not a local path): `error` in one line if the hub cannot be reached,
    saying what to do (download elsewhere and pass the folder; or use the copy this machine's cache holds, which is
    looked for as `filename` in huggingface_hub's cache where one is named)."""
    if offline_by_choice():
        return
    reason = unreachable()
    if reason is None:
        return
    if filename is not None and in_cache(repo_id, filename, repo_type):
        raise error(
            f"cannot reach the Hugging Face hub ({reason}) to check {what} {repo_id}, but this machine's cache holds "
            "a copy: run the same command with HF_HUB_OFFLINE=1 to use it"
        )
    download = "huggingface-cli download" + (" --repo-type dataset" if repo_type == "dataset" else "")
    cached = " (or, if this machine read it before, run the same command with HF_HUB_OFFLINE=1)" if not filename else ""
    raise error(
        f"cannot reach the Hugging Face hub ({reason}), so {what} {repo_id} cannot be downloaded here: download it "
        f"on a machine with network ({download} {repo_id} --local-dir DIR), copy DIR here and give DIR instead "
        f"of the hub id{cached}"
    )
