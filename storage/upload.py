"""Daily upload of finished day files to S3-compatible storage (Cloudflare R2), verified
and resumable.

    {prefix}[/{host}]/{market}/{kind}/YYYY-MM-DD.parquet    one object per day file
    {prefix}[/{host}]/manifests/YYYY-MM-DD.json             uploaded last: the day's commit marker

Only compacted day files are uploaded, never the current day's parts. Each object is sent
with a SHA-256 checksum the server verifies (per part for multipart uploads, every part
but the last of the same size, as R2 requires) and the file's SHA-256 in its metadata;
after the upload, the object's size and the server's own checksum are compared with the
local file. Only a verified file may be deleted locally, and only after `retention_days`.

Idempotent: an object already there with the same SHA-256 is skipped; a day whose
manifest is there and matches is skipped whole. An interrupted run leaves no manifest,
so the next run finishes the day.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import boto3
import pyarrow.compute as pc
import pyarrow.parquet as pq
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from config import UploadSettings
from markets import KINDS
from storage.quality import QUALITY_KIND

log = logging.getLogger(__name__)

_DAY_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.parquet$")
ENV_KEYS = ("R2_ENDPOINT_URL", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "R2_BUCKET_NAME")
VERSION = "0.1.0"


class UploadError(Exception):
    """One line for the operator; never carries a secret."""


@dataclass(frozen=True)
class Credentials:
    endpoint: str
    key_id: str
    secret: str
    bucket: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Credentials":
        missing = [k for k in ENV_KEYS if not env.get(k)]
        if missing:
            raise UploadError(f"upload: missing environment variable(s) {', '.join(missing)} "
                              "(see .env.example; systemd loads them from the env file)")
        return cls(env["R2_ENDPOINT_URL"], env["R2_ACCESS_KEY_ID"], env["R2_SECRET_ACCESS_KEY"], env["R2_BUCKET_NAME"])

    def scrub(self, text: str) -> str:
        for secret in (self.secret, self.key_id):
            if secret:
                text = text.replace(secret, "***")
        return text


def make_client(creds: Credentials, settings: UploadSettings) -> Any:
    kw: dict[str, Any] = {}
    if settings.r2_compat:
        kw.update(request_checksum_calculation="when_required", response_checksum_validation="when_required")
    cfg = BotoConfig(retries={"max_attempts": 8, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                     signature_version="s3v4", **kw)
    return boto3.client("s3", endpoint_url=creds.endpoint, aws_access_key_id=creds.key_id,
                        aws_secret_access_key=creds.secret, region_name="us-east-1", config=cfg)


def s3_filesystem(creds: Credentials) -> Any:
    """The bucket as a pyarrow filesystem, for reading uploaded days in place (merge; a
    `pyarrow.dataset` over `bucket/prefix/...`). Same credentials as the uploads."""
    from urllib.parse import urlsplit

    import pyarrow.fs as pafs

    url = urlsplit(creds.endpoint)
    return pafs.S3FileSystem(access_key=creds.key_id, secret_key=creds.secret, region="us-east-1",
                             endpoint_override=url.netloc, scheme=url.scheme or "https")


def sha256_file(path: Path, part_size: int) -> tuple[str, str]:
    """(hex SHA-256 of the file, the S3 composite SHA-256 for `part_size` parts, base64)."""
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            whole.update(chunk)
            parts.append(hashlib.sha256(chunk).digest())
    if len(parts) <= 1:
        composite = base64.b64encode(whole.digest()).decode()
    else:
        composite = base64.b64encode(hashlib.sha256(b"".join(parts)).digest()).decode()
    return whole.hexdigest(), composite


def day_files(data_dir: Path, today: str) -> dict[str, list[tuple[str, str, Path]]]:
    """Finished day files by day: {day: [(market, kind, path)]}; a day still in parts is not
    finished. Each market's quality record comes after its data files (all before the
    manifest, which names every one)."""
    days: dict[str, list] = {}
    for market_dir in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for kind in (*KINDS, QUALITY_KIND):  # the quality record too: uploaded with the day, before its manifest
            folder = market_dir / kind
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                m = _DAY_FILE.match(f.name)
                if m and m.group(1) < today and not (folder / m.group(1)).exists():
                    days.setdefault(m.group(1), []).append((market_dir.name, kind, f))
    return days


def check_local(path: Path) -> None:
    """Read the whole file with page CRCs verified: a corrupt local file is never uploaded."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        for i in range(pf.metadata.num_row_groups):
            pf.read_row_group(i)
    except (OSError, ValueError) as e:
        raise UploadError(f"upload: local file {path} is corrupt ({str(e)[:120]}); not uploaded, not deleted") from None


def file_summary(path: Path, kind: str) -> dict:
    """Rows, and for diffs the first/last update id per symbol, for the manifest."""
    meta = pq.ParquetFile(path).metadata
    out = {"rows": meta.num_rows}
    if kind == "diff_orderbooks" and meta.num_rows:
        t = pq.read_table(path, columns=["symbol", "final_update_id"])
        g = t.group_by("symbol").aggregate([("final_update_id", "min"), ("final_update_id", "max")])
        out["update_ids"] = {s: [lo, hi] for s, lo, hi in zip(
            g.column("symbol").to_pylist(), g.column("final_update_id_min").to_pylist(),
            g.column("final_update_id_max").to_pylist(), strict=True)}
    if kind == "gaps":
        t = pq.read_table(path, columns=["reason"])
        out["gaps_by_reason"] = {r["values"]: r["counts"] for r in pc.value_counts(t.column("reason")).to_pylist()}
    return out


class Uploader:
    def __init__(self, client: Any, creds: Credentials, settings: UploadSettings, data_dir: Path, config_hash: str,
                 progress: bool = False,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc), shard: str = "1/1"):
        self.s3, self.creds, self.settings, self.data_dir = client, creds, settings, data_dir
        self.bucket, self.config_hash, self.progress, self.now = creds.bucket, config_hash, progress, now
        self.shard = shard  # named in every manifest: which part of the market this host recorded
        self.part_size = settings.part_size_mb << 20
        host = socket.gethostname() if settings.include_hostname else None
        self.base = "/".join(x for x in (settings.prefix.strip("/"), host) if x)
        self.transfer = TransferConfig(multipart_threshold=self.part_size, multipart_chunksize=self.part_size,
                                       max_concurrency=settings.concurrency, use_threads=True)
        self.results: dict[str, Any] = {"uploaded": 0, "skipped": 0, "failed": 0, "deleted": 0, "days_failed": []}

    def key(self, market: str, kind: str, day: str) -> str:
        return f"{self.base}/{market}/{kind}/{day}.parquet"

    def manifest_key(self, day: str) -> str:
        return f"{self.base}/manifests/{day}.json"

    def check_access(self) -> None:
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            raise UploadError(self.creds.scrub(f"upload: cannot reach bucket {self.bucket!r} at "
                                               f"{self.creds.endpoint}: {_why(e)}")) from None

    def abort_stale_multipart(self) -> None:
        """Multipart uploads a killed run left open under our prefix are aborted (they cost
        storage and are never completed: the next run uploads the file again)."""
        resp = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=self.base + "/")
        for up in resp.get("Uploads", []):
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
            log.info("aborted an unfinished multipart upload of %s", up["Key"])

    def run(self, only_day: str | None = None) -> dict:
        self.check_access()
        self.abort_stale_multipart()
        today = self.now().strftime("%Y-%m-%d")
        days = day_files(self.data_dir, today)
        if only_day is not None:
            if only_day not in days:
                raise UploadError(f"upload: no finished day files for {only_day} under {self.data_dir}")
            days = {only_day: days[only_day]}
        for day, files in sorted(days.items()):
            for attempt in range(3):
                try:
                    self.upload_day(day, files)
                    break
                except (ClientError, BotoCoreError, OSError, UploadError) as e:
                    why = self.creds.scrub(_why(e))
                    if attempt == 2:
                        self.results["failed"] += 1
                        self.results["days_failed"].append(day)
                        log.error("upload of day %s failed 3 times: %s; it stays local and is retried next run", day, why)
                    else:
                        log.warning("upload of day %s failed (attempt %d): %s; retrying", day, attempt + 1, why)
                        time.sleep(2 ** attempt)
            self.apply_retention(day, files)
        return self.results

    def upload_day(self, day: str, files: list[tuple[str, str, Path]]) -> None:
        manifest: dict[str, Any] = {"day": day, "collector_version": VERSION, "config_sha256": self.config_hash,
                                    "shard": self.shard, "files": []}
        with ThreadPoolExecutor(max_workers=min(4, self.settings.concurrency)) as pool:
            entries = list(pool.map(lambda f: self.upload_file(day, *f), files))
        manifest["files"] = entries
        manifest["gaps"] = sum(sum(e.get("gaps_by_reason", {}).values()) for e in entries)
        body = json.dumps(manifest, indent=1, sort_keys=True).encode()
        existing = self._get_manifest(day)
        if existing is not None and existing.get("files") == entries:
            return
        self.s3.put_object(Bucket=self.bucket, Key=self.manifest_key(day), Body=body, ContentType="application/json",
                           **self._checksum_args())
        log.info("uploaded day=%s files=%d manifest=%s", day, len(entries), self.manifest_key(day))

    def _get_manifest(self, day: str) -> dict | None:
        try:
            return json.loads(self.s3.get_object(Bucket=self.bucket, Key=self.manifest_key(day))["Body"].read())
        except ClientError as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def _checksum_args(self) -> dict:
        return {"ChecksumAlgorithm": "SHA256"} if self.settings.checksums == "sha256" else {}

    def upload_file(self, day: str, market: str, kind: str, path: Path) -> dict:
        key = self.key(market, kind, day)
        check_local(path)
        sha, composite = sha256_file(path, self.part_size)
        size = path.stat().st_size
        entry = {"key": key, "bytes": size, "sha256": sha, "market": market, "kind": kind, **file_summary(path, kind)}
        if self.verify(key, size, sha, composite, quiet=True):
            self.results["skipped"] += 1
            return entry
        extra = {"Metadata": {"sha256": sha}, **self._checksum_args()}
        callback = _Progress(path.name, size) if self.progress else None
        self.s3.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=self.transfer, Callback=callback)
        if callback:
            callback.done()
        if not self.verify(key, size, sha, composite):
            raise UploadError(f"upload: {key} does not match the local file after upload")
        self.results["uploaded"] += 1
        log.info("uploaded %s bytes=%d sha256=%s", key, size, sha[:16])
        return entry

    def verify(self, key: str, size: int, sha: str, composite: str, quiet: bool = False) -> bool:
        """The object is there with the local file's size and SHA-256 (the server's own
        checksum when it keeps one, else the metadata we sent)."""
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        problems = []
        if head.get("ContentLength") != size:
            problems.append(f"size {head.get('ContentLength')} != {size}")
        if head.get("Metadata", {}).get("sha256") != sha:
            problems.append("sha256 metadata differs")
        server = head.get("ChecksumSHA256")
        if server and server.split("-")[0] != composite:
            problems.append("server checksum differs")
        if problems and not quiet:
            log.error("remote object %s does not match the local file: %s", key, "; ".join(problems))
        elif problems:
            log.warning("remote object %s differs from the local file (%s): uploading it again", key, "; ".join(problems))
        return not problems

    def apply_retention(self, day: str, files: list[tuple[str, str, Path]]) -> None:
        """Delete local day files older than retention_days, and only verified ones."""
        age = (self.now().date() - dt.date.fromisoformat(day)).days
        if self.settings.retention_days <= 0 or age <= self.settings.retention_days:
            return
        if self._get_manifest(day) is None:
            log.warning("day %s is past retention but has no manifest remote; kept", day)
            return
        for market, kind, path in files:
            try:
                check_local(path)
            except UploadError as e:
                log.error("%s", e)
                continue
            sha, composite = sha256_file(path, self.part_size)
            if self.verify(self.key(market, kind, day), path.stat().st_size, sha, composite):
                path.unlink()
                self.results["deleted"] += 1
                log.info("deleted local %s (verified remote, %d days old)", path, age)
            else:
                log.error("kept %s: the remote copy is not verified", path)


class _Progress:
    """A one-line progress bar on stderr, for uploads run by hand in a terminal."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.seen, self.last = name, max(1, total), 0, 0.0

    def __call__(self, n: int) -> None:
        self.seen += n
        now = time.monotonic()
        if now - self.last > 0.2:
            self.last = now
            width = 30
            filled = int(width * self.seen / self.total)
            sys.stderr.write(f"\r{self.name:28.28} [{'#' * filled}{'.' * (width - filled)}] "
                             f"{100 * self.seen / self.total:5.1f}%")
            sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write(f"\r{self.name:28.28} [{'#' * 30}] 100.0%\n")


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _why(e: Exception) -> str:
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return f"{err.get('Code', '?')}: {err.get('Message', '')}".strip()
    if isinstance(e, EndpointConnectionError):
        return "endpoint unreachable"
    return f"{type(e).__name__}: {e}"


def config_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
