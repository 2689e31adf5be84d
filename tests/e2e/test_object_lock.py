"""S3 Object Lock (issue 15) against a moto server, which enforces retention.

test_every_object_is_locked_and_never_replaced: `rewind run
--object-lock-days 1` (both modes, encrypted and not) on a bucket with
Object Lock enabled and no default retention: every object the sidecar
stored carries the retention (mode and an end about a day away, from the
object's own HEAD), every key has exactly one version and no delete marker
(Rewind never overwrote or deleted anything), deleting a locked version is
refused by the server and leaves it readable, and the volume restores and
verifies.

test_object_lock_needs_s3: --object-lock-days with a file:// store is
refused at start with a message that says why.
"""

from __future__ import annotations

import datetime
import random
import time

import pytest
from botocore.exceptions import ClientError

import helpers
from s3fixtures import bucket, make_s3_volume, s3  # noqa: F401  (fixtures)
from test_encryption import encrypt, write_key


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode,encrypted", [("compliance", False), ("governance", True)])
def test_every_object_is_locked_and_never_replaced(make_s3_volume, s3, workdir, mode, encrypted):
    locked = f"lock-{mode}"
    c = s3.client()
    c.create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    vol = make_s3_volume()
    vol.bucket, vol.store_url = locked, f"s3://{locked}/{vol.prefix}"
    if encrypted:
        encrypt(vol, write_key(workdir / "key", 7))
    rng = random.Random(7)
    helpers.fill_random(vol.source / "base-file", 200_000, rng)
    vol.start("--object-lock-days", "1", "--object-lock-mode", mode)
    vol.wait_window()
    for i in range(3):
        (vol.mount / f"f{i}").write_bytes(rng.randbytes(30_000))
    snap = helpers.snapshot(vol.mount)
    t = time.time_ns()
    (vol.mount / "after").write_text("x")
    vol.wait_latest(t)
    vol.stop()

    keys = vol.keys()
    assert any("/seg/" in k for k in keys) and any("/chunk/" in k for k in keys), keys
    versions = c.list_object_versions(Bucket=locked, Prefix=f"{vol.prefix}/")
    assert not versions.get("DeleteMarkers"), f"Rewind deleted objects: {versions['DeleteMarkers']}"
    per_key: dict[str, list] = {}
    for v in versions["Versions"]:
        per_key.setdefault(v["Key"], []).append(v["VersionId"])
    replaced = {k: v for k, v in per_key.items() if len(v) != 1}
    assert not replaced, f"Rewind overwrote objects: {replaced}"
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=23)
    for k in keys:
        h = c.head_object(Bucket=locked, Key=k)
        assert h.get("ObjectLockMode") == mode.upper(), f"{k}: {h.get('ObjectLockMode')}"
        assert h["ObjectLockRetainUntilDate"] > soon, f"{k} is locked only until {h['ObjectLockRetainUntilDate']}"

    seg = next(k for k in keys if "/seg/" in k)
    with pytest.raises(ClientError) as e:
        c.delete_object(Bucket=locked, Key=seg, VersionId=per_key[seg][0])
    assert e.value.response["Error"]["Code"] == "AccessDenied", e.value.response
    assert c.get_object(Bucket=locked, Key=seg)["Body"].read()

    vol.delete_local()
    vol.restore(t, workdir / "restored")
    helpers.assert_same_tree(snap, helpers.snapshot(workdir / "restored"), "restore from a locked bucket")
    v = vol.verify()
    assert v.code == 0, str(v)


@pytest.mark.timeout(60)
def test_object_lock_needs_s3(make_volume):
    vol = make_volume()
    vol.start("--object-lock-days", "1", wait_live=False)
    code = vol.proc.wait(timeout=30)
    assert code != 0 and "Object Lock retention needs an s3:// store" in vol.log(), vol.log()
    assert not list(vol.store_dir.iterdir()), "the refused run wrote to the store"
