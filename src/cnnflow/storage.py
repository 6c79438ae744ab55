"""Object storage URIs (`s3://bucket/prefix`, and `gs://`, `az://` where fsspec's packages
for them are installed) beside local paths, through fsspec.

    if is_remote(uri):
        write_bytes(join(uri, "manifest.json"), data)    # StorageError naming the URI
        names = list_names(uri)                           # object names under the prefix

fsspec (s3fs for s3://) rather than webdataset's URL handling: webdataset only streams
tars front to back through `curl`/`aws s3 cp` pipes, while the loader, `cnnflow verify`,
checkpoints (torch.distributed.checkpoint's FsspecWriter/FsspecReader) and the model
upload all need listing, sizes, deletes and whole-object reads and writes from one client.

Where to find the bucket and who you are comes from the environment, never from
params.yaml: `AWS_ENDPOINT_URL` (an S3-compatible server such as MinIO), and the standard
credential chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance or
pod roles). `CNNFLOW_STORAGE_TIMEOUT_S` (default 10) bounds each connect and read and
`CNNFLOW_STORAGE_RETRIES` (default 3) the attempts on a transient error (exponential
backoff), so an endpoint that does not answer is an error naming it, never a hang.

A bucket has no rename, so a reader never sees half of anything because the writers
publish last: a shard set's manifest.json after its tars (`cnnflow.data.shards`), a
checkpoint's `.done` marker after its objects (`cnnflow.train.checkpoint`), a model
directory's `_SUCCESS` after its files (`upload_dir`).

`prepare.out_dir` stays a local directory: the shard stage memory-maps its arrays, and it
is the local cache that shards are cut from and uploaded to `shard.out_dir`.

fsspec and its backends are imported on first use of a remote URI only: local runs and
the light modules (the CLI, stages, data/) never load s3fs or botocore.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from cnnflow.errors import CnnflowError

REMOTE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs")
SUCCESS = "_SUCCESS"
_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
T = TypeVar("T")


class StorageError(CnnflowError):
    """Object storage cannot be reached, refuses us, or lacks what a URI names."""


def is_remote(uri: str | Path) -> bool:
    return isinstance(uri, str) and uri.split("://", 1)[0] in REMOTE_SCHEMES and "://" in uri


def join(uri: str | Path, *parts: str) -> str | Path:
    """`uri`/part/...: a str for a remote URI, a Path for a local one."""
    if not is_remote(uri):
        return Path(uri).joinpath(*parts)
    return "/".join([str(uri).rstrip("/"), *parts])


def timeout_s() -> float:
    return float(os.environ.get("CNNFLOW_STORAGE_TIMEOUT_S", "10"))


def retries() -> int:
    return max(1, int(os.environ.get("CNNFLOW_STORAGE_RETRIES", "3")))


def fs_options(uri: str) -> dict[str, Any]:
    """fsspec options for `uri`'s backend: the endpoint from AWS_ENDPOINT_URL, bounded
    timeouts and retries (credentials: the backend's own chain)."""
    if not uri.startswith("s3://"):
        return {}
    config = {"connect_timeout": timeout_s(), "read_timeout": timeout_s(),
              "retries": {"max_attempts": retries(), "mode": "standard"}}
    options: dict[str, Any] = {"config_kwargs": config}
    if os.environ.get("AWS_ENDPOINT_URL"):
        options["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    return options


_FS: dict[tuple[int, str], Any] = {}


def filesystem(uri: str) -> Any:
    """The fsspec file system of `uri`'s scheme, one per process (a forked DataLoader
    worker makes its own: an s3fs event loop does not survive a fork)."""
    scheme = uri.split("://", 1)[0]
    key = (os.getpid(), scheme)
    if key not in _FS:
        try:
            import fsspec

            fs = fsspec.filesystem(scheme, skip_instance_cache=True, **fs_options(uri))
            if hasattr(fs, "retries"):
                fs.retries = retries()  # s3fs's own retry loop on top of botocore's
            _FS[key] = fs
        except ImportError:
            raise StorageError(f"{uri}: {scheme}:// needs the {_PACKAGES[scheme]} package "
                               "installed") from None
        except ValueError as exc:
            raise StorageError(f"{uri}: {exc}") from None
    return _FS[key]


def _describe(uri: str, exc: BaseException) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default endpoint")
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "InvalidAccessKeyId" in \
            text or "SignatureDoesNotMatch" in text or name == "NoCredentialsError":
        return (f"{uri}: access denied ({text}); check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if "bucket does not exist" in text.lower() or "NoSuchBucket" in text:
        return f"{uri}: bucket {uri.split('://', 1)[1].split('/', 1)[0]!r} does not exist"
    if isinstance(exc, FileNotFoundError):
        return f"{uri}: not found"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                "ClientConnectorError", "ServerTimeoutError", "TimeoutError",
                "FSTimeoutError", "ConnectionClosedError") or isinstance(exc, TimeoutError):
        return (f"{uri}: endpoint {endpoint} did not answer within "
                f"{timeout_s():g} s x {retries()} attempts ({name}); check AWS_ENDPOINT_URL "
                "or CNNFLOW_STORAGE_TIMEOUT_S")
    return f"{uri}: {name}: {text}"


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | CnnflowError):
        return False
    text = str(exc)
    return not any(k in text for k in ("AccessDenied", "InvalidAccessKeyId", "NoSuchBucket",
                                       "SignatureDoesNotMatch", "does not exist"))


def call(uri: str, fn: Callable[[], T], *, attempts: int | None = None) -> T:
    """`fn()`, retried with exponential backoff on a transient error (at most
    `retries()` attempts); any failure becomes one StorageError line naming `uri`."""
    attempts = attempts or retries()
    for attempt in range(attempts):
        try:
            return fn()
        except CnnflowError:
            raise
        except Exception as exc:  # botocore, aiohttp and OSError alike
            if attempt + 1 >= attempts or not _transient(exc):
                raise StorageError(_describe(uri, exc)) from None
            time.sleep(min(2.0, 0.1 * 2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def _path(uri: str) -> str:
    return uri.split("://", 1)[1]


def read_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    fs = filesystem(uri)
    return call(uri, lambda: fs.cat_file(_path(uri), start=start, end=end))


def write_bytes(uri: str, data: bytes) -> None:
    """One PUT: the object is there whole or not at all."""
    fs = filesystem(uri)
    call(uri, lambda: fs.pipe_file(_path(uri), data))


def put_file(local: str | Path, uri: str) -> None:
    fs = filesystem(uri)
    call(uri, lambda: fs.put_file(str(local), _path(uri)))


def get_file(uri: str, local: str | Path) -> None:
    fs = filesystem(uri)
    call(uri, lambda: fs.get_file(_path(uri), str(local)))


def list_sizes(uri: str) -> dict[str, int]:
    """name -> size of the objects directly under prefix `uri` ({} when none); a missing
    bucket is a StorageError."""
    fs = filesystem(uri)
    bucket = _path(uri).split("/", 1)[0]

    def ls() -> dict[str, int]:
        fs.invalidate_cache()
        if not fs.exists(bucket):
            raise FileNotFoundError("The specified bucket does not exist")
        try:
            entries = fs.ls(_path(uri), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e["name"].rstrip("/") != _path(uri).rstrip("/")}

    return call(uri, ls)


def delete(uri: str, *, recursive: bool = False) -> None:
    fs = filesystem(uri)

    def rm() -> None:
        with suppress(FileNotFoundError):
            fs.rm(_path(uri), recursive=recursive)

    call(uri, rm)


def move(uri: str, target: str) -> None:
    """Copy then delete (a bucket has no rename)."""
    fs = filesystem(uri)
    prefix, scheme = _path(uri).rstrip("/"), uri.split("://", 1)[0]
    for name in call(uri, lambda: (fs.invalidate_cache(), fs.find(prefix))[1]):
        dest = _path(target).rstrip("/") + name[len(prefix):]
        call(uri, lambda n=name, d=dest: fs.copy(n, d))
        delete(f"{scheme}://{name}")


def exists(uri: str) -> bool:
    """Whether the object (or prefix) is there; a missing bucket is a StorageError."""
    fs = filesystem(uri)
    bucket = _path(uri).split("/", 1)[0]

    def check() -> bool:
        fs.invalidate_cache()
        if fs.exists(_path(uri)):
            return True
        if not fs.exists(bucket):
            raise FileNotFoundError("The specified bucket does not exist")
        return False

    return call(uri, check)


# ---------------------------------------------------------------------------- local copies


def cache_root() -> Path:
    """Local scratch for remote data: `CNNFLOW_STORAGE_CACHE_DIR`, else a per-user
    directory under the system temp dir."""
    root = os.environ.get("CNNFLOW_STORAGE_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), f"cnnflow-cache-{os.getuid()}")
    return Path(root)


def staging_dir(uri: str, kind: str) -> Path:
    """A local directory standing for remote `uri` (one per URI and `kind`)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache_root() / kind / digest


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy the files of `local` to prefix `uri`, then write `uri/_SUCCESS` last: a
    reader that checks for it (`download_dir`) never takes a half-uploaded directory."""
    local = Path(local)
    delete(str(join(uri, SUCCESS)))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        put_file(path, str(join(uri, *path.relative_to(local).parts)))
    write_bytes(str(join(uri, SUCCESS)), b"")


def download_dir(uri: str, local: str | Path, what: str, *, marker: bool = True) -> Path:
    """The complete directory at prefix `uri` (published by `upload_dir`) copied into
    `local`; StorageError when its `_SUCCESS` marker is missing (`marker=False`: any
    prefix, such as a source data set uploaded by other tools; empty is an error)."""
    sizes = list_sizes(uri)
    if not sizes:
        raise StorageError(f"{uri}: no {what} here (no objects under this prefix)")
    if marker and SUCCESS not in sizes:
        raise StorageError(f"{uri}: no complete {what} here (no {SUCCESS} marker: not "
                           "written yet, or its upload was interrupted)")
    local = Path(local)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fs = filesystem(uri)
    prefix = _path(uri).rstrip("/")
    for name in call(uri, lambda: fs.find(prefix)):
        rel = name[len(prefix) + 1:]
        if rel and rel != SUCCESS:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            get_file(f"{uri.split('://', 1)[0]}://{name}", tmp / rel)
    shutil.rmtree(local, ignore_errors=True)
    os.replace(tmp, local)
    return local


def local_dir(uri: str | Path, kind: str) -> Path:
    """`uri` itself when local, else its staging directory (`staging_dir`)."""
    return staging_dir(str(uri), kind) if is_remote(uri) else Path(uri)


def local_input(uri: str | Path, kind: str, what: str) -> str:
    """A local directory holding input `uri`: itself when local (or an MLflow
    `models:/`/`runs:/` reference), else a fresh download of the complete directory."""
    if not is_remote(uri):
        return str(uri)
    return str(download_dir(str(uri), staging_dir(str(uri), f"{kind}-in"), what))


@contextmanager
def local_output(uri: str | Path, kind: str, *, publish: bool = True) -> Iterator[Path]:
    """A local directory to write an output into: `uri` itself when local; for a remote
    `uri`, a staging directory uploaded with `upload_dir` when the block ends normally
    (and `publish`: only one process of a job uploads)."""
    if not is_remote(uri):
        yield Path(uri)
        return
    stage = staging_dir(str(uri), kind)
    stage.mkdir(parents=True, exist_ok=True)
    yield stage
    if publish:
        upload_dir(stage, str(uri))
