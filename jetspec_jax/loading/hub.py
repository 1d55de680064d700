"""Hugging Face Hub ids -> local snapshot directories, through `huggingface_hub`'s own cache.

    snapshot_dir("Qwen/Qwen3-0.6B")            # the cached snapshot of refs/main, else downloaded
    snapshot_dir("Qwen/Qwen3-0.6B@v1.0")       # a branch or tag (refs/v1.0)
    snapshot_dir("Qwen/Qwen3-0.6B@<commit>")   # a full 40-hex commit id (snapshots/<commit>)

An id is `Org/Name`, optionally followed by `@<revision>`. The cache is huggingface_hub's
(`$HF_HUB_CACHE`, default `$HF_HOME/hub`, default `~/.cache/huggingface/hub`), so a model fetched
with `hf download Org/Name` (or by transformers) is found here and the other way round.

A snapshot already in the cache is used without contacting the Hub (to follow a branch that has
moved on the Hub, run `hf download Org/Name` again). Otherwise, unless `HF_HUB_OFFLINE=1`, the files a loader reads (config, safetensors
weights, tokenizer, chat template) are downloaded. Every failure is a one-line UserError that says
what to run. Callers check local paths and registered names first: those always win over an id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                    OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import validate_repo_id

from jetspec_jax.errors import UserError

# What load_hf_dir, load_head_dir and Tokenizer.from_dir read; nothing else is downloaded.
ALLOW_PATTERNS = [
    "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json",
]
_REVISION = re.compile(r"[A-Za-z0-9._+/-]+")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """`Org/Name` or `Org/Name@revision` -> (repo_id, revision or None); None when `spec` is not
    of that form (a path such as `./x/y` or `/models/x`, a bare name)."""
    repo_id, at, revision = str(spec).partition("@")
    if repo_id.count("/") != 1:
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    if at and (not _REVISION.fullmatch(revision) or ".." in revision or revision.startswith("/")):
        raise UserError(f"{spec}: bad revision {revision!r} after '@' (a branch, tag or commit hash)")
    return repo_id, revision or None


def is_hub_id(spec) -> bool:
    return parse_hub_id(str(spec)) is not None


def local_or_snapshot(spec, what: str = "model"):
    """An existing local path as is; else a hub id's snapshot directory; else `spec` unchanged
    (the caller's loader reports what is wrong with it)."""
    if Path(str(spec)).expanduser().exists() or not is_hub_id(spec):
        return spec
    return snapshot_dir(str(spec), what)


def _usable(folder: Path) -> bool:
    """config.json and complete safetensors weights (every shard the index names)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return False
        return bool(shards) and all((folder / s).is_file() for s in shards)
    return any(p.is_file() for p in folder.glob("*.safetensors"))


def _download_hint(repo_id: str, revision: str | None) -> str:
    return f"`hf download {repo_id}{f' --revision {revision}' if revision else ''}`"


def snapshot_dir(spec: str, what: str = "model") -> Path:
    """The local snapshot directory of hub id `spec` (see the module docstring)."""
    parsed = parse_hub_id(spec)
    if parsed is None:
        raise UserError(f"{spec}: not a Hugging Face id (Org/Name or Org/Name@revision)")
    repo_id, revision = parsed
    cache = constants.HF_HUB_CACHE
    try:  # no network: refs/<revision> (or the commit itself) -> snapshots/<commit>
        cached = Path(huggingface_hub.snapshot_download(
            repo_id, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:  # also an incomplete snapshot
        cached = None
    if cached is not None and _usable(cached):
        return cached
    missing = (f"{spec}: the cached snapshot {cached} has no config.json or complete .safetensors weights"
               if cached is not None else
               f"{spec}: not a local path, and this {what} is not in the Hugging Face cache {cache}")
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{missing}; HF_HUB_OFFLINE is set: unset it to download, or run "
                        f"{_download_hint(repo_id, revision)} on a machine with network and copy its cache")
    _check_reachable(spec, repo_id, revision, missing, what)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:  # the connection went away
        raise UserError(f"{missing}, and downloading it failed ({_first_line(e)})") from None
    except HfHubHTTPError as e:
        raise UserError(f"{spec}: downloading from the Hugging Face Hub failed ({_first_line(e)})") from None
    except OSError as e:
        raise UserError(f"{spec}: could not write to the Hugging Face cache {cache} ({e})") from None
    if not _usable(folder):
        raise UserError(f"{spec}: the Hugging Face repo has no config.json or .safetensors weights "
                        f"(a {what} needs both)")
    return folder


def _check_reachable(spec: str, repo_id: str, revision: str | None, missing: str, what: str) -> None:
    """One metadata request with a timeout (`HF_HUB_ETAG_TIMEOUT`, default 10 s): snapshot_download's
    own first request has none, so an unreachable Hub would hang instead of failing."""
    try:
        huggingface_hub.HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except RevisionNotFoundError:
        raise UserError(f"{spec}: the Hugging Face repo {repo_id} has no revision {revision!r}") from None
    except GatedRepoError:
        raise UserError(f"{spec}: the Hugging Face repo is gated: accept its terms on the Hub, then "
                        "log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise UserError(f"{spec}: not a local path, and no such {what} on the Hugging Face Hub "
                        "(for a private repo, log in with `hf auth login`)") from None
    except HfHubHTTPError as e:
        raise UserError(f"{spec}: the Hugging Face Hub refused the request ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS failure, timeout, proxy...
        raise UserError(f"{missing}, and the Hub {constants.ENDPOINT} cannot be reached ({type(e).__name__}: "
                        f"{_first_line(e)}): run {_download_hint(repo_id, revision)} on a machine with "
                        "network and copy its cache, or point HF_HUB_CACHE at a cache that has it") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
