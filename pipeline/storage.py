"""Where cubes, tile predictions and products live: a local path, or an object-store URL (``s3://bucket/key``)
so that the nodes of a cluster share no disk.

One place decides how a location is reached:

- Zarr (the cube): zarr 3 opens ``s3://`` URLs itself through fsspec (``s3fs``); xarray's ``to_zarr`` and
  ``open_zarr`` pass them on. Nothing here wraps it.
- GDAL (tile GeoTIFFs, product COGs): rasterio turns ``s3://`` into ``/vsis3/``; :func:`gdal_env` gives GDAL the
  endpoint of an S3-compatible server (GDAL does not read ``AWS_ENDPOINT_URL``).
- Plain files (manifests, tables, JSON): :func:`filesystem` (fsspec). Objects are written whole (an S3 PUT is
  atomic: a reader sees the old object or the new one), so the local "temporary file, then ``os.replace``" rule
  becomes "write locally, then :func:`upload`".

Credentials come from the environment only, as every AWS tool reads them (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``) and
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a server other than AWS (MinIO, Ceph, moto). Ray workers
started by the driver inherit them; on a cluster, set them on every node (KubeRay: the pod environment).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3",)


class StorageError(OSError):
    """An object-store location that cannot be used (unknown scheme, no bucket, no credentials)."""


def is_remote(location: str | Path) -> bool:
    """True for an object-store URL (``s3://...``); local paths (and ``file://``) are not."""
    return isinstance(location, str) and urlparse(location).scheme in REMOTE_SCHEMES


def check_url(url: str) -> str:
    """``url`` stripped of a trailing slash; :class:`StorageError` for a scheme or bucket it cannot use."""
    u = urlparse(url)
    if u.scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{url}: only {', '.join(s + '://' for s in REMOTE_SCHEMES)} URLs are supported "
                           "besides local paths")
    if not u.netloc:
        raise StorageError(f"{url}: no bucket (expected s3://BUCKET/KEY)")
    return url.rstrip("/")


def location(path: str | Path) -> str:
    """The canonical form of a location: an absolute local path, or the URL as given (no trailing slash). Ray
    workers may run in another working directory, so relative paths are resolved here."""
    if is_remote(path):
        return check_url(str(path))
    return str(Path(path).resolve())


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def endpoint_url() -> str | None:
    """The S3 endpoint of an S3-compatible server, from the environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=4)
def _s3(endpoint: str | None):
    import s3fs

    kw = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    # skip_instance_cache: a filesystem per endpoint, not fsspec's global one (tests start servers on new ports)
    return s3fs.S3FileSystem(skip_instance_cache=True, **kw)


def filesystem(url: str):
    """The fsspec filesystem of an object-store URL (credentials and endpoint from the environment)."""
    scheme = urlparse(check_url(url)).scheme
    if scheme == "s3":
        return _s3(endpoint_url())
    raise StorageError(f"{url}: no filesystem for {scheme}://")  # pragma: no cover (check_url rejects it)


def object_key(url: str) -> str:
    """``bucket/key`` of an object-store URL: the path fsspec filesystems take."""
    u = urlparse(url)
    return f"{u.netloc}{u.path}"


def exists(path: str | Path) -> bool:
    if is_remote(path):
        return filesystem(str(path)).exists(object_key(str(path)))
    return Path(path).exists()


def read_bytes(path: str | Path) -> bytes:
    if is_remote(path):
        return filesystem(str(path)).cat_file(object_key(str(path)))
    return Path(path).read_bytes()


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` whole: an object PUT, or a local temporary file then ``os.replace`` (atomic both ways)."""
    if is_remote(path):
        filesystem(str(path)).pipe_file(object_key(str(path)), data)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def upload(local: str | Path, dest: str | Path) -> None:
    """Move a finished local file to ``dest`` whole (an object PUT, or ``os.replace`` on a local disk)."""
    if is_remote(dest):
        filesystem(str(dest)).put_file(str(local), object_key(str(dest)))
        Path(local).unlink(missing_ok=True)
        return
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    os.replace(local, dest)


def remove(path: str | Path) -> None:
    """Delete a file or object if it is there."""
    if is_remote(path):
        fs = filesystem(str(path))
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(object_key(str(path)))
        return
    Path(path).unlink(missing_ok=True)


def remove_tree(path: str | Path) -> None:
    """Delete a directory or every object under a prefix, if there."""
    if is_remote(path):
        fs = filesystem(str(path))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(object_key(str(path)), recursive=True)
        return
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def local_output(dest: str | Path) -> Iterator[Path]:
    """A local path to write ``dest``'s content to (GDAL's COG driver needs a seekable file): for a local
    ``dest`` a temporary name beside it, for a URL a temporary directory; on success the file is moved whole
    to ``dest`` (:func:`upload`), on failure removed."""
    if is_remote(dest):
        with tempfile.TemporaryDirectory(prefix="skysense-out-") as tmp:
            local = Path(tmp) / (PurePosixPath(urlparse(str(dest)).path).name or "out")
            yield local
            upload(local, dest)
        return
    d = Path(dest)
    d.parent.mkdir(parents=True, exist_ok=True)
    local = d.with_name(f".{d.stem}.tmp-{os.getpid()}{d.suffix}")
    try:
        yield local
        os.replace(local, d)
    finally:
        local.unlink(missing_ok=True)


def gdal_env() -> dict[str, str]:
    """GDAL configuration options that reach an S3-compatible endpoint (``rasterio.Env(**gdal_env())``); empty
    for AWS itself (GDAL reads the credentials from the environment)."""
    ep = endpoint_url()
    if not ep:
        return {}
    u = urlparse(ep)
    return {"AWS_S3_ENDPOINT": u.netloc, "AWS_HTTPS": "YES" if u.scheme == "https" else "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE"}


_GDAL_SET: dict[str, str] = {}  # the options configure_gdal put into the environment


def configure_gdal() -> None:
    """Put :func:`gdal_env` into this process's environment (where GDAL reads configuration options), leaving
    options the user set alone (those it set itself follow ``AWS_ENDPOINT_URL``); call before GDAL opens an
    ``s3://`` location. Cheap: environment reads."""
    for k, v in gdal_env().items():
        if os.environ.get(k) in (None, _GDAL_SET.get(k)):
            os.environ[k] = _GDAL_SET[k] = v
