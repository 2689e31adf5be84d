"""Fixtures for the end-to-end suites.

`workdir` is a fresh directory per test under $REWIND_E2E_TMP (default
<repo>/.test-tmp, or a directory under /tmp when non-root users cannot
reach the repository), kept when the test fails so its logs and store can be
read, removed when it passes. `volume` / `make_volume` give `helpers.Volume`
objects whose daemons are killed and whose mounts are detached (lazily,
`fusermount3 -uz`) at teardown whatever happened.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

import helpers

def _blocked_ancestor(path: Path) -> Path | None:
    """The first existing ancestor of path that other users cannot traverse."""
    return next((d for d in path.parents if d.exists() and not os.stat(d).st_mode & 0o001), None)


def _tmp_root() -> Path:
    """Where the tests work: $REWIND_E2E_TMP, else <repo>/.test-tmp, unless
    non-root users cannot reach it (a clone under `mktemp -d`, mode 0700);
    then a directory under the system's temporary directory named after the
    repository. Some operations run as a non-root user (workload.py's
    "nonroot", the sidecar's permission checks) and must reach the mounts."""
    if "REWIND_E2E_TMP" in os.environ:
        return Path(os.environ["REWIND_E2E_TMP"])
    root = helpers.REPO / ".test-tmp"
    if _blocked_ancestor(root) is None:
        return root
    tag = hashlib.sha256(str(helpers.REPO).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"rewind-e2e-{tag}"


TMP_ROOT = _tmp_root()


def pytest_sessionstart(session):
    problems = []
    if not os.path.exists(helpers.REWIND_BIN):
        problems.append(f"no rewind binary at {helpers.REWIND_BIN} (build with cargo build --release or set REWIND_BIN)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if os.geteuid() != 0:
        problems.append("the e2e suites run as root (FUSE mounts, chown, setpriv)")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is missing (Debian package fuse3)")
    # A REWIND_E2E_TMP that non-root users cannot reach would make every
    # non-root operation fail with EACCES on both sides of the differential
    # tests, which shows up much later as "did not reach the minimum counts".
    blocked = _blocked_ancestor(TMP_ROOT)
    if blocked is not None:
        problems.append(f"{blocked} has mode {os.stat(blocked).st_mode & 0o777:o}: non-root users cannot "
                        f"reach the test mounts under {TMP_ROOT}; set REWIND_E2E_TMP to a directory "
                        f"others can traverse (or chmod o+x {blocked})")
    session.config._rewind_problems = problems




@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def workdir(request):
    # Fail loudly (never skip) when the machine cannot run the mount suites.
    problems = request.config._rewind_problems
    if problems:
        pytest.fail("cannot run the e2e suites: " + "; ".join(problems), pytrace=False)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid.split("::", 1)[-1])[:80]
    d = TMP_ROOT / name
    if d.exists():
        helpers.rmtree(d)
    d.mkdir(parents=True)
    os.chmod(TMP_ROOT, 0o755)
    os.chmod(d, 0o755)
    yield d
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed and not os.environ.get("REWIND_E2E_KEEP"):
        helpers.rmtree(d)


@pytest.fixture
def make_volume(workdir):
    made = []

    def make(sub: str = "v", **kw) -> helpers.Volume:
        v = helpers.Volume(workdir / sub, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.cleanup()


@pytest.fixture
def volume(make_volume) -> helpers.Volume:
    return make_volume()
