"""Pushing a compressed model folder to the Hub in one commit, with errors that say what to do."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import _http, validate_repo_id

from .card import generate_card
from .record import RECORD_FILE

__all__ = ["HubError", "bounded_hub_calls", "check_model_folder", "check_repo_id", "hub_timeout", "push_to_hub"]

logger = logging.getLogger(__name__)

# seconds one Hub request may wait for an answer (huggingface_hub's own client waits for ever)
DEFAULT_TIMEOUT = 20.0
TIMEOUT_VARIABLE = "HFCOMPRESS_HUB_TIMEOUT"


def hub_timeout(timeout: float | None = None) -> float:
    """`timeout`, else $HFCOMPRESS_HUB_TIMEOUT, else 20 seconds; a value that is not a positive number is an error."""
    value = timeout if timeout is not None else os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"the Hub timeout must be a positive number of seconds, got {value!r} ({TIMEOUT_VARIABLE})")
    return seconds


@contextmanager
def bounded_hub_calls(timeout: float):
    """Give every request huggingface_hub makes in the block `timeout` seconds to be answered (its client, shared by
    the process, is rebuilt with the timeout and restored after)."""
    previous = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def bounded():
        client = previous()
        client.timeout = timeout
        return client

    _http.set_client_factory(bounded)
    try:
        yield
    finally:
        _http.set_client_factory(previous)


_KNOWN_METHODS = ("hfcompress", "compressed-tensors")


class HubError(RuntimeError):
    """The Hub refused or failed a request; the message says which and why."""


def check_model_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path if it holds a model hfcompress wrote (config, weights, and a compression record or an
    hfcompress/compressed-tensors quantization config); a ValueError naming what is missing otherwise."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{folder!r} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder!r} is not a model folder: it has no config.json")
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise ValueError(f"{folder!r} has no .safetensors weights")
    method = (json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config") or {}).get("quant_method")
    if method not in _KNOWN_METHODS and not (path / RECORD_FILE).is_file():
        raise ValueError(
            f"{folder!r} is not a compressed model: no {RECORD_FILE} and no hfcompress or compressed-tensors "
            "quantization_config in config.json"
        )
    return path


def check_repo_id(repo_id: str) -> None:
    """A ValueError naming `repo_id` unless it is a valid Hub repo id."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo id {repo_id!r} is not valid: expected 'name' or 'namespace/name' ({e})") from None


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    timeout: float | None = None,
) -> str:
    """Upload the compressed model in `folder` to `repo_id` as one commit and return the commit URL.

    The repo is created if needed (`private` applies then), `revision` is a branch (created from main when
    missing). The token comes from `token`, `HF_TOKEN` or `hf auth login`; the endpoint from `HF_ENDPOINT`.
    A card is generated first when the folder has a compression record and no README.md. The local folder is
    only read, and a failed upload leaves no commit on the Hub. Each request waits at most `timeout` seconds
    for an answer (default: $HFCOMPRESS_HUB_TIMEOUT or 20; huggingface_hub retries some requests a few times).
    """
    timeout = hub_timeout(timeout)

    path = check_model_folder(folder)
    check_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (pushing needs write access)")
    if (path / RECORD_FILE).is_file() and not (path / "README.md").is_file():
        generate_card(path, repo_id=repo_id)
    api = HfApi(token=token)
    try:
        with bounded_hub_calls(timeout):
            url, commit = _push(api, path, repo_id, private, revision, commit_message)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = {
            401: "the token was refused; check HF_TOKEN or run `hf auth login`",
            403: "the token has no write access to this namespace",
            404: "the repo or revision does not exist",
        }.get(status, "the Hub failed the request")
        raise HubError(f"pushing {folder} to {repo_id!r} failed ({status}): {hint}. Nothing was committed. {e}") from e
    except OSError as e:  # connection refused, DNS, timeouts (httpx errors derive from neither: caught below)
        raise HubError(f"pushing {folder} to {repo_id!r} failed: cannot reach {api.endpoint}: {e}") from e
    except Exception as e:
        network = type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")
        if network and type(e).__name__.endswith("Timeout"):
            raise HubError(
                f"pushing {folder} to {repo_id!r} failed: no answer from {api.endpoint} ({type(e).__name__}: {e}; "
                f"each request waits {timeout:g} s, set {TIMEOUT_VARIABLE} or --timeout to change it). Nothing was "
                "committed."
            ) from e
        if network:
            raise HubError(f"pushing {folder} to {repo_id!r} failed: cannot reach {api.endpoint}: {e}") from e
        if isinstance(e, RuntimeError) and "uploading" in str(e):  # an LFS upload failed: no commit was made
            raise HubError(
                f"pushing {folder} to {repo_id!r} failed: {e} ({e.__cause__}). Nothing was committed."
            ) from e
        raise
    logger.info("pushed %s to %s (%s)", folder, url, commit.commit_url)
    return commit.commit_url


def _push(api: HfApi, path: Path, repo_id: str, private, revision, commit_message):
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(path),
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message or f"Upload compressed model with hfcompress ({path.name})",
        ignore_patterns=[".*", "*.tmp", "__pycache__/*"],
    )
    return url, commit
