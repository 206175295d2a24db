"""Paths that may be local or any fsspec URL (s3:// through s3fs), with atomic writes.

Local files are written under a temporary name and renamed; an object-store PUT is atomic by itself
(readers see the old object or the whole new one), so remote files are written in one put.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import fsspec

from ldm.files import atomic_write_bytes


def sha256_files(*paths) -> str:
    """sha256 of local files' bytes, read in 4 MiB blocks, in the order given (one file: that file's sha256)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def unstrip(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Put the protocol back on a path an fsspec call returned (s3fs returns 'bucket/key')."""
    if is_remote(like):
        proto = like.split("://", 1)[0]
        return f"{proto}://{path}"
    return path


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def read_json(uri: str, default: Any = None) -> Any:
    fs, path = fs_and_path(uri)
    if not fs.exists(path):
        return default
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def write_bytes_atomic(uri: str, data: bytes) -> None:
    if is_remote(uri):
        fs, path = fs_and_path(uri)
        fs.pipe_file(path, data)
        return

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_bytes(uri.removeprefix("file://"), write)


def _json_default(o):
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, json.dumps(obj, indent=2, default=_json_default).encode())


def remove(uri: str) -> None:
    """Delete a file; one that is already gone is fine (a sweep that raced another)."""
    fs, path = fs_and_path(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def makedirs(uri: str) -> None:
    if is_remote(uri):
        return  # object stores have no directories
    Path(uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


class Unreachable(ConnectionError):
    """A storage or tracking endpoint did not answer: nothing was changed; rerun when it is back."""


_UNREACHABLE_NAMES = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                      "ConnectionRefusedError", "NewConnectionError", "MaxRetryError", "ConnectTimeout")


def is_unreachable(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is an endpoint that cannot be reached, whatever library raised it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError) or any(c.__name__ in _UNREACHABLE_NAMES for c in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def reaching(uri: str, what: str):
    """Turn a connection failure while touching `uri` into one clear Unreachable error that names it."""
    try:
        yield
    except Unreachable:
        raise
    except Exception as e:  # noqa: BLE001 - only connection failures are translated
        if not is_unreachable(e):
            raise
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "") if uri.startswith("s3://") else ""
        raise Unreachable(f"cannot reach the storage of {what} {uri!r}{f' at {endpoint}' if endpoint else ''} "
                          f"({type(e).__name__}); check the endpoint, network and credentials, then rerun") from None


def check_writable(uri: str) -> None:
    """Fail early with a clear message when the output location cannot be written."""
    probe = join(uri, f".write-probe-{os.getpid()}")
    try:
        with reaching(uri, "the output"):
            makedirs(uri)
            write_bytes_atomic(probe, b"ok")
            fs, path = fs_and_path(probe)
            fs.rm(path)
    except Unreachable:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the location named
        raise PermissionError(f"output location {uri!r} is not writable ({type(e).__name__}: {e}); "
                              f"choose another --output or fix its permissions/credentials") from e
