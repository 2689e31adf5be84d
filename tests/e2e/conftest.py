"""Fixtures for the end-to-end suites.

`workdir` is a fresh directory per test under $REWIND_E2E_TMP (default
<repo>/.test-tmp), kept when the test fails so its logs and store can be
read, removed when it passes. `volume` / `make_volume` give `helpers.Volume`
objects whose daemons are killed and whose mounts are detached (lazily,
`fusermount3 -uz`) at teardown whatever happened.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import helpers

TMP_ROOT = Path(os.environ.get("REWIND_E2E_TMP", helpers.REPO / ".test-tmp"))


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
    # Some operations run as a non-root user (workload.py's "nonroot", the
    # sidecar's permission checks): that user must be able to reach the
    # mounts under TMP_ROOT. A clone under a 0700 directory (mktemp -d) makes
    # every such operation fail with EACCES on both sides, which shows up
    # much later as "workload did not reach the minimum counts".
    for d in [TMP_ROOT, *TMP_ROOT.parents]:
        if d.exists() and d != TMP_ROOT and not os.stat(d).st_mode & 0o001:
            problems.append(f"{d} has mode {os.stat(d).st_mode & 0o777:o}: non-root users cannot reach "
                            f"the test mounts under {TMP_ROOT}; run from a directory others can traverse "
                            f"(chmod o+x {d}) or set REWIND_E2E_TMP to one")
            break
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
