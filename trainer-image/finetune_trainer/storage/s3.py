"""S3 access for datasets, base models, checkpoints and artifacts.

Credentials come only from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, mounted from the
job's Secret) or, when those are unset, the pod's ambient identity (IRSA, instance role). They are
never logged. Uploads go through the transfer manager (multipart, SHA-256 checksums) and are
idempotent: an object whose stored sha256 matches the file is not sent again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from finetune_api.spec import S3Spec

from ..errors import ConfigError, TrainerError, TransientError

log = logging.getLogger(__name__)

MB = 1024 * 1024
TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                   "RequestTimeTooSkewed", "OperationAborted", "BadGateway", "GatewayTimeout"}
CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "AuthorizationHeaderMalformed"}


def parse_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ConfigError("InvalidURI", f"not an s3:// URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise ConfigError("InvalidURI", f"no bucket in {uri}")
    return bucket, key


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * MB):
            h.update(block)
    return h.hexdigest()


def egress_denial(exc: BaseException) -> str | None:
    """The egress guard's refusal somewhere under a client's exception (botocore wraps urllib3's), if any."""
    from .egress_guard import EgressDenied

    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        cur = todo.pop()
        if not isinstance(cur, BaseException) or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, EgressDenied):
            return str(cur)
        kwargs = getattr(cur, "kwargs", None)
        todo += [cur.__cause__, cur.__context__, kwargs.get("error") if isinstance(kwargs, dict) else None]
    return None


def classify(exc: BaseException, what: str) -> TrainerError:
    """Maps a botocore failure to a configuration error (42) or a transient one (75)."""
    from botocore import exceptions as bx

    if isinstance(exc, TrainerError):
        return exc
    denial = egress_denial(exc)
    if denial:  # the operator's egress rule: every retry would be refused the same way
        return ConfigError("EgressDenied", f"{what}: {denial}")
    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return ConfigError("MissingCredentials", f"{what}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
                                                 "AWS_SECRET_ACCESS_KEY, or output.s3.credentialsSecretRef)")
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code == "NoSuchBucket":
            return ConfigError("BucketNotFound", f"{what}: the bucket does not exist")
        if code in CREDENTIAL_CODES:
            return ConfigError("InvalidCredentials", f"{what}: the S3 credentials were rejected ({code})")
        if code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            return ConfigError("AccessDenied", f"{what}: access denied ({code or status})")
        if code in ("NoSuchKey", "NotFound") or status == 404:
            return ConfigError("ObjectNotFound", f"{what}: not found")
        if code in TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError("StorageUnavailable", f"{what}: S3 answered {code or status}")
        return ConfigError("StorageError", f"{what}: S3 answered {code or status}: {err.get('Message', '')}")
    if isinstance(exc, bx.BotoCoreError | ConnectionError | TimeoutError | OSError):
        return TransientError("StorageUnavailable", f"{what}: {type(exc).__name__}: {exc}")
    return TransientError("StorageUnavailable", f"{what}: {type(exc).__name__}: {exc}")


@dataclass
class Uploaded:
    uri: str
    size_bytes: int
    sha256: str
    skipped: bool  # already there with the same sha256


class S3Store:
    def __init__(self, spec: S3Spec, attempts: int = 4, backoff_seconds: float = 2.0, request_attempts: int = 5):
        import boto3
        from botocore.config import Config

        self.spec = spec
        self.attempts = attempts
        self.backoff = backoff_seconds
        keys = {}
        if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
            keys = {"aws_access_key_id": os.environ["AWS_ACCESS_KEY_ID"],
                    "aws_secret_access_key": os.environ["AWS_SECRET_ACCESS_KEY"],
                    "aws_session_token": os.environ.get("AWS_SESSION_TOKEN") or None}
        config = Config(
            region_name=spec.region,
            s3={"addressing_style": "path" if spec.force_path_style else "auto"},
            retries={"max_attempts": request_attempts, "mode": "standard"},  # botocore's backoff per request
            connect_timeout=10, read_timeout=120,
        )
        self.client = boto3.client("s3", endpoint_url=spec.endpoint or None, config=config, **keys)

    # --- helpers -----------------------------------------------------------------------------
    def _retry(self, what: str, fn):
        """Runs fn, retrying transient failures with exponential backoff; maps the final error."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - classified below
                err = classify(exc, what)
                if isinstance(err, ConfigError) or attempt == self.attempts:
                    raise err from exc
                delay = self.backoff * 2 ** (attempt - 1)
                log.warning("%s failed (%s), retrying in %.0fs (%d/%d)", what, err.reason, delay, attempt,
                            self.attempts)
                time.sleep(delay)

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=64 * MB, multipart_chunksize=64 * MB, max_concurrency=4)

    # --- operations --------------------------------------------------------------------------
    def check_access(self, uri: str) -> None:
        """Fails fast (before hours of training) on a missing bucket or rejected credentials."""
        bucket, key = parse_uri(uri)
        self._retry(f"checking s3://{bucket}",
                    lambda: self.client.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1))

    def head_sha256(self, uri: str) -> tuple[str | None, int | None]:
        from botocore.exceptions import ClientError

        bucket, key = parse_uri(uri)

        def head():
            try:
                r = self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None, None
                raise
            return r.get("Metadata", {}).get("sha256"), r.get("ContentLength")

        return self._retry(f"checking {uri}", head)

    def upload_file(self, path: Path, uri: str, content_type: str | None = None) -> Uploaded:
        from boto3.s3.transfer import create_transfer_manager

        bucket, key = parse_uri(uri)
        size = path.stat().st_size
        digest = sha256_file(path)
        have, have_size = self.head_sha256(uri)
        if have == digest and have_size == size:
            log.info("s3: %s is already there (same sha256), not sent again", uri)
            return Uploaded(uri, size, digest, True)
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": digest}}
        if content_type:
            extra["ContentType"] = content_type

        def send():
            with create_transfer_manager(self.client, self._transfer_config()) as manager:
                manager.upload(str(path), bucket, key, extra_args=extra).result()

        t0 = time.monotonic()
        self._retry(f"uploading {path.name} to {uri}", send)
        log.info("s3: uploaded %s (%.1f MB, %.1fs)", uri, size / MB, time.monotonic() - t0)
        return Uploaded(uri, size, digest, False)

    def download_file(self, uri: str, path: Path) -> Path:
        from boto3.s3.transfer import create_transfer_manager

        bucket, key = parse_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")

        def fetch():
            with create_transfer_manager(self.client, self._transfer_config()) as manager:
                manager.download(bucket, key, str(tmp)).result()

        self._retry(f"downloading {uri}", fetch)
        tmp.replace(path)
        return path

    def list_keys(self, uri: str) -> list[str]:
        """Keys under a prefix (full keys, not relative)."""
        bucket, prefix = parse_uri(uri)

        def listing():
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", [])]
            return keys

        return self._retry(f"listing {uri}", listing)

    def download_prefix(self, uri: str, dest: Path) -> list[Path]:
        bucket, prefix = parse_uri(uri)
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        out = []
        for key in self.list_keys(f"s3://{bucket}/{prefix}"):
            rel = key[len(prefix):]
            if rel and not rel.endswith("/"):
                parts = rel.split("/")
                if rel.startswith("/") or ".." in parts:  # a key must not write outside dest
                    raise ConfigError("PathNotAllowed", f"refusing object key outside the prefix: {key!r}")
                out.append(self.download_file(f"s3://{bucket}/{key}", dest.joinpath(*parts)))
        return out
