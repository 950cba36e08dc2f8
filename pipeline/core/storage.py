"""The one storage layer: local paths and fsspec URLs (s3://, gs://, file://) alike.

Every stage, the trainer and the exports read and write through these functions, so a run
directory, an input list or a checkpoint folder may sit on local disk or on an object store.
Paths are plain strings (a `Path` is accepted and means local disk); a URL keeps its scheme
in everything returned, so a listed file can be handed straight back to `open_file`.

Writes are atomic for a reader: a file is written whole under a temporary name and then
published. On local disk that is `os.replace` in the same folder; on an object store it is one
upload to the final key (a single PUT, or a multipart upload completed in one call, makes the
object visible whole or not at all), so no reader ever sees half a file.

The S3 endpoint comes from the standard `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), as for
the AWS CLI; credentials from the usual AWS variables or files.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec

PathLike = str | os.PathLike

# scheme -> (driver package, extra that installs it)
_DRIVERS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}
_LOCAL_SCHEMES = ("file", "local")
_GLOB_CHARS = "*?["


class StorageError(OSError):
    """A path or URL that cannot be used: missing driver, unreachable store, missing file.
    The message names the path. Stage commands (pipeline/core/command.py) report it as the
    user's mistake, without a traceback. This module imports nothing of the project, so every
    layer (manifests, stages, the trainer) can use it."""


class MissingPath(StorageError, FileNotFoundError):
    """The file, folder or bucket does not exist."""


def scheme(path: PathLike) -> str:
    """The URL scheme ("s3", "gs", "file"), or "" for a plain local path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.isidentifier() else ""


def is_remote(path: PathLike) -> bool:
    """True when the path is not on local disk (any scheme but file://)."""
    return scheme(path) not in ("", *_LOCAL_SCHEMES)


def _storage_options(proto: str) -> dict[str, Any]:
    if proto not in _DRIVERS:
        return {}
    # Other processes (Ray workers, a second run) write the same run folder: a cached listing
    # would answer "missing" for a shard another worker has just published.
    options: dict[str, Any] = {"use_listings_cache": False}
    if proto in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # s3fs leaves the endpoint to botocore, which reads AWS_ENDPOINT_URL only in recent
        # versions; passing it explicitly works with every version.
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def filesystem(path: PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a path and the path inside it (no scheme)."""
    text = os.fspath(path)
    proto = scheme(text)
    if not proto:
        return fsspec.filesystem("file"), os.path.abspath(text)
    try:
        fs, inside = fsspec.core.url_to_fs(text, **_storage_options(proto))
    except ImportError as e:
        package, extra = _DRIVERS.get(proto, (None, None))
        hint = f"pip install 'rectiflow[{extra}]'" if extra else str(e)
        raise StorageError(f"{proto}:// needs {package or 'a driver'}: {hint} ({text})") from e
    except ValueError as e:  # an unknown scheme
        raise StorageError(f"{text}: {e}") from e
    return fs, inside


def _url(fs: fsspec.AbstractFileSystem, inside: str, like: str) -> str:
    """`inside` in the form of `like`: with its scheme when `like` had one."""
    if not scheme(like):
        return inside
    return fs.unstrip_protocol(inside)


@contextlib.contextmanager
def _errors(path: PathLike, action: str) -> Iterator[None]:
    """Turn a filesystem's own errors into ones that name the path and say what failed."""
    text = os.fspath(path)
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise MissingPath(f"{text} does not exist (no such file, folder or bucket; {action})") from e
    except PermissionError as e:
        raise StorageError(f"{text}: permission denied ({action}): {e}{_endpoint(text)}") from e
    except (OSError, TimeoutError) as e:
        raise StorageError(f"{text}: cannot {action}: {e}{_endpoint(text)}") from e
    except Exception as e:  # botocore/aiohttp errors that are not OSErrors (bad endpoint...)
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "google"):
            raise StorageError(f"{text}: cannot {action}: {e}{_endpoint(text)}") from e
        raise


def _endpoint(text: str) -> str:
    """Where an S3 URL was sent, for error messages: the usual culprit is the endpoint."""
    if scheme(text) not in ("s3", "s3a"):
        return ""
    endpoint = _storage_options("s3").get("client_kwargs", {}).get("endpoint_url")
    return f" (endpoint {endpoint} from AWS_ENDPOINT_URL)" if endpoint else " (endpoint: AWS)"


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...`; URLs always join with "/", local paths with the OS separator."""
    text = os.fspath(base)
    if scheme(text):
        return posixpath.join(text.rstrip("/") or text, *(p.strip("/") for p in parts))
    return os.path.join(text, *parts)


def exists(path: PathLike) -> bool:
    fs, inside = filesystem(path)
    with _errors(path, "check whether it exists"):
        return bool(fs.exists(inside))


def size(path: PathLike) -> int:
    fs, inside = filesystem(path)
    with _errors(path, "read its size"):
        return int(fs.size(inside))


def info(path: PathLike) -> dict[str, Any]:
    """The filesystem's details of a file: size, and mtime (local), ETag/LastModified (S3),
    md5Hash/updated (GCS)."""
    fs, inside = filesystem(path)
    with _errors(path, "read its details"):
        return dict(fs.info(inside))


def open_file(path: PathLike, mode: str = "rb", **kwargs: Any) -> IO:
    """An open file (use as a context manager). Writing ("wb") on an object store uploads on
    close; for files a reader may see while being written, use `write_bytes_atomic` or
    `staged` instead."""
    fs, inside = filesystem(path)
    if "w" in mode and not is_remote(path):
        os.makedirs(os.path.dirname(inside) or ".", exist_ok=True)
    with _errors(path, "open it"):
        return fs.open(inside, mode, **kwargs)


def read_bytes(path: PathLike) -> bytes:
    fs, inside = filesystem(path)
    with _errors(path, "read it"):
        return fs.cat_file(inside)


def makedirs(path: PathLike) -> None:
    """A local folder and its parents; nothing on an object store (keys need no folders)."""
    if not is_remote(path):
        os.makedirs(filesystem(path)[1], exist_ok=True)


def remove(path: PathLike, missing_ok: bool = True) -> None:
    """Delete one file or object."""
    fs, inside = filesystem(path)
    with _errors(path, "delete it"):
        try:
            fs.rm_file(inside)
        except FileNotFoundError:
            if not missing_ok:
                raise


def local_staging(final: PathLike) -> Path:
    """A fresh local temporary path to write `final`'s content to before `publish`: next to
    `final` on local disk (so the rename stays on one filesystem), in the system temp folder
    for an object store."""
    name = posixpath.basename(os.fspath(final).rstrip("/")) or "file"
    if is_remote(final):
        folder = tempfile.mkdtemp(prefix="rectiflow-stage-")
        return Path(folder) / name
    target = Path(filesystem(final)[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    return Path(tmp)


def publish(local_tmp: Path, final: PathLike) -> None:
    """Make a finished local file visible at `final` in one step, then drop the temporary.

    Local disk: `os.replace` (atomic within a filesystem; across filesystems the file is first
    copied next to `final`). Object store: one upload to the final key, then the local
    temporary is removed."""
    local_tmp = Path(local_tmp)
    if not local_tmp.is_file():
        raise MissingPath(f"{local_tmp}: nothing to publish to {os.fspath(final)}")
    fs, inside = filesystem(final)
    if not is_remote(final):
        target = Path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(local_tmp, target)
        except OSError:  # another filesystem: copy beside the target, then rename
            beside = local_staging(target)
            shutil.copyfile(local_tmp, beside)
            os.replace(beside, target)
            local_tmp.unlink()
        return
    with _errors(final, "upload it"):
        fs.put_file(str(local_tmp), inside)
    local_tmp.unlink()
    with contextlib.suppress(OSError):  # the folder local_staging made for it
        local_tmp.parent.rmdir()


@contextlib.contextmanager
def staged(final: PathLike) -> Iterator[Path]:
    """Write `final` through a local file: `with staged(url) as tmp: write tmp`. Published
    when the block ends without an error; on an error the temporary is removed and nothing
    is published."""
    tmp = local_staging(final)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        if is_remote(final):
            with contextlib.suppress(OSError):
                tmp.parent.rmdir()
        raise
    publish(tmp, final)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write a whole file so that a reader sees the old content or the new, never a part."""
    with staged(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[Path]:
    """A local Path holding the file's content, for tools that need one (tarfile, faiss,
    safetensors' mmap). Local files are given as they are; remote ones are downloaded to a
    temporary folder removed on exit."""
    if not is_remote(path):
        inside = filesystem(path)[1]
        if not os.path.exists(inside):
            raise MissingPath(f"{os.fspath(path)} does not exist (no such file)")
        yield Path(inside)
        return
    fs, inside = filesystem(path)
    with tempfile.TemporaryDirectory(prefix="rectiflow-copy-") as folder:
        local = Path(folder) / (posixpath.basename(inside.rstrip("/")) or "file")
        with _errors(path, "download it"):
            fs.get_file(inside, str(local))
        yield local


def _hidden(inside: str) -> bool:
    # Spark/Hadoop side files (_SUCCESS, .part.crc) and our own temporaries are not parts
    return posixpath.basename(inside.rstrip("/")).startswith(("_", "."))


def _hidden_below(path: str, folder: str) -> bool:
    return any(part.startswith(("_", ".")) for part in posixpath.relpath(path, folder).split("/"))


def _list_one(spec: str) -> list[str]:
    fs, inside = filesystem(spec)
    with _errors(spec, "list it"):
        if any(c in inside for c in _GLOB_CHARS):
            found = [p for p in fs.glob(inside) if not _hidden(p) and fs.isfile(p)]
            if not found:
                raise MissingPath(f"{spec}: the pattern matches no file")
        elif fs.isdir(inside):
            found = [p for p in fs.find(inside) if not _hidden_below(p, inside)]
            if not found:
                raise MissingPath(f"{spec}: the folder holds no file")
        elif fs.isfile(inside):
            found = [inside]
        else:
            raise MissingPath(f"{spec} does not exist (no such file, folder or bucket)")
    return sorted(_url(fs, p, spec) for p in found)


def list_files(spec: PathLike | Iterable[PathLike]) -> list[str]:
    """The files a spec names, sorted: one file, a glob (`parts/*.parquet`), a folder (every
    file under it, side files starting with "_" or "." left out), or a list of any of those.
    A spec that names nothing is an error naming it; a file named twice is listed once."""
    specs = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not specs:
        raise MissingPath("an empty list of inputs")
    files: set[str] = set()
    for one in specs:
        files.update(_list_one(_local_glob_safe(os.fspath(one))))
    return sorted(files)


def _local_glob_safe(text: str) -> str:
    # a local path with "~" is the user's home, as in a shell
    return os.path.expanduser(text) if not scheme(text) else text


__all__ = [
    "MissingPath", "StorageError", "exists", "filesystem", "info", "is_remote", "join", "list_files",
    "local_copy", "local_staging", "makedirs", "open_file", "publish", "read_bytes", "remove",
    "scheme", "size", "staged", "write_bytes_atomic",
]
