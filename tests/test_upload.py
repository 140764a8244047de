"""Uploads against a real S3-compatible server (moto's, on 127.0.0.1), read back."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import subprocess
import sys
import threading

import boto3
import pyarrow as pa
import pytest
import requests
from moto.server import ThreadedMotoServer

import config
from storage import upload
from storage.files import write_table_atomic
from storage.schemas import SCHEMAS
from tests.helpers import ROOT

# `collector.py upload` in a subprocess reads the machine's clock: the days it uploads are
# derived from that clock, so that they are finished days whatever the date. Retention, which
# compares a day's age with that clock, is tested in-process with an injected clock.
TODAY = dt.datetime.now(dt.timezone.utc).date()


def days_ago(n: int, today: dt.date = TODAY) -> str:
    return (today - dt.timedelta(days=n)).isoformat()


BUCKET = "test-orderbooks"
SECRET = "s3cr3t-VALUE-never-logged"
KEY_ID = "AKIDTESTKEYID0001"


@pytest.fixture
def s3():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    requests.post(f"{endpoint}/moto-api/reset", timeout=10)  # its storage is per process: start empty
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"server": server, "endpoint": endpoint, "client": client, "port": port}
    server.stop()


def env_for(s3, **over):
    env = {**os.environ, "R2_ENDPOINT_URL": s3["endpoint"], "R2_ACCESS_KEY_ID": KEY_ID,
           "R2_SECRET_ACCESS_KEY": SECRET, "R2_BUCKET_NAME": BUCKET, **over}
    env.pop("JOURNAL_STREAM", None)
    return env


def day_table(rows: int, seed: int) -> pa.Table:
    rng = random.Random(seed)
    n = rows
    return pa.table({
        "received_time": list(range(n)), "event_time": [1] * n, "symbol": [rng.choice("AB") + "USDT" for _ in range(n)],
        "first_update_id": list(range(n)), "final_update_id": list(range(n)), "prev_final_update_id": [None] * n,
        "transaction_time": [None] * n,
        "bid_prices": [[rng.random() for _ in range(8)] for _ in range(n)], "bid_sizes": [[1.0]] * n,
        "ask_prices": [[rng.random()] for _ in range(n)], "ask_sizes": [[2.0]] * n,
    }, schema=SCHEMAS["diff_orderbooks"])


def make_data(tmp_path, days=(days_ago(9), days_ago(8)), rows=2000, retention_days=0):
    data = tmp_path / "data"
    files = []
    for i, day in enumerate(days):
        for market in ("spot", "futures"):
            f = data / market / "diff_orderbooks" / f"{day}.parquet"
            write_table_atomic(f, day_table(rows, seed=i), 3)
            files.append(f)
    # the current day's parts are never uploaded
    write_table_atomic(data / "spot" / "diff_orderbooks" / "2099-01-01" / "part-1.parquet", day_table(5, 9), 3)
    cfg = tmp_path / "config.ini"
    cfg.write_text("[collector]\ndata_dir = data\n[upload]\nenabled = true\nprefix = ob\npart_size_mb = 5\n"
                   f"retention_days = {retention_days}\n[futures]\nsymbols = BTCUSDT\n")
    return cfg, files


def run_upload(cfg, env, *args):
    return subprocess.run([sys.executable, str(ROOT / "collector.py"), "upload", "--config", str(cfg), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_objects_land_under_the_right_keys_with_the_right_bytes_and_rerun_uploads_nothing(tmp_path, s3):
    cfg, files = make_data(tmp_path)
    day = days_ago(9)
    first = run_upload(cfg, env_for(s3))
    assert first.returncode == 0, first.stderr
    c = s3["client"]
    for f in files:
        market, day = f.parts[-3], f.stem
        body = c.get_object(Bucket=BUCKET, Key=f"ob/{market}/diff_orderbooks/{day}.parquet")["Body"].read()
        assert body == f.read_bytes()
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=BUCKET)["Contents"])
    assert not any("2099-01-01" in k for k in keys)
    manifest = json.loads(c.get_object(Bucket=BUCKET, Key=f"ob/manifests/{day}.json")["Body"].read())
    entry = next(e for e in manifest["files"] if e["key"] == f"ob/spot/diff_orderbooks/{day}.parquet")
    spot = tmp_path / f"data/spot/diff_orderbooks/{day}.parquet"
    assert entry["sha256"] == hashlib.sha256(spot.read_bytes()).hexdigest()
    assert entry["bytes"] == spot.stat().st_size and entry["rows"] == 2000
    assert set(entry["update_ids"]) == {"AUSDT", "BUSDT"}
    assert manifest["config_sha256"] == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert "uploaded=4 skipped=0" in first.stderr
    second = run_upload(cfg, env_for(s3))
    assert second.returncode == 0 and "uploaded=0 skipped=4" in second.stderr
    assert SECRET not in first.stderr + second.stderr and KEY_ID not in first.stderr + second.stderr


def test_multipart_upload_interrupted_by_the_server_stopping_completes_next_run(tmp_path, s3):
    day = days_ago(9)
    cfg_path, _ = make_data(tmp_path, days=(day,))
    big = tmp_path / f"data/spot/diff_orderbooks/{day}.parquet"
    write_table_atomic(big, day_table(200_000, seed=3), 1)  # random doubles: 3+ parts of 5 MiB
    assert big.stat().st_size > 10 << 20
    cfg = config.load(cfg_path)
    creds = upload.Credentials(s3["endpoint"], KEY_ID, SECRET, BUCKET)
    settings = config.UploadSettings(**{**cfg.upload.__dict__, "concurrency": 1})
    stopped = threading.Event()

    class StopMidway(upload.Uploader):
        def upload_file(self, day, market, kind, path):
            if path == big and not stopped.is_set():
                original = self.s3.upload_part

                def upload_part(**kw):
                    if kw["PartNumber"] >= 2 and not stopped.is_set():
                        stopped.set()
                        s3["server"].stop()  # the server goes away mid-upload
                    return original(**kw)
                self.s3.upload_part = upload_part
            return super().upload_file(day, market, kind, path)

    client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                          region_name="us-east-1", config=boto3.session.Config(retries={"max_attempts": 1}))
    first = StopMidway(client, creds, settings, cfg.collector.data_dir, "x").run()
    assert stopped.is_set() and first["days_failed"] == [day]
    # same port, same (in-process) storage: the server is back
    s3["server"] = ThreadedMotoServer(ip_address="127.0.0.1", port=s3["port"], verbose=False)
    s3["server"].start()
    c = s3["client"]
    assert c.list_objects_v2(Bucket=BUCKET, Prefix="ob/manifests/").get("KeyCount", 0) == 0  # day not committed
    second = run_upload(cfg_path, env_for(s3))
    assert second.returncode == 0, second.stderr
    body = c.get_object(Bucket=BUCKET, Key=f"ob/spot/diff_orderbooks/{day}.parquet")["Body"].read()
    assert body == big.read_bytes()
    assert c.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []
    assert c.get_object(Bucket=BUCKET, Key=f"ob/manifests/{day}.json")["ContentLength"] > 0


def test_mismatched_remote_is_detected_and_replaced_corrupt_local_is_kept(tmp_path, s3):
    day = days_ago(24)  # by the machine's clock, which the subprocess reads: 23 to 24 days old
    cfg, files = make_data(tmp_path, days=(day,))
    assert run_upload(cfg, env_for(s3)).returncode == 0
    cfg.write_text(cfg.read_text().replace("retention_days = 0", "retention_days = 3"))
    c = s3["client"]
    # someone overwrote the remote object: detected, uploaded again, and then verified
    c.put_object(Bucket=BUCKET, Key=f"ob/futures/diff_orderbooks/{day}.parquet", Body=b"not it")
    # the local spot file rots on disk: detected, not uploaded, not deleted (retention would allow it)
    spot = tmp_path / f"data/spot/diff_orderbooks/{day}.parquet"
    good = spot.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0xFF
    spot.write_bytes(bytes(raw))
    futures = tmp_path / f"data/futures/diff_orderbooks/{day}.parquet"
    futures_bytes = futures.read_bytes()
    result = run_upload(cfg, env_for(s3))
    assert result.returncode == 1
    assert "is corrupt" in result.stderr and "not uploaded, not deleted" in result.stderr
    assert spot.exists()
    body = c.get_object(Bucket=BUCKET, Key=f"ob/futures/diff_orderbooks/{day}.parquet")["Body"].read()
    assert body == futures_bytes
    # the good spot object stayed as it was: the rotten local file did not replace it
    assert c.get_object(Bucket=BUCKET, Key=f"ob/spot/diff_orderbooks/{day}.parquet")["Body"].read() == good
    # and the futures file, once its new upload verified, fell to retention (over 20 days > 3)
    assert not futures.exists()


def test_retention_deletes_only_verified_files_past_the_period(tmp_path, s3, caplog):
    # the uploader's clock is injected: the ages are exact whatever the machine's date
    now = dt.datetime(2031, 3, 10, 0, 0, 5, tzinfo=dt.timezone.utc)  # just after midnight: the edge
    old, edge = days_ago(4, now.date()), days_ago(3, now.date())
    cfg_path, files = make_data(tmp_path, days=(old, edge), retention_days=3)
    cfg = config.load(cfg_path)
    client = boto3.client("s3", endpoint_url=s3["endpoint"], aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                          region_name="us-east-1")
    uploader = upload.Uploader(client, upload.Credentials(s3["endpoint"], KEY_ID, SECRET, BUCKET), cfg.upload,
                               cfg.collector.data_dir, "x", now=lambda: now)
    with caplog.at_level("INFO", logger="storage.upload"):
        results = uploader.run()
    assert results["uploaded"] == 4 and results["days_failed"] == []
    assert all(not f.exists() for f in files if old in f.name)  # 4 days old > 3, verified remote: deleted
    assert all(f.exists() for f in files if edge in f.name)     # 3 days old: within retention_days, kept
    assert results["deleted"] == 2 and "deleted local" in caplog.text


def test_wrong_credentials_one_clear_line_and_no_secret(tmp_path, s3):
    cfg, _ = make_data(tmp_path, days=(days_ago(9),))
    from moto import settings as moto_settings
    moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # the server now checks credentials
    try:
        result = run_upload(cfg, env_for(s3, R2_SECRET_ACCESS_KEY="wrong-" + SECRET))
    finally:
        moto_settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"cannot reach bucket '{BUCKET}'" in errors[0], result.stderr
    assert SECRET not in result.stderr and KEY_ID not in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_environment_is_a_config_error(tmp_path, s3):
    cfg, _ = make_data(tmp_path, days=(days_ago(9),))
    env = env_for(s3)
    del env["R2_BUCKET_NAME"]
    result = run_upload(cfg, env)
    assert result.returncode == 2 and "missing environment variable(s) R2_BUCKET_NAME" in result.stderr


def test_the_quality_record_goes_up_with_its_day_and_before_the_manifest(tmp_path, s3):
    """A day's quality record is uploaded with it and named in its manifest; a record that
    cannot go up (corrupt on disk) keeps the day's manifest from being written: the
    manifest, the day's commit marker, only ever follows its quality record."""
    from storage.quality import quality_file, write_day_quality

    cfg, _ = make_data(tmp_path)
    data, late, early = tmp_path / "data", days_ago(8), days_ago(9)
    for day in (early, late):
        for market in ("spot", "futures"):
            write_day_quality(data / market, day, market == "futures", 3)
    good = quality_file(data / "spot", early).read_bytes()
    quality_file(data / "spot", early).write_bytes(b"PAR1 not a parquet file")
    first = run_upload(cfg, env_for(s3))
    assert first.returncode != 0
    c = s3["client"]
    keys = {o["Key"] for o in c.list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert f"ob/manifests/{early}.json" not in keys and f"ob/spot/quality/{early}.parquet" not in keys
    manifest = json.loads(c.get_object(Bucket=BUCKET, Key=f"ob/manifests/{late}.json")["Body"].read())
    named = {e["key"]: e for e in manifest["files"]}
    for market in ("spot", "futures"):
        entry = named[f"ob/{market}/quality/{late}.parquet"]
        local = quality_file(data / market, late)
        assert entry["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest() and entry["rows"] == 2  # AUSDT, BUSDT
    quality_file(data / "spot", early).write_bytes(good)
    second = run_upload(cfg, env_for(s3))
    assert second.returncode == 0, second.stderr
    manifest = json.loads(c.get_object(Bucket=BUCKET, Key=f"ob/manifests/{early}.json")["Body"].read())
    assert {f"ob/spot/quality/{early}.parquet", f"ob/futures/quality/{early}.parquet"} <= {e["key"] for e in manifest["files"]}
    assert c.get_object(Bucket=BUCKET, Key=f"ob/spot/quality/{early}.parquet")["Body"].read() == good
