"""Fixtures for the container suite: podman, the image that
tests/containers/setup.sh built, the webhook running in that image, and the
pods the webhook patches, run as podman containers wired the way the patch
says (mounts, propagation, privilege, user, command line, probes).

The suite takes the wiring from the webhook's own patch, never from a hand
copy: `webhook` runs the image's `rewind webhook` with the Deployment's
command line from manifests/base/deployment.yaml, and `patched_pod` sends it
an AdmissionReview for the deployment fixture and applies the JSON Patch it
returns. What is changed on the way is only what a single host needs
instead of a cluster, each in one place here: the store (`--store` becomes
a `file://` directory mounted at /rewind/store, as no S3 endpoint is
running), volumes (a host directory per pod volume; the emptyDir's parent is
made a shared mount, as the kubelet's is), the application's image and
command (tests/containers/app.py instead of nginx), and secrets that are
optional and absent in the fixture (`envFrom` an optional Secret).

Nothing here sleeps for a fixed time: every wait polls a condition until a
deadline. Teardown removes the containers and detaches the mounts whatever
happened.
"""

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import jsonpatch
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import helpers  # noqa: E402
from webhook_support import FIXTURES, admission_review, make_ca, make_server_cert  # noqa: E402

STATE = Path(os.environ.get("REWIND_CONTAINERS_STATE", "/var/tmp/rewind-containers"))
os.environ["CONTAINERS_CONF"] = str(STATE / "containers.conf")
IMAGE = os.environ.get("REWIND_IMAGE", "localhost/rewind:test")
APP_IMAGE = "localhost/rewind-test-app"
# Every container of the suite carries this label, so teardown finds what a
# failed test left behind.
LABEL = "rewind-container-suite=1"
STORE_IN_CONTAINER = "/rewind/store"
# The sidecar's stop deadline for open files, lowered from the fixture's 30 s
# so that a stop with the application still writing ends soon.
SHUTDOWN_TIMEOUT_S = 5


def podman(*args, check=True, timeout=300, input=None):
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, input=input)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def logs(name):
    r = podman("logs", name, check=False)
    return r.stdout + r.stderr


def events(name):
    """The JSON lines an app.py container printed, in order."""
    out = []
    for line in podman("logs", name, check=False).stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def state(name):
    r = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, check=False)
    if r.returncode != 0:
        return None, None
    status, code = r.stdout.split()
    return status, int(code)


def ip_of(name):
    return podman("inspect", "--format", "{{.NetworkSettings.IPAddress}}", name).stdout.strip()


def http_probe(name, spec, probe, ca=None):
    """One run of a Kubernetes httpGet probe from the container spec against
    the container: True for a status from 200 to 399, as the kubelet counts.
    A named port is looked up in the container's ports."""
    get = spec[probe]["httpGet"]
    port = get["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in spec["ports"] if p.get("name") == port]
    ip = ip_of(name)
    if not ip:
        return False
    scheme = get.get("scheme", "HTTP").lower()
    ctx = None
    if scheme == "https":
        # The kubelet does not verify; the suite does, against its own CA,
        # for the name the API server dials.
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
    try:
        with urllib.request.urlopen(f"{scheme}://{ip}:{port}{get['path']}", timeout=2, context=ctx) as r:
            return 200 <= r.status < 400
    except urllib.error.HTTPError as e:
        return 200 <= e.code < 400
    except OSError:
        return False


# --- volumes ----------------------------------------------------------------

# The suite's own directory, not pytest's shared /tmp/pytest-of-root, whose
# old entries other pytest sessions on the machine remove while they run:
# here they hold live mounts and the stores.
def _tmp_root():
    """$REWIND_CONTAINERS_TMP, else <repo>/.test-tmp/containers, unless an
    ancestor is closed to other users (a clone under `mktemp -d`): the
    webhook runs as uid 65532 and must reach its certificate there; then a
    directory under the system's temporary directory named after the
    repository."""
    if "REWIND_CONTAINERS_TMP" in os.environ:
        return Path(os.environ["REWIND_CONTAINERS_TMP"])
    root = REPO / ".test-tmp" / "containers"
    if all(os.stat(d).st_mode & 0o001 for d in root.parents if d.exists()):
        return root
    tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"rewind-containers-{tag}"


TMP_ROOT = _tmp_root()


def remove_tree(d):
    """Removes d after detaching whatever is mounted beneath it (a failed
    earlier run may have left its mounts)."""
    if d.exists():
        helpers.rmtree(d)


def fresh_dir(d):
    remove_tree(d)
    d.mkdir(parents=True)
    return d


class Volumes:
    """The host directories behind one pod's volumes. The whole tree is a
    shared mount (`mount --bind D D && mount --make-rshared D`): without it
    the FUSE mount the sidecar makes with Bidirectional propagation reaches
    neither the host nor the application, silently."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
        subprocess.run(["mount", "--make-rshared", str(root)], check=True)
        self.store = root / "store"
        self.app_src = root / "app-src"
        for d in (self.store, self.app_src):
            d.mkdir(exist_ok=True)
        shutil.copy(Path(__file__).with_name("app.py"), self.app_src / "app.py")

    def dir(self, name):
        d = self.root / "volumes" / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def detach(self):
        """Detaches everything mounted under the tree (the guard, FUSE
        mounts left by killed sidecars) and the tree's own bind mount."""
        helpers.lazy_unmount(self.root)


# --- containers from the patched pod ----------------------------------------

PROPAGATION = {None: "rprivate", "None": "rprivate", "HostToContainer": "rslave", "Bidirectional": "rshared"}


def localize_args(args):
    """The container's arguments with the store replaced by the directory
    mounted at STORE_IN_CONTAINER; everything else verbatim."""
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a == "--store":
            out[i + 1] = f"file://{STORE_IN_CONTAINER}"
    return out


def run_argv(spec, name, pod_name, volumes, *, store=None, image=None, command=None, extra_volumes=()):
    """`podman run` arguments for one container of a pod spec: privilege,
    user, mounts with their propagation, env and the command line as the
    patch gives them. Volumes the map lacks are the service-account token
    only (asserted), which nothing here reads."""
    argv = ["--name", name, "--label", LABEL, "--label", f"rewind-pod={pod_name}"]
    sc = spec.get("securityContext") or {}
    if sc.get("privileged"):
        argv.append("--privileged")
    if "runAsUser" in sc:
        argv += ["--user", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
    if sc.get("readOnlyRootFilesystem"):
        argv.append("--read-only")
    limit = ((spec.get("resources") or {}).get("limits") or {}).get("memory")
    if limit:
        assert limit.endswith("Mi"), limit
        argv += ["--memory", f"{int(limit[:-2])}m"]
    for m in spec.get("volumeMounts", []):
        if m["name"] not in volumes:
            assert m["name"].startswith("kube-api-access-"), f"no host directory for volume {m['name']}"
            continue
        opts = [PROPAGATION[m.get("mountPropagation")]]
        if m.get("readOnly"):
            opts.append("ro")
        assert "subPathExpr" not in m, f"subPathExpr has no local equivalent: {m}"
        # A subPath binds that directory of the volume, as the kubelet does
        # (it resolves the path, mounts included, when the container starts).
        host = Path(volumes[m["name"]]) / m["subPath"] if m.get("subPath") else volumes[m["name"]]
        argv += ["-v", f"{host}:{m['mountPath']}:{','.join(opts)}"]
    for host, inside, opts in extra_volumes:
        argv += ["-v", f"{host}:{inside}:{opts}"]
    for e in spec.get("env", []):
        if "value" in e:
            argv += ["-e", f"{e['name']}={e['value']}"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            argv += ["-e", f"{e['name']}={pod_name}"]
        else:
            raise AssertionError(f"env {e} has no local equivalent")
    for src in spec.get("envFrom", []):
        assert src.get("secretRef", {}).get("optional"), f"envFrom {src} is not an optional Secret"
    cmd = command or (spec["command"] + localize_args(spec.get("args", [])))
    if store is not None:
        argv += ["-v", f"{store}:{STORE_IN_CONTAINER}:rprivate"]
    argv += ["--entrypoint", json.dumps(cmd[:1]), image or spec["image"], *cmd[1:]]
    return argv


class Pod:
    """One patched pod run as podman containers in the kubelet's order:
    init containers one after the other (a native sidecar, restartPolicy
    Always, counts as started once its startupProbe passes), then the
    regular containers. The application container runs app.py."""

    def __init__(self, patched, name, volumes: Volumes, claim_dir, journal_mode="wal"):
        self.patched = patched
        self.name = name
        self.vol = volumes
        self.host_volumes = {"data": claim_dir, "rewind-data": volumes.dir(f"{name}-rewind-data")}
        self.journal_mode = journal_mode
        self.init = patched["spec"].get("initContainers", [])
        self.sidecar = next(c for c in self.init if c.get("restartPolicy") == "Always")
        (self.app_spec,) = patched["spec"]["containers"]

    def cname(self, spec):
        return f"{self.name}-{spec['name']}"

    @property
    def sidecar_name(self):
        return self.cname(self.sidecar)

    @property
    def app_name(self):
        return self.cname(self.app_spec)

    @property
    def app_dir(self):
        """Where the application sees the protected volume."""
        (m,) = [m for m in self.app_spec["volumeMounts"] if m["name"] == "rewind-data"]
        return m["mountPath"]

    @property
    def bare_dir(self):
        """The emptyDir's host directory: what runc binds into the sidecar."""
        return self.host_volumes["rewind-data"]

    @property
    def view_dir(self):
        """The emptyDir's directory the sidecar mounts FUSE on (its
        `--mount`), which the application mounts through its subPath."""
        args = self.sidecar["args"]
        inside = args[args.index("--mount") + 1]
        (m,) = [m for m in self.sidecar["volumeMounts"] if m["name"] == "rewind-data"]
        return self.bare_dir / os.path.relpath(inside, m["mountPath"])

    def run_init(self, spec):
        """A one-shot init container: runs to completion; returns (code, log)."""
        name = self.cname(spec)
        podman("rm", "-f", name, check=False)
        r = podman("run", *run_argv(spec, name, self.name, self.host_volumes, store=self.vol.store), check=False, timeout=600)
        return r.returncode, r.stdout + r.stderr

    def start_sidecar(self, fresh=False):
        """Starts the sidecar (a new container when there is none or `fresh`,
        else `podman start` of the stopped one, as a kubelet restart does)
        and waits for its startup and readiness probes."""
        name = self.sidecar_name
        exists = podman("container", "exists", name, check=False).returncode == 0
        if exists and fresh:
            podman("rm", "-f", name)
        if exists and not fresh:
            podman("start", name)
        else:
            podman("run", "-d", *run_argv(self.sidecar, name, self.name, self.host_volumes, store=self.vol.store))
        self.wait_probe("startupProbe", 120)
        self.wait_probe("readinessProbe", 120)

    def wait_probe(self, probe, deadline_s):
        name = self.sidecar_name
        helpers.wait_until(lambda: http_probe(name, self.sidecar, probe) or state(name)[0] not in ("running", None),
                           deadline_s, f"{name}'s {probe}", interval=0.2,
                           on_timeout=lambda: f"state {state(name)}; log:\n{logs(name)}")
        assert state(name)[0] == "running", f"{name} exited: {state(name)}\n{logs(name)}"

    def start_app(self, check=False, name=None, db="app.db"):
        """Runs the application container (a new one; `name` for a second
        one beside it), writing DB, or with `check` reading it once."""
        name = name or self.app_name
        argv = ["python3", "/app/app.py", self.app_dir, self.journal_mode, db] + (["check"] if check else [])
        run = run_argv(self.app_spec, name, self.name, self.host_volumes, image=APP_IMAGE, command=argv,
                       extra_volumes=[(self.vol.app_src, "/app", "ro")])
        podman("rm", "-f", name, check=False)
        if check:
            r = podman("run", *run, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            return json.loads(r.stdout.strip().splitlines()[-1])
        podman("run", "-d", *run)

    def restart_app(self, name=None):
        """Stops the application container and starts the same container
        again, as the kubelet restarts a container (its log goes on)."""
        name = name or self.app_name
        code, log = self.stop(name)
        assert code == 0, log
        podman("start", name)

    def committed(self, name=None):
        return [e["ok"] for e in events(name or self.app_name) if "ok" in e]

    def wait_commits(self, at_least, name=None, deadline_s=120):
        name = name or self.app_name
        return helpers.wait_until(lambda: len(self.committed(name)) >= at_least, deadline_s,
                                  f"{at_least} commits by {name}", interval=0.1,
                                  on_timeout=lambda: f"events: {events(name)[-5:]}")

    def stop(self, name):
        """SIGTERM with the pod's grace period, as the kubelet stops a
        container; returns (exit code, log)."""
        grace = self.patched["spec"].get("terminationGracePeriodSeconds", 30)
        podman("stop", "-t", str(grace), name, timeout=grace + 60)
        status, code = state(name)
        assert status == "exited", status
        return code, logs(name)


# --- fixtures ---------------------------------------------------------------


def _remove_labelled():
    ids = podman("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False)


@pytest.fixture(scope="session", autouse=True)
def images():
    """The suite needs the images tests/containers/setup.sh builds; it says
    so instead of skipping."""
    missing = [i for i in (IMAGE, APP_IMAGE) if podman("image", "exists", i, check=False).returncode != 0]
    if missing:
        pytest.fail(f"missing images {missing}: run tests/containers/setup.sh first", pytrace=False)
    _remove_labelled()
    yield
    _remove_labelled()


@pytest.fixture(scope="session")
def pki():
    """A CA and the webhook's serving certificate for the name the API
    server dials, readable by the webhook's non-root user."""
    d = fresh_dir(TMP_ROOT / "session" / "pki")
    ca = make_ca(d)
    cert, key = make_server_cert(d, "server", ["rewind-webhook.rewind-system.svc", "localhost"])
    tls = d / "tls"
    tls.mkdir()
    shutil.copy(cert, tls / "tls.crt")
    shutil.copy(key, tls / "tls.key")
    for p in (d, tls, tls / "tls.crt", tls / "tls.key"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return ca, tls


def webhook_deployment():
    docs = list(yaml.safe_load_all((REPO / "manifests" / "base" / "deployment.yaml").read_text()))
    (dep,) = [d for d in docs if d and d.get("kind") == "Deployment"]
    return dep["spec"]["template"]["spec"]


@pytest.fixture(scope="session")
def webhook(pki):
    """The image's webhook, run as the manifests' Deployment runs it: its
    command line, user, read-only root and volume paths, with the fixture's
    injection settings (image: the image under test)."""
    ca, tls = pki
    pod_spec = webhook_deployment()
    (spec,) = pod_spec["containers"]
    spec = copy.deepcopy(spec)
    # The image under test in the manifest's place, as kustomize's
    # `images:` would set it.
    spec["image"] = IMAGE
    sc = {**(pod_spec.get("securityContext") or {}), **(spec.get("securityContext") or {})}
    spec["securityContext"] = sc
    cfg = fresh_dir(TMP_ROOT / "session" / "config")
    config = json.loads((FIXTURES / "config.json").read_text())
    config["image"] = IMAGE
    config["shutdownTimeoutSeconds"] = SHUTDOWN_TIMEOUT_S
    (cfg / "config.json").write_text(json.dumps(config))
    os.chmod(cfg, 0o755)
    os.chmod(cfg / "config.json", 0o644)
    mounts = {}
    for m in spec["volumeMounts"]:
        if m["mountPath"] == "/etc/rewind/tls":
            mounts[m["name"]] = tls
        elif m["mountPath"] == "/etc/rewind/config":
            mounts[m["name"]] = cfg
        else:
            raise AssertionError(f"the webhook mounts {m}; give the suite a directory for it")
    name = "rewind-suite-webhook"
    podman("rm", "-f", name, check=False)
    podman("run", "-d", *run_argv(spec, name, name, mounts))

    class W:
        pass

    w = W()
    w.name, w.spec, w.ca = name, spec, ca
    helpers.wait_until(lambda: http_probe(name, spec, "readinessProbe", ca) or state(name)[0] != "running", 60,
                       "the webhook's readinessProbe", interval=0.1, on_timeout=lambda: f"log:\n{logs(name)}")
    assert state(name)[0] == "running", logs(name)
    yield w
    code, _ = stop_with_grace(name, pod_spec.get("terminationGracePeriodSeconds", 30))
    assert code == 0, "the webhook must exit 0 on SIGTERM:\n" + logs(name)


def stop_with_grace(name, grace):
    podman("stop", "-t", str(grace), name, timeout=grace + 60)
    return state(name)[1], logs(name)


def https(webhook, method, path, body=None):
    """One HTTPS request to the webhook container, the certificate verified
    against the suite's CA for the Service name the API server dials."""
    import http.client
    import socket
    (port,) = [p["containerPort"] for p in webhook.spec["ports"] if p["name"] == "https"]
    ctx = ssl.create_default_context(cafile=str(webhook.ca))
    raw = socket.create_connection((ip_of(webhook.name), port), timeout=10)
    conn = http.client.HTTPSConnection("rewind-webhook.rewind-system.svc", port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname="rewind-webhook.rewind-system.svc")
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


@pytest.fixture(scope="session")
def patch_pod(webhook):
    """Sends the deployment fixture (plus annotations) to the webhook
    container and returns the pod with its patch applied."""

    def patch(annotations=None):
        pod = json.loads((FIXTURES / "pods" / "deployment.json").read_text())
        pod["metadata"]["annotations"].update(annotations or {})
        status, data = https(webhook, "POST", "/mutate", json.dumps(admission_review(pod, "shop")).encode())
        assert status == 200, data
        response = json.loads(data)["response"]
        assert response["allowed"], response
        return jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))

    return patch


@pytest.fixture
def workdir(request):
    """A fresh directory per test under TMP_ROOT, kept when the test fails
    (its store and directories can be read), removed when it passes."""
    d = fresh_dir(TMP_ROOT / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80])
    yield d
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        remove_tree(d)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def volumes(workdir, request):
    vols = Volumes(workdir / "pod")
    yield vols
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.passed:
        # Kept beside the test's directories: the containers go next.
        for name in podman("ps", "-a", "--format", "{{.Names}}", "--filter", "label=rewind-pod", check=False).stdout.split():
            (workdir / f"{name}.log").write_text(logs(name))
    _remove_labelled_pods()
    vols.detach()


def _remove_labelled_pods():
    ids = podman("ps", "-aq", "--filter", "label=rewind-pod", check=False).stdout.split()
    ids = [i for i in ids if podman("inspect", "--format", "{{index .Config.Labels \"rewind-pod\"}}", i,
                                     check=False).stdout.strip() != "rewind-suite-webhook"]
    if ids:
        podman("rm", "-f", "-t", "0", *ids, check=False)
