"""A full disk under the protected volume (issue 2's "full disks": a clear
error, nothing lost).

The source (and with it the default journal) lives on a small ext4 image on
a loop device, so the disk really fills. The application gets ENOSPC, as it
would natively, never EIO; deleting a file still works, so space can be
freed; writes work again afterwards; and the clean stop and the restore
show exactly what the mount showed.

test_a_full_disk_gives_enospc_and_recovers: the journal needs a new file
while the disk is full, so writers wait until the shipper frees journal space
(an older file, or the current one once everything in it is stored); the
daemon's log says so.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess

import pytest

import helpers


@pytest.fixture
def small_disk_volume(make_volume, workdir):
    """A volume whose source is a 128 MiB ext4 filesystem on a loop device."""
    vol = make_volume()
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(vol.source)], check=True, capture_output=True)
    try:
        os.chmod(vol.source, 0o755)
        yield vol
    finally:
        if vol.alive():
            vol.proc.kill()
            vol.proc.wait()
        subprocess.run(["fusermount3", "-uz", str(vol.mount)], capture_output=True)
        subprocess.run(["umount", str(vol.source)], check=True, capture_output=True)


def test_a_full_disk_gives_enospc_and_recovers(small_disk_volume, workdir):
    vol = small_disk_volume
    vol.start()
    m = vol.mount
    chunk = os.urandom(1 << 20)
    written = 0
    fd = os.open(m / "big", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        with pytest.raises(OSError) as full:
            for _ in range(512):
                os.write(fd, chunk)
                written += len(chunk)
        assert full.value.errno == errno.ENOSPC, f"a full disk must read as ENOSPC, got {full.value!r}"
    finally:
        os.close(fd)
    assert written >= 8 << 20, f"only {written} bytes fit before ENOSPC"

    # Space can be freed through the mount, and writes work again (ext4
    # reuses freed blocks once its own journal commits: sync, as natively).
    os.unlink(m / "big")
    os.sync()
    with open(m / "after", "wb") as f:
        f.write(b"written after the disk was full")
        f.flush()
        os.fsync(f.fileno())
    # Enough to need a second journal file while the disk cannot hold one.
    helpers.fill_random(m / "refill", 28 << 20, random.Random(5))
    assert "journal disk full" in vol.log(), "the test did not make the journal wait for disk space"
    assert "journal space found again" in vol.log()

    # (lost+found comes with the new ext4 filesystem.)
    want = {p.name: p.read_bytes() for p in m.iterdir() if p.is_file()}
    vol.stop()
    target = workdir / "restored"
    vol.restore("latest", target)
    got = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    assert sorted(got) == sorted(want) == ["after", "refill"]
    assert got == want
