"""The one place where a URL becomes an fsspec filesystem.

Supported: local paths (plain or file://) and s3:// (s3a://). S3 credentials, endpoint and region come
from `StorageSection` when set; otherwise botocore reads the standard AWS environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL[_S3], AWS_DEFAULT_REGION, AWS_PROFILE) and
~/.aws files. botocore ignores AWS_REGION, so it is passed on explicitly.

Secrets never reach a message, repr or log line: errors name the scheme, bucket path and endpoint only.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from dgbatch.config import ConfigError, StorageSection
from dgbatch.errors import JobError

LOCAL_SCHEMES = ("", "file", "local")
S3_SCHEMES = ("s3", "s3a")

# What decides the S3 client botocore builds: a change must not reuse a cached filesystem.
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
)  # fmt: skip
_s3_cache: dict[str, fsspec.AbstractFileSystem] = {}  # keyed by a hash, so no secret is held in a key
_s3_lock = threading.Lock()


def scheme(url: str) -> str:
    """The URL's scheme, lower-case; '' for a plain path."""
    protocol, _ = fsspec.core.split_protocol(url)
    return (protocol or "").lower()


class StorageError(JobError, OSError):
    """Storage the job needs cannot be reached or refuses the credentials (names URL, endpoint, credential source)."""


class StorageDenied(StorageError, PermissionError):
    """The store answered and refused: wrong or missing credentials, or no permission on the path."""


def _unsupported(s: str) -> ConfigError:
    return ConfigError(f"unsupported storage URL scheme {s + '://'!r}; supported: local paths, file://, s3://")


def storage_options(url: str, storage: StorageSection | None = None) -> dict[str, Any]:
    """fsspec options for `url`, for libraries that take `storage_options=` (e.g. datasets).

    The result holds plain secrets: pass it on, never log it. Empty for local paths.
    """
    s = scheme(url)
    if s in LOCAL_SCHEMES:
        return {}
    if s not in S3_SCHEMES:
        raise _unsupported(s)
    st = storage or StorageSection()
    if (st.key is None) != (st.secret is None):
        raise ConfigError("storage.key and storage.secret must be set together, or both left to the AWS environment")
    opts: dict[str, Any] = {}
    if st.key is not None and st.secret is not None:
        opts["key"] = st.key.get_secret_value()
        opts["secret"] = st.secret.get_secret_value()
    if st.endpoint_url:
        opts["endpoint_url"] = st.endpoint_url
    region = st.region or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def filesystem(url: str, storage: StorageSection | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) for `url`. Local paths come back absolute.

    S3 filesystems are cached per process, settings and AWS environment: building one costs a client.
    """
    s = scheme(url)
    if s in LOCAL_SCHEMES:
        fs = LocalFileSystem()
        return fs, fs._strip_protocol(url)
    if s not in S3_SCHEMES:
        raise _unsupported(s)
    if "@" in urlsplit(url).netloc:  # bucket names cannot hold '@': this is user:secret@bucket
        raise ConfigError(f"{s}:// URLs must not carry credentials; set storage.key/storage.secret or AWS_* variables")
    opts = storage_options(url, storage)
    env = {k: os.environ.get(k) for k in _AWS_ENV}
    token = hashlib.sha256(json.dumps([os.getpid(), opts, env], sort_keys=True).encode()).hexdigest()
    with _s3_lock:
        fs = _s3_cache.get(token)
        if fs is None:
            import s3fs  # heavy (aiobotocore): only S3 users pay for it

            # No listings cache: other workers commit files, and a cached listing makes exists() lie.
            fs = _s3_cache[token] = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **opts)
    return fs, fs._strip_protocol(url)


def endpoint(storage: StorageSection | None = None) -> str:
    """The S3 endpoint in use, for messages: settings, then environment, then AWS."""
    st = storage or StorageSection()
    return (
        st.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
    )


def check_access(url: str, storage: StorageSection | None = None, what: str = "") -> None:
    """Fail in seconds, before heavy work, if `url` cannot be reached with the configured credentials.

    A missing path is fine (an output root is created later). Refused credentials raise StorageDenied, an
    unreachable endpoint StorageError; both name the URL, endpoint and credential source, never a secret.
    """
    fs, path = filesystem(url, storage)
    try:
        try:
            fs.info(path)
        except FileNotFoundError:
            bucket = path.split("/", 1)[0]
            if scheme(url) in S3_SCHEMES and bucket != path and not fs.exists(bucket):
                raise StorageError(f"cannot access {what + ' ' if what else ''}{url}: bucket {bucket!r} does not "
                                   f"exist at endpoint {endpoint(storage)}") from None
    except StorageError:
        raise
    except Exception as e:  # botocore's connection errors are not OSErrors
        if scheme(url) not in S3_SCHEMES:
            if isinstance(e, OSError):
                raise StorageError(f"{what or 'path'} {url}: {e.strerror or e}") from None
            raise
        source = "storage.key/storage.secret" if storage and storage.key else "the AWS environment / config files"
        denied = isinstance(e, PermissionError) or "AccessDenied" in str(e) or "SignatureDoesNotMatch" in str(e)
        reason = _brief_storage_error(e)
        label = f"{what} " if what else ""
        msg = f"cannot access {label}{url} at endpoint {endpoint(storage)} with credentials from {source}: {reason}"
        raise (StorageDenied if denied else StorageError)(msg) from None


def _brief_storage_error(e: BaseException) -> str:
    """What went wrong, in a few words: botocore's messages carry request ids and long tails."""
    text = " ".join(str(e).split()) or type(e).__name__
    if "Could not connect to the endpoint URL" in text or "Connect timeout" in text:
        return "the endpoint does not answer (refused or timed out); check storage.endpoint_url / AWS_ENDPOINT_URL"
    if "SignatureDoesNotMatch" in text or "InvalidAccessKeyId" in text or "AccessDenied" in text or isinstance(
        e, PermissionError
    ):
        return "access denied: the key or secret is wrong, or it has no permission on this path"
    if "NoSuchBucket" in text:
        return "the bucket does not exist"
    return f"{type(e).__name__}: {text[:300]}"


def overlap(a: str, b: str) -> str | None:
    """How two locations (URLs or local paths) overlap: "same", "a_in_b", "b_in_a", or None.

    Local paths are compared with symlinks resolved; object-store URLs by bucket and key prefix (on the
    same endpoint, which one job's storage settings imply). Different schemes never overlap.
    """
    sa, sb = scheme(a), scheme(b)
    local = (sa in LOCAL_SCHEMES, sb in LOCAL_SCHEMES)
    if local == (True, True):
        pa = os.path.realpath(fsspec.core.strip_protocol(a)) if sa else os.path.realpath(a)
        pb = os.path.realpath(fsspec.core.strip_protocol(b)) if sb else os.path.realpath(b)
    elif sa in S3_SCHEMES and sb in S3_SCHEMES:
        pa, pb = a.split("://", 1)[1].strip("/"), b.split("://", 1)[1].strip("/")
    else:
        return None
    pa, pb = pa.rstrip("/") or "/", pb.rstrip("/") or "/"
    if pa == pb:
        return "same"
    if pa.startswith(pb.rstrip("/") + "/"):
        return "a_in_b"
    if pb.startswith(pa.rstrip("/") + "/"):
        return "b_in_a"
    return None


def join(root: str, *parts: str) -> str:
    """`root` and `parts` joined with single '/', keeping any scheme: join("s3://b/", "x", "/y") == "s3://b/x/y"."""
    out = root.rstrip("/")
    if not out or out.endswith(":"):  # "/" or "s3://": keep the slashes
        out = root
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}{part}" if out.endswith("/") else f"{out}/{part}"
    return out
