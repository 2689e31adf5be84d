"""What the application sees when the sidecar stops, and what a stop claims.

- A graceful stop detaches the FUSE mount lazily. What it reveals must not
  take writes: a read-only guard (tmpfs, mounted by `rewind run` under its
  FUSE mount) answers EROFS, where 3847756 revealed the bare directory and
  let the application write into it, unprotected and hidden again by the
  next start. A restarted sidecar mounts over the same guard.
- Files still open at the shutdown deadline stop taking writes (EIO) before
  the last upload round, so that "stopped cleanly: everything is in the
  store" is true: 3847756 kept acknowledging writes through them after the
  round had counted what to upload, and the next start found them in the
  journal ("journal holds records not yet confirmed stored").
- Only Rewind's own mounts are ever detached: in a pod the mountpoint is
  itself a mount (the emptyDir shared with the application), which
  3847756's stale-mount cleanup detached. A restart after a crash mounts
  over the dead mount instead of detaching it, so that every copy of the
  dead mount (an application container's volume) reaches the new one;
  past a bound on dead layers it detaches them. A live Rewind mount at the
  mountpoint is refused.
"""

from __future__ import annotations

import errno
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

import helpers


stack = helpers.mount_stack


GUARD = ("tmpfs", "rewind-guard")
FUSE = ("fuse", "rewind")
OVER_DEAD = "mounting over the dead mount an earlier run left"
# guard::MAX_DEAD_LAYERS
MAX_DEAD_LAYERS = 8


def open_error(path) -> int | None:
    try:
        with open(path, "w") as f:
            f.write("x")
    except OSError as e:
        return e.errno
    return None


def test_after_a_stop_the_mountpoint_refuses_writes_and_a_restart_takes_over(make_volume):
    vol = make_volume("guard")
    vol.start()
    assert stack(vol.mount) == [GUARD, FUSE]
    (vol.mount / "a.txt").write_text("one")
    vol.stop()

    # Graceful stop: the guard is what the application now reaches.
    assert stack(vol.mount) == [GUARD]
    assert open_error(vol.mount / "b.txt") == errno.EROFS
    assert open_error(vol.mount / "a.txt") == errno.EROFS
    assert sorted(p.name for p in vol.mount.iterdir()) == []
    assert not (vol.source / "b.txt").exists()

    vol.start()
    assert stack(vol.mount) == [GUARD, FUSE], "a restart must mount over the same guard, not a second one"
    assert (vol.mount / "a.txt").read_text() == "one"
    (vol.mount / "c.txt").write_text("two")

    # A crash leaves the dead FUSE mount on top: the application gets
    # ENOTCONN, and the next start mounts over it (the dead layer stays).
    vol.kill9()
    assert open_error(vol.mount / "d.txt") == errno.ENOTCONN
    vol.start()
    assert OVER_DEAD in vol.log()
    assert stack(vol.mount) == [GUARD, FUSE, FUSE]
    assert (vol.mount / "c.txt").read_text() == "two"
    # A stop now reveals the dead layer: ENOTCONN, never the bare directory.
    vol.stop()
    assert stack(vol.mount) == [GUARD, FUSE]
    assert open_error(vol.mount / "e.txt") == errno.ENOTCONN
    assert not (vol.source / "e.txt").exists()


def test_a_volume_mounted_at_the_mountpoint_is_kept(make_volume):
    """The pod's shape: the mountpoint is the emptyDir's own mount."""
    vol = make_volume("bind")
    shared = vol.root / "emptydir"
    shared.mkdir()
    subprocess.run(["mount", "--bind", str(shared), str(vol.mount)], check=True)
    bottom = stack(vol.mount)
    assert len(bottom) == 1
    vol.start()
    assert stack(vol.mount) == bottom + [GUARD, FUSE]
    (vol.mount / "f").write_text("x")
    vol.kill9()
    vol.start()
    assert stack(vol.mount) == bottom + [GUARD, FUSE, FUSE], "the restart detached a mount"
    vol.stop()
    assert stack(vol.mount) == bottom + [GUARD, FUSE]
    assert list(shared.iterdir()) == [], "nothing may land in the shared directory itself"


HOLDER = textwrap.dedent("""
    # Holds its working directory on the mount and answers, for each line
    # "rel NAME" / "abs NAME" / "cd", what reading NAME through the working
    # directory or by the absolute path gives, or changes into it again.
    import os, sys
    top = sys.argv[1]
    os.chdir(top)
    print("ready", flush=True)
    for line in sys.stdin:
        how, _, name = line.strip().partition(" ")
        try:
            if how == "cd":
                os.chdir(top)
                print("ok", flush=True)
                continue
            with open(name if how == "rel" else os.path.join(top, name)) as f:
                print("ok " + f.read(), flush=True)
        except OSError as e:
            print(f"err {e.errno}", flush=True)
""")


def test_a_restart_mounts_over_the_dead_mount_and_its_copies_see_the_new_one(make_volume):
    """The pod's shape: the application's volume is a copy of the FUSE mount
    itself (the container runtime bound it once the mount was live, with
    HostToContainer: a slave), which a detach at the sidecar's path never
    reaches. The restart mounts over the dead mount, and a mount on a dead
    mount propagates to every copy of it: the copy sees the new mount on its
    next lookup. A process holding its working directory on the dead mount
    keeps it until it looks the path up again."""
    vol = make_volume("copies")
    # The mountpoint is a shared mount, as the kubelet's emptyDir is.
    subprocess.run(["mount", "--bind", str(vol.mount), str(vol.mount)], check=True)
    subprocess.run(["mount", "--make-shared", str(vol.mount)], check=True)
    bottom = stack(vol.mount)
    vol.start()
    app = vol.root / "app"
    app.mkdir()
    holder = None
    try:
        subprocess.run(["mount", "--bind", str(vol.mount), str(app)], check=True)
        subprocess.run(["mount", "--make-slave", str(app)], check=True)
        assert stack(app) == [FUSE]
        (app / "a.txt").write_text("one")
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(app)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "ready"

        def ask(line):
            holder.stdin.write(line + "\n")
            holder.stdin.flush()
            return holder.stdout.readline().strip()

        assert ask("rel a.txt") == "ok one"
        vol.kill9()
        assert open_error(app / "b.txt") == errno.ENOTCONN
        assert ask("abs a.txt") == f"err {errno.ENOTCONN}"

        vol.start()
        assert OVER_DEAD in vol.log()
        assert stack(vol.mount) == bottom + [GUARD, FUSE, FUSE]
        assert stack(app) == [FUSE, FUSE], "the new mount did not reach the copy"
        # A new lookup from the root reaches the new mount, in the copy too.
        assert (app / "a.txt").read_text() == "one"
        (app / "c.txt").write_text("two")
        assert (vol.mount / "c.txt").read_text() == "two"
        # The held working directory is the dead mount's root until the
        # process looks the path up again.
        assert ask("rel a.txt") == f"err {errno.ENOTCONN}"
        assert ask("abs a.txt") == "ok one"
        assert ask("cd") == "ok"
        assert ask("rel c.txt") == "ok two"
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        helpers.lazy_unmount(app)
    vol.stop()
    assert (vol.source / "c.txt").read_text() == "two"


def test_dead_layers_are_bounded(make_volume):
    """Each crash leaves one dead layer under the next mount; past
    MAX_DEAD_LAYERS (src/guard.rs) the start detaches them all instead, down
    to the guard."""
    vol = make_volume("layers")
    vol.start()
    for n in range(1, MAX_DEAD_LAYERS + 2):
        (vol.mount / f"{n}.txt").write_text(str(n))
        vol.kill9()
        vol.start()
        if n <= MAX_DEAD_LAYERS:
            assert stack(vol.mount) == [GUARD] + [FUSE] * (n + 1)
        else:
            assert "detaching the dead mounts earlier runs left" in vol.log(), vol.log_tail()
            assert stack(vol.mount) == [GUARD, FUSE]
    assert sorted(p.name for p in vol.mount.iterdir() if p.suffix == ".txt") == \
        sorted(f"{n}.txt" for n in range(1, MAX_DEAD_LAYERS + 2))
    vol.stop()
    assert stack(vol.mount) == [GUARD]


def test_a_live_mount_of_another_daemon_is_refused(make_volume):
    vol = make_volume("live")
    vol.start()
    other = make_volume("other")
    r = helpers.rewind("run", "--source", other.source, "--mount", vol.mount, "--store", other.store_url,
                       "--volume", "other", env=other.env(), timeout=60)
    assert r.code != 0 and "another `rewind run` serves this mountpoint" in r.err, r
    assert stack(vol.mount) == [GUARD, FUSE]
    (vol.mount / "x").write_text("still served")
    vol.stop()
    assert (vol.source / "x").read_text() == "still served"


def test_a_foreign_mount_over_the_guard_is_refused(make_volume):
    vol = make_volume("foreign")
    vol.start()
    vol.stop()
    subprocess.run(["mount", "-t", "tmpfs", "somebody", str(vol.mount)], check=True)
    vol.start(wait_live=False)
    code = vol.proc.wait(60)
    assert code != 0
    assert "unmount what is on top before starting" in vol.log(), vol.log_tail()
    assert stack(vol.mount) == [GUARD, ("tmpfs", "somebody")]


def test_a_start_that_fails_leaves_no_dead_mount(make_volume):
    """The status server's port is taken: the start fails with the reason,
    before it mounts (the mount is never dropped, so a failure after it
    would leave a dead mount over the guard), and nothing sits at the
    mountpoint that a retry would have to clear."""
    import socket
    vol = make_volume("busy")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        vol.start("--listen", f"127.0.0.1:{taken.getsockname()[1]}", wait_live=False)
        assert vol.proc.wait(60) != 0
    finally:
        taken.close()
    assert "cannot serve health and metrics" in vol.log(), vol.log_tail()
    assert FUSE not in stack(vol.mount), stack(vol.mount)
    r = helpers.rewind("run", "--source", vol.source, "--mount", vol.mount, "--store", vol.store_url,
                       "--volume", vol.name, "--timeline-interval", "0s", env=vol.env(), timeout=60)
    assert r.code != 0 and "--timeline-interval must be more than zero" in r.err, r


WRITER = textwrap.dedent("""
    import os, struct, sys, time
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
    end = time.monotonic() + 120
    i = 0
    while time.monotonic() < end:
        try:
            os.pwrite(fd, struct.pack("<Q", i), i * 8)
        except OSError as e:
            print("ERR", e.errno, flush=True)
            sys.exit(0)
        print(i, flush=True)
        i += 1
    print("ERR none", flush=True)
""")


def test_writes_past_the_shutdown_deadline_fail_and_a_clean_stop_stored_every_acknowledged_one(make_volume, tmp_path):
    vol = make_volume("deadline")
    vol.start(shutdown_timeout="2s")
    out = tmp_path / "writer.out"
    with open(out, "w") as f:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(vol.mount / "log.bin")], stdout=f)
    try:
        helpers.wait_until(lambda: len(out.read_text().splitlines()) > 200, 60, "the writer to get going")
        vol.proc.send_signal(signal.SIGTERM)
        # Detached, the path reaches the guard, but the open file is still
        # served until the deadline: writes go on being acknowledged.
        helpers.wait_until(lambda: stack(vol.mount) == [GUARD], 30, "the lazy detach")
        served = len(out.read_text().splitlines())
        helpers.wait_until(lambda: len(out.read_text().splitlines()) > served + 100, 30,
                           "writes through the open file after the detach")
        code = vol.stop(expect=None)
        writer.wait(60)
    finally:
        if writer.poll() is None:
            writer.kill()
    lines = out.read_text().splitlines()
    assert lines[-1].startswith("ERR"), lines[-3:]
    acked = int(lines[-2])
    # EIO from the daemon refusing writes before its last round, not
    # ENOTCONN from a daemon that exited while still acknowledging them.
    assert lines[-1] == f"ERR {errno.EIO}", f"the writer ended with {lines[-1]!r}\n{vol.log_tail()}"
    assert code == 0, vol.log_tail()
    assert "stopped cleanly: everything is in the store" in vol.log()

    target = tmp_path / "restored"
    vol.restore("latest", target)
    data = (target / "log.bin").read_bytes()
    assert len(data) >= 8 * (acked + 1), f"restore holds {len(data) // 8} writes, {acked + 1} were acknowledged"
    bad = [i for i in range(acked + 1) if struct.unpack_from("<Q", data, i * 8)[0] != i]
    assert not bad, f"acknowledged writes missing from the store after a clean stop: {bad[:10]}"

    vol.start()
    assert "not yet confirmed stored" not in vol.log(), vol.log_tail()
    vol.stop()
