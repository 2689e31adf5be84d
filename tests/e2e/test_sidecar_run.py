"""What the injected containers do, with the real binary and a real FUSE
mount: the sidecar's /healthz, /readyz and /metrics while `rewind run`
works, and the restore-at init container's exact command line (taken from
a real webhook's patch) restoring a real store, once.
"""

import base64
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

import jsonpatch
import pytest

import helpers

from webhook_support import (
    FIXTURES,
    REWIND_BIN,
    LoggedProcess,
    Webhook,
    admission_review,
    make_ca,
    make_server_cert,
)

VOLUME = "shop/web-data"  # what the webhook derives for the deployment fixture in namespace "shop"


def poll(what, check, deadline_s=30, interval=0.05):
    """Calls check() until it returns a true value; fails with `what` at the deadline."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _detach_mounts(tmp_path):
    """`rewind run` leaves its read-only guard at the mountpoint on purpose;
    these tests use pytest's own directories, so they take it away."""
    yield
    for mp, _ in helpers.mounts():
        if mp.startswith(f"{tmp_path}/"):
            helpers.lazy_unmount(mp)


def start_run(tmp_path, *extra):
    src, mnt, store = tmp_path / "source", tmp_path / "mnt", tmp_path / "store"
    for d in (src, mnt, store):
        d.mkdir(exist_ok=True)
    run = LoggedProcess(["run", "--source", str(src), "--mount", str(mnt), "--store", f"file://{store}",
                         "--volume", VOLUME, "--segment-interval", "200ms", *extra])
    poll("the mount", lambda: os.path.ismount(mnt) or run.proc.poll() is not None)
    assert run.proc.poll() is None, "\n".join(run.log)
    return run, mnt, store


def ls(store):
    r = subprocess.run([REWIND_BIN, "ls", "--store", f"file://{store}", "--volume", VOLUME, "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def now_rfc3339():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return text, values


def status(addr, path):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_metrics_follow_a_running_sidecar(tmp_path):
    run, mnt, store = start_run(tmp_path, "--listen", "127.0.0.1:0")
    try:
        addr = run.wait_for_log(r"health and metrics on http://([0-9.]+:[0-9]+)", deadline_s=30).group(1)
        poll("/healthz", lambda: status(addr, "/healthz") == 200)
        poll("/readyz", lambda: status(addr, "/readyz") == 200)
        # Ready means mount live and journal writable, not "a base is
        # stored": on a loaded machine the first base completes later, and a
        # write before it is outside the window.
        poll("the first base to open the restore window",
             lambda: "rewind_restore_window_earliest_seconds" in scrape(addr)[1])
        _, m0 = scrape(addr)
        data = os.urandom(1 << 20)  # incompressible: shipped bytes must cover it
        written_at = time.time()
        write(mnt / "blob", data)
        poll("journal bytes to grow by the bytes written",
             lambda: scrape(addr)[1]["rewind_journal_written_bytes_total"] >= m0["rewind_journal_written_bytes_total"] + len(data))
        assert "rewind_journal_bytes" in scrape(addr)[1]
        poll("shipped bytes to follow",
             lambda: scrape(addr)[1]["rewind_shipped_bytes_total"] >= m0["rewind_shipped_bytes_total"] + len(data))
        poll("replication lag back to zero", lambda: scrape(addr)[1]["rewind_replication_lag_seconds"] == 0)
        text, m1 = scrape(addr)
        assert m1["rewind_segments_shipped_total"] > m0["rewind_segments_shipped_total"]
        assert m1["rewind_upload_errors_total"] == 0
        poll("the restore window to cover the write",
             lambda: scrape(addr)[1].get("rewind_restore_window_latest_seconds", 0) >= written_at)
        assert m1["rewind_restore_window_earliest_seconds"] <= written_at
        assert re.search(r'^rewind_lineage_info\{lineage="[^"]+"\} 1$', text, re.M), text
        assert m1["rewind_mount_live"] == 1 and m1["rewind_journal_writable"] == 1
    finally:
        code = run.stop()
    assert code == 0, "\n".join(run.log)


def test_metrics_follow_a_prune_run_elsewhere(tmp_path):
    """Prune runs as its own job; the sidecar reads the store's timeline back
    every --timeline-interval, so that its restore window starts where prune
    left it (not at the first base, long deleted) and each tier's oldest
    point is exported, as `rewind ls` shows them."""
    run, mnt, store = start_run(tmp_path, "--listen", "127.0.0.1:0", "--base-interval", "1s",
                                "--timeline-interval", "500ms")
    try:
        addr = run.wait_for_log(r"health and metrics on http://([0-9.]+:[0-9]+)", deadline_s=30).group(1)
        poll("the first base to open the restore window",
             lambda: "rewind_restore_window_earliest_seconds" in scrape(addr)[1])
        first = scrape(addr)[1]["rewind_restore_window_earliest_seconds"]
        for i in range(4):
            n = len(ls(store)["bases"])
            write(mnt / f"f{i}", os.urandom(4096))
            poll(f"periodic base {i + 1}", lambda: len(ls(store)["bases"]) > n)
        pr = subprocess.run([REWIND_BIN, "prune", "--store", f"file://{store}", "--volume", VOLUME,
                             "--keep-seconds", "1s", "--keep-minutes", "10m", "--grace", "0s"],
                            capture_output=True, text=True)
        assert pr.returncode == 0, pr.stdout + pr.stderr
        listed = ls(store)
        (w,) = listed["windows"]
        assert w["earliest_ns"] / 1e9 > first, f"prune kept the whole window: {w}"
        tiers = [t for t in listed["tiers"] if t["lineage"] == w["lineage"]]
        assert any(t["tier"] == "seconds" for t in tiers), listed["tiers"]
        want = {f'rewind_oldest_restorable_seconds{{tier="{t["tier"]}"}}': t["from_ns"] / 1e9 for t in tiers}

        def follows():
            m = scrape(addr)[1]
            return (abs(m.get("rewind_restore_window_earliest_seconds", 0) - w["earliest_ns"] / 1e9) < 1e-3
                    and all(abs(m.get(k, 0) - v) < 1e-3 for k, v in want.items()))
        poll(f"the metrics to follow the pruned store ({want}, window from {w['earliest']})", follows)
    finally:
        code = run.stop()
    assert code == 0, "\n".join(run.log)


@pytest.fixture(scope="module")
def webhook(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    cert, key = make_server_cert(d, "s", ["localhost"])
    w = Webhook(cert, key, FIXTURES / "config.json", ca)
    yield w
    assert w.stop() == 0


def injected_restore(webhook, at, overwrite=False):
    """The restore init container the webhook injects for the deployment
    fixture (claim web-data in namespace shop) with restore-at AT."""
    pod = json.loads((FIXTURES / "pods" / "deployment.json").read_text())
    pod["metadata"]["annotations"]["rewind.dev/restore-at"] = at
    if overwrite:
        pod["metadata"]["annotations"]["rewind.dev/restore-overwrite"] = "true"
    response = webhook.review(admission_review(pod, "shop"))["response"]
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    (c,) = [c for c in patched["spec"]["initContainers"] if c["name"] == "rewind-restore-data"]
    return c["command"] + c["args"]


def localize(argv, store, target):
    """The container's command line as it would run here: the binary under
    test, the local store instead of S3, and the volume's mount point
    (/rewind/source) at `target`. Everything else is kept verbatim."""
    out = [REWIND_BIN]
    args = argv[1:]
    for i, a in enumerate(args):
        if i > 0 and args[i - 1] == "--store":
            a = f"file://{store}"
        out.append(a.replace("/rewind/source", str(target)))
    return out


def test_restore_at_container_restores_a_real_store_once(tmp_path, webhook):
    run, mnt, store = start_run(tmp_path)
    try:
        poll("the first base", lambda: ls(store)["window"] is not None)
        write(mnt / "a.txt", b"v1")
        at = now_rfc3339()
        write(mnt / "a.txt", b"v2")
        write(mnt / "b.txt", b"after")
    finally:
        code = run.stop()
    assert code == 0, "\n".join(run.log)

    argv = injected_restore(webhook, at)
    target = tmp_path / "volume"
    cmd = localize(argv, store, target)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}\n{r.stderr}"
    assert (target / "a.txt").read_bytes() == b"v1"
    assert not (target / "b.txt").exists()
    marker = cmd[cmd.index("--once-marker") + 1]
    assert os.path.exists(marker) and marker.startswith(str(target / ".rewind"))

    # One-shot: a recreated pod runs the same container again; newer data stays.
    write(target / "a.txt", b"newer")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (target / "a.txt").read_bytes() == b"newer"

    # A volume that already holds data is refused without restore-overwrite ...
    other = tmp_path / "other"
    other.mkdir()
    write(other / "keep.txt", b"x")
    refused = localize(argv, store, other)
    r = subprocess.run(refused, capture_output=True, text=True)
    assert r.returncode != 0
    assert (other / "keep.txt").exists()
    assert not os.path.exists(refused[refused.index("--once-marker") + 1])
    # ... and replaced with it.
    forced = localize(injected_restore(webhook, at, overwrite=True), store, other)
    assert "--force" in forced
    r = subprocess.run(forced, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (other / "a.txt").read_bytes() == b"v1" and not (other / "keep.txt").exists()


def test_sigterm_as_soon_as_the_mount_is_live_stops_cleanly(make_volume):
    """A SIGTERM sent the moment the mount answers (a pod deleted at once, a
    quick test) gets the clean shutdown and exit 0. 3847756 registered its
    handler only after starting its threads, so such a SIGTERM killed it
    (exit -15) about once in ten starts; 30 starts catch that."""
    import signal

    import helpers

    codes = []
    for i in range(30):
        vol = make_volume(f"v{i}")
        vol.start(wait_live=False)
        helpers.wait_until(lambda: helpers.mount_is_live(vol.mount), 60,
                           f"the mount {vol.mount} to go live", interval=0.001)
        vol.proc.send_signal(signal.SIGTERM)
        codes.append(vol.stop(expect=None))
        vol.cleanup()
    assert codes == [0] * 30, f"exit codes after an early SIGTERM: {codes}"
