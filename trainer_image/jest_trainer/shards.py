"""WebDataset shards: resolve a URL pattern, open a shard by scheme, read its raw samples with retries.

Why a module of its own: every trainer process calls ``resolve_shards`` (no torch) when it opens its data,
before the reference trains, so a pattern that names no shard fails the job at once (a ``ValueError``
naming the field: exit 3, no restart spent); the operator cannot, since the paths are the pods' own. The
training stream calls ``read_raw_samples`` in every DataLoader worker. Tar parsing and sample grouping are webdataset's
(``tar_file_iterator`` + ``group_by_keys``); this module only adds what a long run over a web crawl
needs around them:

* **Schemes** (``url_scheme``): local paths and ``file://``; ``http(s)://`` (standard library, no
  curl needed); ``pipe:<command>`` (the command's stdout, a non-zero exit is a read error);
  everything else with ``<protocol>://`` (``s3://``, ``gs://``, ...) through fsspec, which needs the
  ``[remote]`` extra (``pip install 'jest-operator[remote]'``) — a missing package is a
  ``MissingExtraError`` raised by ``resolve_shards``, i.e. before training starts.
* **Retries**: a remote read that fails (connection refused, reset, HTTP 5xx, short read) is retried
  ``retries`` times with exponential backoff, re-opening the shard and skipping (without returning)
  the samples already read. A local file is not retried: its bytes will not change.
* **Broken shards**: a shard still unreadable after the retries is skipped and reported as
  ``unreadable_shard``; a shard that ends inside a tar member (truncated download, disk error) keeps
  the samples before the damage and reports one ``truncated`` sample. Reports go to ``on_problem``;
  nothing here raises for bad data.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import logging
import re
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("jest_trainer.shards")

HTTP_TIMEOUT_SECONDS = 60.0
REMOTE_EXTRA_HINT = "install the [remote] extra: pip install 'jest-operator[remote]' (fsspec with s3fs / gcsfs)"
_GLOB_CHARS = re.compile(r"[*?\[]")
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}

ProblemSink = Callable[[str, str, str, str], None]
"""``on_problem(reason, url, key, detail)``: ``reason`` is ``truncated`` or ``unreadable_shard``."""


class MissingExtraError(RuntimeError):
    """A shard URL needs an optional package (fsspec and its protocol's filesystem) that is not installed.

    A restart runs the same image, so the job fails at once (exit 3) instead of spending its backoff.
    """

    deterministic = True


class ShardOpenError(OSError):
    """A shard could not be opened or read (after any retries)."""


def url_scheme(url: str) -> str:
    """Which opener reads ``url``: ``"file"``, ``"http"``, ``"pipe"`` or ``"fsspec"`` (any other ``proto://``)."""
    if url.startswith("pipe:"):
        return "pipe"
    if url.startswith(("http://", "https://")):
        return "http"
    if url.startswith("file://") or "://" not in url:
        return "file"
    return "fsspec"


def _local_path(url: str) -> Path:
    return Path(url[len("file://") :] if url.startswith("file://") else url)


def _fsspec_filesystem(url: str) -> Any:
    """fsspec's filesystem for ``url``'s protocol, or ``MissingExtraError`` saying what to install."""
    protocol = url.split("://", 1)[0]
    package = _FSSPEC_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
    try:
        import fsspec
    except ImportError as error:
        raise MissingExtraError(
            f"{url}: {protocol}:// shards need fsspec and {package}; {REMOTE_EXTRA_HINT}"
        ) from error
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as error:
        raise MissingExtraError(f"{url}: {protocol}:// shards need {package} ({error}); {REMOTE_EXTRA_HINT}") from error


def resolve_shards(urls: str, *, field: str = "data.urls") -> list[str]:
    """The ordered, de-duplicated-checked list of shards that ``urls`` names; a clear error when it names none.

    ``urls`` is a webdataset pattern: brace ranges (``pool-{000000..000099}.tar``), ``::``-separated
    lists, and, for local paths and fsspec URLs, shell globs (``/data/*.tar``, sorted). Local shards
    must exist. HTTP and ``pipe:`` shards cannot be listed and are taken as written. A shard named
    twice is an error (it would be trained twice per epoch). Pure apart from listing the file system.
    """
    from webdataset.shardlists import expand_urls

    if not urls or not urls.strip():
        raise ValueError(f"{field}: empty shard pattern")
    resolved: list[str] = []
    for url in expand_urls(urls.strip()):
        url = url.strip()
        if not url:
            continue
        scheme = url_scheme(url)
        if scheme == "file":
            path = _local_path(url)
            if _GLOB_CHARS.search(str(path)):
                matches = sorted(glob.glob(str(path)))
                if not matches:
                    raise ValueError(f"{field}: {url!r} matches no file")
                resolved.extend(matches)
                continue
            if not path.is_file():
                raise ValueError(f"{field}: shard {url!r} does not exist (or is not a file)")
            resolved.append(url)
        elif scheme == "fsspec":
            filesystem = _fsspec_filesystem(url)
            if _GLOB_CHARS.search(url.split("://", 1)[1]):
                protocol = url.split("://", 1)[0]
                matches = sorted(filesystem.glob(url))
                if not matches:
                    raise ValueError(f"{field}: {url!r} matches no object")
                resolved.extend(m if "://" in m else f"{protocol}://{m}" for m in matches)
            else:
                resolved.append(url)
        else:
            resolved.append(url)
    if not resolved:
        raise ValueError(f"{field}: {urls!r} names no shard")
    seen: set[str] = set()
    for url in resolved:
        if url in seen:
            raise ValueError(f"{field}: shard {url!r} is named more than once (it would be read twice per epoch)")
        seen.add(url)
    return resolved


class _PipeStream:
    """stdout of a ``pipe:`` command; closing it waits for the command and reports a non-zero exit."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE)
        assert self.process.stdout is not None
        self.stdout: IO[bytes] = self.process.stdout

    def read(self, size: int = -1) -> bytes:
        return self.stdout.read(size)

    def abandon(self) -> None:
        """Stop the command without judging its exit status (the reader needs no more bytes)."""
        self.process.kill()
        self.stdout.close()
        self.process.wait()

    def close(self) -> None:
        """Close stdout and wait; a non-zero exit raises ``ShardOpenError`` (the command's failure is the cause)."""
        self.stdout.close()
        code = self.process.wait()
        if code != 0:
            raise ShardOpenError(f"pipe:{self.command!r} exited with status {code}")


@contextlib.contextmanager
def open_shard(url: str, *, timeout: float = HTTP_TIMEOUT_SECONDS) -> Iterator[IO[bytes]]:
    """A readable binary stream of one shard, by ``url_scheme``; raises ``ShardOpenError`` / ``OSError``."""
    scheme = url_scheme(url)
    if scheme == "file":
        with open(_local_path(url), "rb", buffering=1 << 20) as stream:
            yield stream
    elif scheme == "http":
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as error:
            raise ShardOpenError(f"{url}: HTTP {error.code} {error.reason}") from error
        except (urllib.error.URLError, TimeoutError) as error:
            raise ShardOpenError(f"{url}: {getattr(error, 'reason', error)}") from error
        with response:
            yield response
    elif scheme == "pipe":
        pipe = _PipeStream(url[len("pipe:") :])
        try:
            yield pipe  # type: ignore[misc]
        except GeneratorExit:  # the reader stopped early (enough samples): not a failure
            pipe.abandon()
            raise
        except BaseException as error:
            try:
                pipe.close()
            except ShardOpenError as failed:  # the command failing explains the read error better
                raise failed from error
            raise
        pipe.close()
    else:
        filesystem = _fsspec_filesystem(url)
        with filesystem.open(url, "rb") as stream:
            yield stream


def _is_permanent(url: str, error: BaseException) -> bool:
    """Errors that a retry cannot fix: anything on a local file, HTTP 4xx other than 408 / 429."""
    if url_scheme(url) == "file":
        return True
    cause = error.__cause__
    return isinstance(cause, urllib.error.HTTPError) and 400 <= cause.code < 500 and cause.code not in (408, 429)


def _key_of(name: str) -> str:
    from webdataset.tariterators import base_plus_ext

    key, _ = base_plus_ext(name)
    return key or name


def read_raw_samples(
    url: str,
    *,
    start: int = 0,
    retries: int = 0,
    backoff_seconds: float = 1.0,
    on_problem: ProblemSink | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(index, sample)`` for the samples of one shard from 0-based ``index >= start``.

    A sample is webdataset's raw dict: ``__key__``, ``__url__`` and one ``bytes`` value per file
    extension (lower case). Nothing is decoded. Samples before ``start`` are read past, not returned
    (that is how a resumed stream skips ahead cheaply). Errors never escape: see the module docstring.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    report = on_problem or (lambda reason, u, key, detail: None)
    next_index = 0
    attempt = 0
    while True:
        last_name = [""]
        last_key = ""
        try:
            with open_shard(url) as stream:

                def members(stream: IO[bytes] = stream, last_name: list[str] = last_name) -> Iterator[dict[str, Any]]:
                    for member in tar_file_iterator(stream):
                        last_name[0] = member["fname"]
                        member["__url__"] = url
                        yield member

                for index, sample in enumerate(group_by_keys(members())):
                    last_key = sample["__key__"]
                    if index < max(start, next_index):
                        continue
                    next_index = index + 1
                    yield index, sample
            return
        except (OSError, EOFError, tarfile.TarError, ValueError, http.client.HTTPException) as error:
            detail = f"{type(error).__name__}: {error}"
            if not _is_permanent(url, error) and attempt < retries:
                wait = backoff_seconds * (2**attempt)
                attempt += 1
                log.warning("%s: read failed (%s); retry %d of %d in %.1f s", url, detail, attempt, retries, wait)
                sleep(wait)
                continue
            if next_index == 0 and not last_key:
                report("unreadable_shard", url, "", detail)
            else:
                in_progress = _key_of(last_name[0]) if last_name[0] else last_key
                report("truncated", url, in_progress, detail)
            return


__all__ = [
    "REMOTE_EXTRA_HINT",
    "MissingExtraError",
    "ShardOpenError",
    "open_shard",
    "read_raw_samples",
    "resolve_shards",
    "url_scheme",
]
