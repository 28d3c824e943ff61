"""Files from the Hugging Face hub, failing fast with one sentence that says what to do.

`huggingface_hub` retries a download for about half a minute when the hub cannot be reached,
and a gated repository looks missing without a token. Before it is asked, this module checks
in one try whether the hub answers at all (a TCP connection to its endpoint, a few seconds at
most, once per process); when it does not, a cached copy is used (with one warning) or the
caller gets one error that names the way out: a token, local files, or the demo model.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from .errors import UserError

log = logging.getLogger("ppx.hub")

PROBE_SECONDS = 4.0
# What a user can do instead of fetching the model's files.
MODEL_ADVICE = ("pass local files with --moshi-weight, --mimi-weight and --tokenizer, or serve the tiny demo model "
                "with `ppx-serve --demo`")


class HubError(UserError, RuntimeError):
    """A file the hub cannot give; the message says what to do instead."""


def token() -> str | None:
    """HF_TOKEN, or the token `hf auth login` stored."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    try:
        from huggingface_hub import get_token
        return get_token()
    except Exception:  # noqa: BLE001 - no stored token is the same as none
        return None


def _endpoint() -> tuple[str, int]:
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


@functools.lru_cache(maxsize=None)
def reachable() -> str | None:
    """None when the hub's endpoint accepts a connection, else why not (one try per process)."""
    host, port = _endpoint()
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or e.__class__.__name__})"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _token_advice(repo: str, tok: str | None) -> str:
    if tok:
        return f"check that the account of HF_TOKEN accepted the licence at https://huggingface.co/{repo}"
    return f"set HF_TOKEN to a token of an account that accepted the licence at https://huggingface.co/{repo}"


def hub_file(repo: str, filename: str, advice: str = MODEL_ADVICE) -> Path:
    """`filename` of the hub repository `repo`, downloaded once into the hub's cache."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    tok = token()
    cached = try_to_load_from_cache(repo, filename)
    cached = Path(cached) if isinstance(cached, str) else None
    why = "HF_HUB_OFFLINE is set" if _offline() else reachable()
    if why is not None:
        if cached is not None:
            _warn_once(f"{why}: using the cached copies of the hub's files")
            return cached
        raise HubError(f"'{filename}' of '{repo}' is not cached and {why}: connect to the network and "
                       f"{_token_advice(repo, tok)}, or {advice}")
    try:
        return Path(hf_hub_download(repo, filename, token=tok))
    except GatedRepoError:
        raise HubError(f"'{repo}' is gated: {_token_advice(repo, tok)}, or {advice}") from None
    except RepositoryNotFoundError:
        hint = "" if tok else " (HF_TOKEN is not set, and a gated repository looks missing without one)"
        raise HubError(f"the hub repository '{repo}' was not found{hint}: {_token_advice(repo, tok)}, or "
                       f"{advice}") from None
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        raise HubError(f"'{filename}' of '{repo}' is not cached and the hub did not answer: connect to the "
                       f"network, or {advice}") from None
    except EntryNotFoundError:
        raise HubError(f"the hub repository '{repo}' has no file '{filename}'") from None
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise HubError(f"could not fetch '{filename}' from '{repo}' ({e.__class__.__name__}): {advice}") from None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)
