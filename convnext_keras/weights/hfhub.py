"""The Hugging Face Hub as a weight source, through ``huggingface_hub``: its cache, tokens,
``HF_ENDPOINT``, offline mode and resumable downloads; ``hf://org/repo[@revision][/file]``
addresses; every failure one line saying what was wrong and what to do.

The official path's rules (:mod:`.download`) hold here too, through event hooks on
``huggingface_hub``'s HTTP client that act only during this library's downloads: the stall
window (``CONVNEXT_STALL_SECONDS``), no resume of a connection that sent nothing, and no retry
of a request nothing answered - an offline machine or a Hub that never answers fails in one line
within the client's timeout (``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT``, 10 s each
by default), not after minutes of retries.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from pathlib import Path

from convnext_keras import registry
from convnext_keras.errors import plain
from convnext_keras.interface import fix
from convnext_keras.weights.cache import file_sha256
from convnext_keras.weights.download import MIN_RATE, DownloadError, stall_seconds

logger = logging.getLogger("convnext_keras")


#: ``weights=`` / ``--weights`` prefix of a file on the Hub: ``hf://org/repo[@revision][/file]``.
HF_SCHEME = "hf://"
#: The files looked for, in order, when an ``hf://`` address names a repository only.
HUB_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_ADDRESS = re.compile(
    r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<path>.+))?$"
)


def parse_hf_address(address: str) -> tuple[str, str | None, str | None]:
    """``(repo, revision or None, file or None)`` of ``hf://org/repo[@revision][/file]``;
    ``ValueError`` for anything else."""
    match = _HF_ADDRESS.match(address.strip())
    if not match:
        raise ValueError(
            f"{address!r} is not a Hub address: write hf://ORG/REPO, hf://ORG/REPO/FILE or "
            "hf://ORG/REPO@REVISION/FILE (e.g. hf://timm/convnext_atto.d2_in1k/model.safetensors)."
        )
    return match.group("repo"), match.group("revision"), match.group("path")


def _hub_page(repo: str) -> str:
    import huggingface_hub

    return f"{huggingface_hub.constants.ENDPOINT.rstrip('/')}/{repo}"


def _hub_error(error: Exception, repo: str, filename: str, revision: str | None) -> DownloadError:
    """The one-line :class:`DownloadError` of a ``huggingface_hub`` failure: what was wrong
    (gated, not found, offline, incomplete) and what to do."""
    import huggingface_hub
    from huggingface_hub import errors

    if isinstance(error, ValueError) and isinstance(error.__cause__, Exception):
        error = error.__cause__  # hf_hub_download(force_download=True) wraps why it failed
    page, at = _hub_page(repo), f"@{revision}" if revision else ""
    where = f"{repo}{at}/{filename}"
    cause = plain(str(error)).strip().splitlines()
    detail = next((line for line in cause if line.strip()), type(error).__name__)
    token = huggingface_hub.get_token() is not None
    if isinstance(error, errors.GatedRepoError):
        if token:
            return DownloadError(
                f"{repo} is gated and the Hugging Face token given (HF_TOKEN or `hf auth login`) "
                f"has no access to it: accept its licence at {page} with the account of that "
                f"token, then try again ({detail})."
            )
        return DownloadError(
            f"{repo} is gated: accept its licence at {page}, then give this machine a token "
            "of that account (set HF_TOKEN=hf_..., or run `hf auth login`) and try again "
            f"({detail})."
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        hint = (
            "the token given has no access to it"
            if token
            else "if it is private or gated, accept its terms at that page and set HF_TOKEN "
            "(or run `hf auth login`)"
        )
        return DownloadError(
            f"The Hub has no repository {repo} that this machine may read ({page}): check the "
            f"name; {hint} ({detail})."
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return DownloadError(f"{repo} has no revision {revision!r} ({page}): {detail}")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    if isinstance(error, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)) and offline:
        return DownloadError(
            f"HF_HUB_OFFLINE is set and {where} is not in the Hugging Face cache "
            f"({huggingface_hub.constants.HF_HUB_CACHE}): unset it to download, or pass the file "
            f"with {fix('weights=FILE', '--weights FILE')}."
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        return DownloadError(
            f"Could not download {where} from {huggingface_hub.constants.ENDPOINT} and it is not "
            f"in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}): {detail}. "
            "No internet? Download it where there is (or set HF_ENDPOINT to a mirror), copy "
            "the cache (HF_HOME) here and set HF_HUB_OFFLINE=1, or pass the file with "
            + fix("weights='FILE'", "--weights FILE")
            + "."
        )
    if isinstance(error, errors.EntryNotFoundError):
        return DownloadError(
            f"{repo}{at} has no file {filename!r}: see the files at {page}/tree/"
            f"{revision or 'main'} and name one (hf://{repo}/FILE)."
        )
    return DownloadError(
        f"Could not download {where} from the Hugging Face Hub ({type(error).__name__}: "
        f"{detail}); nothing was cached. Try again, or pass the file with "
        f"{fix('weights=FILE', '--weights FILE')}."
    )


# ---------------------------------------------------------------------------------------------
# The official path's rules on huggingface_hub's HTTP client


class _HubGaveUp(Exception):
    """Raised inside ``huggingface_hub``'s HTTP client (by this library's event hooks) to end a
    download its own retries would prolong; a plain ``Exception``, so that no ``except`` of
    ``huggingface_hub`` retries it.  Turned into a :class:`DownloadError` by
    :func:`_hub_download`."""


class _Watch:
    """The rules of :mod:`.download` for the requests of one :func:`_hub_download`: a body
    slower than ``MIN_RATE`` over the stall window is abandoned, a body silent from its first
    byte is not resumed, and a request whose previous try got no answer (connection refused,
    a timeout, HTTP 408/429/5xx) is not sent again."""

    def __init__(self, window: float):
        self.window = window
        self.unanswered: dict[tuple[str, str], tuple[str, float]] = {}


_WATCH: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar(
    "convnext_keras_hub_watch", default=None
)
_RETRIED_STATUS = (408, 429, 500, 502, 503, 504)


def _on_request(request) -> None:
    watch = _WATCH.get()
    if watch is None:
        return
    key = (request.method, str(request.url))
    if key in watch.unanswered:
        reason, started = watch.unanswered[key]
        if reason == "no answer":
            reason = f"no answer: the connection failed after {time.monotonic() - started:.1f} s"
        raise _HubGaveUp(f"{request.url.host} did not answer {request.method} ({reason})")
    watch.unanswered[key] = ("no answer", time.monotonic())


def _on_response(response) -> None:
    watch = _WATCH.get()
    if watch is None:
        return
    request = response.request
    key = (request.method, str(request.url))
    if response.status_code in _RETRIED_STATUS:
        watch.unanswered[key] = (f"HTTP {response.status_code}", time.monotonic())
        return
    watch.unanswered.pop(key, None)
    if request.method == "GET" and 200 <= response.status_code < 300:
        stream_class = _watched_stream_class(response)
        if stream_class is not None:
            response.stream = stream_class(response.stream, watch, str(request.url.host))


_STREAM_CLASSES: dict[type, type] = {}


def _watched_stream_class(response) -> type | None:
    """:class:`_WatchedStream` made a subclass of the HTTP client's ``SyncByteStream`` (the
    client checks the type of a body it iterates), or None for a body of another kind."""
    import importlib

    client = importlib.import_module(type(response).__module__.split(".")[0])
    base = getattr(client, "SyncByteStream", None)
    if base is None or not isinstance(response.stream, base):
        return None
    if base not in _STREAM_CLASSES:
        _STREAM_CLASSES[base] = type("WatchedStream", (_WatchedStream, base), {})
    return _STREAM_CLASSES[base]


class _WatchedStream:
    """A response body under the stall rule of :func:`.download._chunks`; a read that times
    out before the first byte (headers, then silence) ends the download instead of a retry."""

    def __init__(self, stream, watch: _Watch, host: str):
        self.stream, self.watch, self.host = stream, watch, host

    def __iter__(self):
        window = self.watch.window
        start, count, total = time.monotonic(), 0, 0
        try:
            for chunk in self.stream:
                yield chunk
                count += len(chunk)
                total += len(chunk)
                now = time.monotonic()
                if now - start >= window:
                    if count < MIN_RATE * window:
                        raise _HubGaveUp(
                            f"the download from {self.host} stalled: {count} bytes in "
                            f"{now - start:.0f} s (less than {MIN_RATE} bytes/s over {window:g} s) "
                            f"after {total} bytes"
                        )
                    start, count = now, 0
        except _HubGaveUp:
            raise
        except Exception as e:
            if total == 0 and "timeout" in type(e).__name__.lower():
                raise _HubGaveUp(
                    f"the download from {self.host} stalled: nothing arrived after the headers "
                    f"({type(e).__name__})"
                ) from e
            raise

    def close(self) -> None:
        self.stream.close()


def _watch_session() -> bool:
    """Add this library's event hooks to ``huggingface_hub``'s shared HTTP client (they act only
    inside :func:`_hub_download`); False where the client has none (an older release)."""
    try:
        from huggingface_hub import get_session

        client = get_session()
        hooks = client.event_hooks
    except (ImportError, AttributeError):
        return False
    if _on_request not in hooks.get("request", []):
        client.event_hooks = {
            "request": [*hooks.get("request", []), _on_request],
            "response": [*hooks.get("response", []), _on_response],
        }
    return True


def _is_http_client_error(error: BaseException) -> bool:
    """Whether ``error`` comes from an HTTP client library (httpx and its kin, requests,
    urllib3): a failure of the network, never of this library."""
    clients = {"httpx", "httpx2", "httpcore", "h11", "h2", "requests", "urllib3"}
    return any(cls.__module__.split(".")[0] in clients for cls in type(error).__mro__)


def _hub_download(repo: str, filename: str, revision: str | None, force: bool) -> Path:
    """``hf_hub_download`` under the official path's rules (:class:`_Watch`): the stall window
    of :func:`.download.stall_seconds`, no retry of a request nothing answered (an offline
    machine, a Hub that accepts and never answers, HTTP 5xx: one line within the client's
    timeout instead of minutes of retries), every error of its HTTP client one
    :class:`DownloadError`."""
    import huggingface_hub

    from convnext_keras import __version__

    window = stall_seconds()
    token = _WATCH.set(_Watch(window)) if _watch_session() else None
    try:
        return Path(
            huggingface_hub.hf_hub_download(
                repo,
                filename,
                revision=revision,
                force_download=force,
                etag_timeout=min(window, huggingface_hub.constants.DEFAULT_ETAG_TIMEOUT),
                library_name="convnext_keras",
                library_version=__version__,
            )
        )
    except _HubGaveUp as e:
        raise _unreachable(repo, filename, revision, str(e)) from None
    except (
        huggingface_hub.errors.HfHubHTTPError,
        huggingface_hub.errors.EntryNotFoundError,  # not an HTTP error when offline
        OSError,
        ValueError,
    ) as e:
        raise _hub_error(e, repo, filename, revision) from e
    except Exception as e:
        if not _is_http_client_error(e):
            raise
        raise _hub_error(e, repo, filename, revision) from e
    finally:
        if token is not None:
            _WATCH.reset(token)


def _unreachable(repo: str, filename: str, revision: str | None, reason: str) -> DownloadError:
    import huggingface_hub

    at = f"@{revision}" if revision else ""
    return DownloadError(
        f"Could not download {repo}{at}/{filename} from {huggingface_hub.constants.ENDPOINT}: "
        f"{reason}; nothing was cached. No internet? Download it where there is (or set "
        "HF_ENDPOINT to a mirror), copy the cache (HF_HOME) here and set HF_HUB_OFFLINE=1, or "
        f"pass the file with {fix('weights=FILE', '--weights FILE')}."
    )


def _hub_blob_problem(path: Path, pinned: tuple[str, str] | None) -> str | None:
    """Why the Hub file at ``path`` is not the one published, or None.

    ``huggingface_hub`` names a large (LFS) file's blob by its SHA-256 (the Hub's ETag); the
    bytes must hash to it, and to ``pinned`` when one is.
    """
    blob = path.resolve()
    named = blob.name if re.fullmatch(r"[0-9a-f]{64}", blob.name) else None
    if named is None and pinned is None:
        return None
    digest = file_sha256(blob)
    if named is not None and digest != named:
        return f"its SHA-256 {digest[:12]}... is not the {named[:12]}... the Hub published"
    if pinned is not None and digest != pinned[0]:
        return f"its SHA-256 {digest[:12]}... is not the one pinned by {pinned[1]}"
    return None


def hub_file(
    repo: str,
    filename: str,
    revision: str | None = None,
    *,
    sha256: tuple[str, str] | None = None,
) -> Path:
    """A file of a Hugging Face Hub repository, downloaded (once) by ``huggingface_hub``.

    The library's own settings apply: ``HF_ENDPOINT`` (a mirror, or a test server), ``HF_HOME``
    / ``HF_HUB_CACHE`` (where files are kept), ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` (or the token
    of ``hf auth login``) for gated and private repositories; downloads resume after a dropped
    connection and a file shorter than announced is refused.  The file's bytes are checked
    against the SHA-256 the Hub published (a large file's blob name) and against ``sha256``
    (``(hex, where it was pinned)``); a file that differs is downloaded again once.

    Returns the path in the Hugging Face cache.  Raises :class:`DownloadError` with one line
    saying what was wrong and what to do (gated: accept the licence on the repository's page
    and set ``HF_TOKEN``; missing file; offline).
    """
    path = _hub_download(repo, filename, revision, force=False)
    problem = _hub_blob_problem(path, sha256)
    if problem is None:
        return path
    logger.warning(
        f"convnext_keras: the Hugging Face cache's copy of {repo}/{filename} is damaged "
        f"({problem}); downloading it again."
    )
    path = _hub_download(repo, filename, revision, force=True)
    problem = _hub_blob_problem(path, sha256)
    if problem is not None:
        raise DownloadError(
            f"{_hub_page(repo)} delivered {filename}, but {problem}: a mirror or proxy changed "
            "it, or the pin is wrong. Nothing was converted."
        )
    return path


def resolve_hub_address(address: str) -> Path:
    """The local file of an ``hf://org/repo[@revision][/file]`` address (downloaded by
    :func:`hub_file`); a repository without file gives its ``model.safetensors``, else its
    ``pytorch_model.bin``."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, revision, filename = parse_hf_address(address)
    if filename is not None:
        return hub_file(repo, filename, revision)
    for candidate in HUB_DEFAULT_FILES:
        try:
            return hub_file(repo, candidate, revision)
        except DownloadError as e:
            cause = e.__cause__
            # Only "the Hub has no such file" moves on (not offline, not a missing cache copy).
            absent = isinstance(cause, EntryNotFoundError)
            if not absent or isinstance(cause, LocalEntryNotFoundError):
                raise
    raise DownloadError(
        f"{repo} holds neither {' nor '.join(HUB_DEFAULT_FILES)}: name the file "
        f"(hf://{repo}/FILE; see {_hub_page(repo)}/tree/{revision or 'main'})."
    )


def _hf_cache_root() -> Path:
    """The Hugging Face cache folder, resolved from the environment as ``huggingface_hub``'s
    ``constants.HF_HUB_CACHE`` is (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``, ``HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``) - or read from it when
    the library is imported already."""
    loaded = sys.modules.get("huggingface_hub.constants")
    if loaded is not None:
        return Path(loaded.HF_HUB_CACHE)
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_cached_path(ckpt: registry.Checkpoint) -> Path | None:
    """The Hugging Face cache's copy of a Hub row's file, or None (nothing downloaded).

    ``huggingface_hub.try_to_load_from_cache`` answers; it is imported (0.2-0.4 s) only when
    the cache holds a folder of the repository (``models--<org>--<name>``), so that
    ``convnext list`` stays quick on a machine that never downloaded one."""
    src = ckpt.source
    if not (_hf_cache_root() / f"models--{src.repo.replace('/', '--')}").is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.repo, src.path, revision=src.revision)
    return Path(found) if isinstance(found, str) else None
