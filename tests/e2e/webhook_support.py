"""Helpers for the Kubernetes suites (test_webhook.py, test_manifests.py):
test certificates made with the openssl CLI, a running `rewind webhook`
process, offline schema validation with kubernetes-validate, and the API
server's own pod rules that a schema cannot express, asserted directly.
Nothing here sleeps for a fixed time: every wait polls a condition until a
deadline.
"""

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import kubernetes_validate
from kubernetes_validate import utils as kv_utils

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "webhook"
REWIND_BIN = os.environ.get("REWIND_BIN", str(REPO / "target" / "release" / "rewind"))

# Native sidecars need 1.29; the latest schema the validator ships is "current".
K8S_VERSIONS = ["1.29.0", kv_utils.latest_version()]


def validate_strict(obj):
    """Validates a Kubernetes object against the OpenAPI schema of every
    supported version, refusing unknown fields."""
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


# --- certificates -----------------------------------------------------------


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(dirpath, name="rewind-test-ca"):
    d = Path(dirpath)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)
    return d / "ca.crt"


def make_server_cert(dirpath, stem, dns_names, ips=("127.0.0.1",)):
    """A server certificate signed by the CA in dirpath. Returns (cert, key)."""
    d = Path(dirpath)
    san = ",".join([f"DNS:{n}" for n in dns_names] + [f"IP:{ip}" for ip in ips])
    ext = d / f"{stem}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={dns_names[0]}", cwd=d)
    openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{stem}.crt", "-days", "2", "-extfile", ext.name, cwd=d)
    return d / f"{stem}.crt", d / f"{stem}.key"


# --- the webhook process ----------------------------------------------------


class LoggedProcess:
    """A `rewind` subcommand running in the background, its stderr read all
    the time (a full pipe would block it) and searchable with a deadline."""

    def __init__(self, argv, env=None):
        self.log = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [REWIND_BIN, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "REWIND_LOG": "info", **(env or {})},
        )
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self):
        for line in self.proc.stderr:
            with self.cond:
                self.log.append(line.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.log.append("<exited>")
            self.cond.notify_all()

    def wait_for_log(self, pattern, deadline_s, start=0):
        """Waits until a log line from index `start` on matches `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + deadline_s
        with self.cond:
            while True:
                for line in self.log[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.log and self.log[-1] == "<exited>"):
                    raise AssertionError(f"no {pattern!r} in the log; exit={self.proc.poll()} log:\n" + "\n".join(self.log))
                self.cond.wait(remaining)

    def stop(self, timeout=60):
        """SIGTERM, then the exit code (killing it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


class Webhook(LoggedProcess):
    """A running `rewind webhook` on a free loopback port."""

    def __init__(self, cert, key, config, ca):
        self.ca = ca
        self.cert, self.key = cert, key
        super().__init__(["webhook", "--listen", "127.0.0.1:0",
                          "--tls-cert", str(cert), "--tls-key", str(key), "--config", str(config)])
        self.addr = self.wait_for_log(r"listening on https://([0-9.]+:[0-9]+)", deadline_s=30).group(1)
        self.host, port = self.addr.rsplit(":", 1)
        self.port = int(port)

    def context(self):
        ctx = ssl.create_default_context(cafile=str(self.ca))
        return ctx

    def request(self, method, path, body=None, server_hostname="localhost"):
        """One HTTPS request, verifying the certificate for server_hostname
        (the name the API server would dial) against the test CA."""
        ctx = self.context()
        conn = http.client.HTTPSConnection(self.host, self.port, context=ctx, timeout=10)
        conn.sock = ctx.wrap_socket(socket.create_connection((self.host, self.port), timeout=10),
                                    server_hostname=server_hostname)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def review(self, review_obj, path="/mutate"):
        status, data = self.request("POST", path, json.dumps(review_obj).encode())
        assert status == 200, f"HTTP {status}: {data!r}"
        return json.loads(data)

    def peer_certificate(self, server_hostname="localhost"):
        ctx = self.context()
        with socket.create_connection((self.host, self.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                return tls.getpeercert(binary_form=True)


def admission_review(pod, namespace, uid="705ab4f5-6393-11e8-b7cc-42010a800002", operation="CREATE"):
    """An AdmissionReview shaped like the one the API server sends for a pod
    CREATE (kube-apiserver 1.3x, matchPolicy Equivalent)."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            # Pods made with generateName have no name yet.
            "name": pod.get("metadata", {}).get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "b3a2c1d0-0000-4000-8000-000000000001",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


# --- what the API server does and checks beyond the schema -------------------


def default_like_api_server(pod):
    """What the API server adds when it decodes a patched pod again before
    reinvoking webhooks: defaults such as fieldRef.apiVersion, and resource
    quantities in canonical form ("0.5" becomes "500m")."""
    pod = json.loads(json.dumps(pod))

    def walk(v, key=""):
        if isinstance(v, dict):
            if key == "fieldRef":
                v.setdefault("apiVersion", "v1")
            for k, child in v.items():
                if k == "cpu" and isinstance(child, str) and child.startswith("0."):
                    v[k] = f"{int((child[2:] + '000')[:3])}m"
                else:
                    walk(child, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, key)

    walk(pod)
    return pod


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(s):
    m = QUANTITY.match(str(s))
    assert m, f"bad quantity {s!r}"
    suffix = m.group(3) or ""
    factor = 10 ** int(suffix[1:]) if suffix[:1] in ("e", "E") else SUFFIX[suffix]
    return float(m.group(1)) * factor


def api_server_violations(pod):
    """The rules of the API server's pod validation (and the kubelet's
    admission) that the OpenAPI schema cannot express, limited to what the
    webhook touches. Returns a list of violations (empty is valid)."""
    errs = []
    spec = pod["spec"]
    volumes = spec.get("volumes", [])
    vnames = [v["name"] for v in volumes]
    if len(set(vnames)) != len(vnames):
        errs.append(f"duplicate volume names {vnames}")
    errs += [f"volume name {n!r} is not a DNS label" for n in vnames if not DNS_LABEL.match(n) or len(n) > 63]
    init = spec.get("initContainers", [])
    regular = spec.get("containers", [])
    names = [c["name"] for c in init + regular]
    if len(set(names)) != len(names):
        errs.append(f"duplicate container names {names}")
    pod_sc = spec.get("securityContext", {}) or {}
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace < 0:
        errs.append("negative terminationGracePeriodSeconds")
    for c in init + regular:
        where = f"container {c['name']}"
        is_init = c in init
        if not DNS_LABEL.match(c["name"]) or len(c["name"]) > 63:
            errs.append(f"{where}: name is not a DNS label")
        sc = c.get("securityContext", {}) or {}
        privileged = sc.get("privileged") is True
        if privileged and sc.get("allowPrivilegeEscalation") is False:
            errs.append(f"{where}: privileged with allowPrivilegeEscalation false")
        paths = []
        for m in c.get("volumeMounts", []):
            if m["name"] not in vnames:
                errs.append(f"{where}: mount of missing volume {m['name']!r}")
            prop = m.get("mountPropagation")
            if prop not in (None, "None", "HostToContainer", "Bidirectional"):
                errs.append(f"{where}: bad mountPropagation {prop}")
            if prop == "Bidirectional" and not privileged:
                errs.append(f"{where}: Bidirectional propagation in a non-privileged container")
            if m.get("recursiveReadOnly") not in (None, "Disabled") and prop not in (None, "None"):
                errs.append(f"{where}: recursiveReadOnly with mount propagation")
            if m.get("subPath") and m.get("subPathExpr"):
                errs.append(f"{where}: subPath and subPathExpr together")
            paths.append(m["mountPath"])
        if len(set(paths)) != len(paths):
            errs.append(f"{where}: duplicate mountPath {paths}")
        restartable = is_init and c.get("restartPolicy") == "Always"
        if is_init and c.get("restartPolicy") not in (None, "Always"):
            errs.append(f"{where}: init container restartPolicy must be Always or unset")
        if not is_init and "restartPolicy" in c:
            errs.append(f"{where}: regular container with restartPolicy")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in c and is_init and not restartable:
                errs.append(f"{where}: {probe} on a non-restartable init container")
            if probe in c:
                p = c[probe]
                handlers = [h for h in ("exec", "httpGet", "tcpSocket", "grpc") if h in p]
                if len(handlers) != 1:
                    errs.append(f"{where}: {probe} needs exactly one handler, has {handlers}")
                port = (p.get("httpGet") or p.get("tcpSocket") or {}).get("port")
                if isinstance(port, str) and port not in [x.get("name") for x in c.get("ports", [])]:
                    errs.append(f"{where}: {probe} names unknown port {port}")
                if isinstance(port, int) and not 0 < port < 65536:
                    errs.append(f"{where}: {probe} port out of range")
                if p.get("successThreshold", 1) != 1 and probe in ("startupProbe", "livenessProbe"):
                    errs.append(f"{where}: {probe} successThreshold must be 1")
        if "lifecycle" in c and is_init and not restartable:
            errs.append(f"{where}: lifecycle on a non-restartable init container")
        pnames = [p["name"] for p in c.get("ports", []) if "name" in p]
        if len(set(pnames)) != len(pnames):
            errs.append(f"{where}: duplicate port names")
        for p in c.get("ports", []):
            if "name" in p and (len(p["name"]) > 15 or not IANA_SVC_NAME.match(p["name"]) or "--" in p["name"]):
                errs.append(f"{where}: port name {p['name']!r} is not an IANA_SVC_NAME")
            if not 0 < p["containerPort"] < 65536:
                errs.append(f"{where}: containerPort out of range")
        res = c.get("resources", {}) or {}
        for r, limit in (res.get("limits") or {}).items():
            req = (res.get("requests") or {}).get(r)
            if req is not None and quantity(req) > quantity(limit):
                errs.append(f"{where}: request {r}={req} above limit {limit}")
        # The kubelet refuses to start a container whose effective user is
        # root while runAsNonRoot is in force.
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if non_root and user == 0:
            errs.append(f"{where}: runAsNonRoot with runAsUser 0")
    for key in (pod["metadata"].get("annotations") or {}):
        prefix, _, name = key.rpartition("/")
        if prefix and not DNS_SUBDOMAIN.match(prefix) or not re.match(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", name) or len(name) > 63:
            errs.append(f"annotation key {key!r} is not a qualified name")
    return errs
