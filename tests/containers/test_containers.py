"""The image built from sidecar/Dockerfile, in real containers wired the way
the webhook's patch wires a pod (conftest.py says how): the webhook serving
HTTPS with its readiness; the sidecar and an application container sharing
the protected volume through mount propagation, SQLite written under load
and restored exactly from the store; kill -9 of the sidecar (the
application sees ENOTCONN, never the bare directory), then a restart of the
same container and a fresh container over the same directories, whose new
mount goes over the dead one and reaches the application container still
running, which goes on writing; a graceful stop (exit code and log tell
the truth, the running application sees EIO then ENOTCONN, a container
started meanwhile sees the guard's EROFS and then the restarted sidecar's
mount); the restore-at init container before the application. Where a pod
does not behave as docs/SEMANTICS.md promises for a process on the host
(after a graceful stop, a restarted sidecar's mount does not reach an
application container that was running before the stop), the test pins
what happens and says so (docs/KUBERNETES.md, "When the sidecar
restarts").
"""

import errno
import os
import sqlite3
from datetime import datetime, timezone

import pytest

import helpers
from conftest import (
    APP_IMAGE,
    IMAGE,
    LABEL,
    STORE_IN_CONTAINER,
    Pod,
    events,
    https,
    logs,
    podman,
    run_argv,
    state,
)

pytestmark = pytest.mark.timeout(900)

CLEAN_STOP = "stopped cleanly: everything is in the store"
UNSTORED_AT_START = "journal holds records not yet confirmed stored"
REPAIR = "the previous run did not stop cleanly: taking a repair base"
OVER_DEAD = "mounting over the dead mount an earlier run left"
GUARD = ("tmpfs", "rewind-guard")
FUSE = ("fuse", "rewind")


def volume_id(pod):
    args = pod.sidecar["args"]
    return args[args.index("--volume") + 1]


def restore(pod, target, at="latest"):
    """`rewind restore` run from the image against the pod's store."""
    target.mkdir()
    r = podman("run", "--rm", "--label", LABEL, "-v", f"{pod.vol.store}:{STORE_IN_CONTAINER}:ro",
               "-v", f"{target}:/target", IMAGE, "restore", "--store", f"file://{STORE_IN_CONTAINER}",
               "--volume", volume_id(pod), "--at", at, "--target", "/target", check=False, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return target


def rows(db):
    # immutable: a WAL database opened even read-only would grow -wal and
    # -shm files beside it, and the restore would no longer equal the claim.
    con = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")]
    finally:
        con.close()


def assert_same_as_source(pod, target):
    """The restore equals the claim's directory as the mount showed it
    (Rewind's own .rewind directory is not part of the volume)."""
    helpers.assert_same_tree(helpers.snapshot(pod.host_volumes["data"], skip_top=(".rewind",)),
                             helpers.snapshot(target, skip_top=(".rewind",)), "restore against the claim")


def assert_bare_dir_untouched(pod):
    """Nothing was ever written into the emptyDir underneath the mounts: the
    pod's mounts are detached and the directory holds only the empty view
    directory the sidecar made."""
    pod.vol.detach()
    assert os.listdir(pod.bare_dir) == [pod.view_dir.name], f"writes landed in the bare directory: {os.listdir(pod.bare_dir)}"
    assert os.listdir(pod.view_dir) == [], f"writes landed in the bare directory: {os.listdir(pod.view_dir)}"


def stop_app(pod):
    code, log = pod.stop(pod.app_name)
    assert code == 0, log
    assert events(pod.app_name)[-1].get("stopped"), log


def stop_sidecar_cleanly(pod):
    code, log = pod.stop(pod.sidecar_name)
    assert code == 0, f"the sidecar's exit code after SIGTERM:\n{log}"
    assert CLEAN_STOP in log, log


def test_webhook_image_serves_https_with_readiness(webhook, patch_pod):
    # The readiness probe of the Deployment passed before the fixture
    # returned; the liveness endpoint answers as well.
    status, _ = https(webhook, "GET", "/healthz")
    assert status == 200
    user = podman("inspect", "--format", "{{.Config.User}}", webhook.name).stdout.strip()
    assert user == "65532:65532"
    patched = patch_pod()
    sidecar = next(c for c in patched["spec"]["initContainers"] if c.get("restartPolicy") == "Always")
    assert sidecar["image"] == IMAGE
    assert sidecar["securityContext"]["privileged"] is True
    (app,) = patched["spec"]["containers"]
    assert {m["name"]: m.get("mountPropagation") for m in app["volumeMounts"]}["rewind-data"] == "HostToContainer"


def test_sidecar_and_app_share_the_volume_and_the_store_gives_it_back(patch_pod, volumes, workdir):
    pod = Pod(patch_pod(), "share", volumes, volumes.dir("claim"))
    pod.start_sidecar()
    pod.start_app()
    pod.wait_commits(300)
    stop_app(pod)
    committed = pod.committed()
    stop_sidecar_cleanly(pod)
    assert probes(pod) == [], events(pod.app_name)

    target = restore(pod, workdir / "restored")
    assert_same_as_source(pod, target)
    assert rows(target / "app.db") == committed
    assert_bare_dir_untouched(pod)


def kill_sidecar(pod):
    podman("kill", "--signal", "KILL", pod.sidecar_name)
    helpers.wait_until(lambda: state(pod.sidecar_name)[0] == "exited", 60, "the killed sidecar to exit", interval=0.1)


def probes(pod, name=None):
    """The errno of every failed-write probe an application container made,
    in order."""
    return [e["probe"] for e in events(name or pod.app_name) if "error" in e]


def wait_probe_errno(pod, want, episodes=1, name=None):
    """Waits until the application has met `episodes` failures whose probe
    saw `want`."""
    name = name or pod.app_name
    helpers.wait_until(lambda: probes(pod, name).count(want) >= episodes, 60,
                       f"{episodes} failures with {errno.errorcode[want]} in {name}", interval=0.1,
                       on_timeout=lambda: f"events: {events(name)[-5:]}")


def path_errno(container, path):
    """The errno a stat of path meets inside a running container, 0 when it works."""
    r = podman("exec", container, "python3", "-c",
               "import os, sys\ntry:\n os.stat(sys.argv[1]); print(0)\nexcept OSError as e:\n print(e.errno)",
               path)
    return int(r.stdout)


def host_stat_errno(path):
    try:
        os.stat(path)
        return 0
    except OSError as e:
        return e.errno


def started_at(name):
    return podman("inspect", "--format", "{{.State.StartedAt}}", name).stdout.strip()


def host_stack(path):
    """(fs type, source) of every mount at a host path, bottom first."""
    return [tuple(m) for m in helpers.mount_stack(path)]


def test_kill_restart_and_fresh_container_over_the_same_directories(patch_pod, volumes, workdir):
    pod = Pod(patch_pod(), "kill", volumes, volumes.dir("claim"))
    pod.start_sidecar()
    pod.start_app()
    pod.wait_commits(100)
    assert host_stack(pod.view_dir) == [GUARD, FUSE]
    started = started_at(pod.app_name)

    for episode, fresh in ((1, False), (2, True)):
        kill_sidecar(pod)
        # The dead mount stays on top: every access fails with ENOTCONN,
        # never a write into the directory beneath.
        wait_probe_errno(pod, errno.ENOTCONN, episode)
        before = len(pod.committed())
        # Once the kernel's cached attributes of the dead mount's root have
        # expired, a stat of it fails. The runtime's bind source for the
        # sidecar is the emptyDir's root, beside the dead mount, not under
        # it, so the same container restarts and a fresh one is created.
        helpers.wait_until(lambda: host_stat_errno(pod.view_dir) == errno.ENOTCONN, 60,
                           "the dead mount's cached attributes to expire", interval=0.1)
        assert host_stat_errno(pod.bare_dir) == 0
        # An application container created now cannot be: its bind source
        # is the dead mount (the kubelet would retry it).
        late = f"{pod.name}-late{episode}"
        r = podman("run", "-d", *run_argv(pod.app_spec, late, pod.name, pod.host_volumes, image=APP_IMAGE,
                                          command=["true"]), check=False)
        assert r.returncode != 0 and "transport endpoint is not connected" in r.stderr, r.stderr
        pod.start_sidecar(fresh=fresh)
        log = logs(pod.sidecar_name).split(CLEAN_STOP)[-1]
        assert REPAIR in log and OVER_DEAD in log, log
        # The new mount went over the dead one and reached the application
        # container, which was not restarted: it reopens its database by
        # path and goes on.
        assert host_stack(pod.view_dir) == [GUARD] + [FUSE] * (episode + 1)
        assert state(pod.app_name)[0] == "running"
        pod.wait_commits(before + 100)
        assert path_errno(pod.app_name, pod.app_dir) == 0
    assert started_at(pod.app_name) == started, "the application container was restarted"

    stop_app(pod)
    committed = pod.committed()
    stop_sidecar_cleanly(pod)
    assert set(probes(pod)) == {errno.ENOTCONN}, events(pod.app_name)

    target = restore(pod, workdir / "restored")
    assert_same_as_source(pod, target)
    got = rows(target / "app.db")
    assert set(committed) <= set(got), sorted(set(committed) - set(got))[:20]
    # A commit in flight at the kill may have reached the journal without
    # the application hearing back: at most one such row per kill.
    assert len(set(got) - set(committed)) <= 2, sorted(set(got) - set(committed))
    assert_bare_dir_untouched(pod)


def test_graceful_stop_is_true_and_the_guard_refuses_writes(patch_pod, volumes, workdir):
    pod = Pod(patch_pod(), "stop", volumes, volumes.dir("claim"))
    pod.start_sidecar()
    pod.start_app()
    pod.wait_commits(100)

    # The application keeps its database open and writing: the sidecar
    # serves it until --shutdown-timeout, then refuses its writes with EIO
    # before the last upload round, and says so truthfully.
    stop_sidecar_cleanly(pod)
    assert "files still open at the shutdown deadline" in logs(pod.sidecar_name)
    # The running application's volume is a bind of the FUSE mount itself:
    # it meets EIO, then ENOTCONN once the sidecar has exited. Never a write
    # into the bare directory.
    wait_probe_errno(pod, errno.ENOTCONN)
    assert set(probes(pod)) <= {errno.EIO, errno.ENOTCONN}, events(pod.app_name)
    # On the node the guard is what is left at the emptyDir: an application
    # container started now meets EROFS.
    assert host_stack(pod.view_dir) == [GUARD]
    late = f"{pod.name}-late"
    pod.start_app(name=late, db="late.db")
    wait_probe_errno(pod, errno.EROFS, name=late)

    pod.start_sidecar()
    log = logs(pod.sidecar_name).split(CLEAN_STOP)[-1]
    assert UNSTORED_AT_START not in log and REPAIR not in log and OVER_DEAD not in log, log
    # The late container's volume is a bind of the guard: the new mount
    # propagates into it and it goes on by itself.
    pod.wait_commits(50, name=late)
    # The first one's volume is a copy of the FUSE mount the stop detached
    # (not a copy of the guard beneath it): nothing was mounted over it, so
    # it stays on ENOTCONN until its container restarts (docs/KUBERNETES.md,
    # "When the sidecar restarts").
    before = len(pod.committed())
    assert path_errno(pod.app_name, pod.app_dir) == errno.ENOTCONN
    pod.restart_app()
    pod.wait_commits(before + 100)

    stop_app(pod)
    code, log = pod.stop(late)
    assert code == 0, log
    committed, late_committed = pod.committed(), pod.committed(late)
    stop_sidecar_cleanly(pod)
    assert 0 not in probes(pod) and set(probes(pod, late)) == {errno.EROFS}, (events(pod.app_name), events(late))

    target = restore(pod, workdir / "restored")
    assert_same_as_source(pod, target)
    got = rows(target / "app.db")
    assert set(committed) <= set(got), sorted(set(committed) - set(got))[:20]
    # The commit refused with EIO may have written its pages before the
    # refusal: at most that one row is in the store without an answer.
    assert len(set(got) - set(committed)) <= 1, sorted(set(got) - set(committed))
    assert rows(target / "late.db") == late_committed
    assert_bare_dir_untouched(pod)


def now_rfc3339():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_restore_at_init_container_runs_before_the_application(patch_pod, volumes):
    first = Pod(patch_pod(), "first", volumes, volumes.dir("claim"))
    first.start_sidecar()
    first.start_app()
    first.wait_commits(100)
    stop_app(first)
    at_t = first.committed()
    at = now_rfc3339()
    first.start_app()
    first.wait_commits(50)
    stop_app(first)
    stop_sidecar_cleanly(first)

    # A new pod on a new, empty claim, annotated to start from `at`.
    claim = volumes.dir("claim-restored")
    second = Pod(patch_pod({"rewind.dev/restore-at": at}), "second", volumes, claim)
    assert [c["name"] for c in second.init][:1] == ["rewind-restore-data"]
    code, log = second.run_init(second.init[0])
    assert code == 0, log
    markers = os.listdir(claim / ".rewind")
    assert any(m.startswith("restored-at-") for m in markers), markers
    second.start_sidecar()
    seen = second.start_app(check=True)
    assert seen["integrity"] == "ok" and seen["bad"] == []
    assert seen["rows"] == at_t

    # The pod recreated: the same init container runs again and, finding
    # its marker, leaves the volume alone.
    second.start_app()
    second.wait_commits(20)
    stop_app(second)
    stop_sidecar_cleanly(second)
    after = rows(claim / "app.db")
    code, log = second.run_init(second.init[0])
    assert code == 0, log
    assert rows(claim / "app.db") == after
