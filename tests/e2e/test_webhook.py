"""The admission webhook end to end: a real `rewind webhook` process serving
HTTPS with a certificate made here, real AdmissionReview JSON shaped like
the API server's, the returned JSON Patch applied with an independent
implementation, and the patched pod validated strictly against the
Kubernetes OpenAPI schema (the oldest supported and the latest version) and
against the API server's own rules. The cases are the table in
tests/fixtures/webhook/cases.json, which tests/webhook.rs also runs through
the pure core. The admission chain's reinvocation is replayed from the
request bodies in tests/fixtures/webhook/chain/.
"""

import base64
import copy
import json
import os
import shutil
import ssl
import time

import jsonpatch
import pytest

from webhook_support import (
    FIXTURES,
    Webhook,
    admission_review,
    api_server_violations,
    default_like_api_server,
    make_ca,
    make_server_cert,
    validate_strict,
)

CASES = json.loads((FIXTURES / "cases.json").read_text())
CHAIN = FIXTURES / "chain"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
API_SERVER_NAME = "rewind-webhook.rewind-system.svc"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    cert, key = make_server_cert(d, "server", ["localhost", API_SERVER_NAME])
    return d, ca, cert, key


@pytest.fixture(scope="module")
def webhooks(pki, tmp_path_factory):
    """One running webhook per distinct config override, started on demand."""
    d, ca, cert, key = pki
    running = {}
    cfg_dir = tmp_path_factory.mktemp("config")

    def get(override=None):
        k = json.dumps(override, sort_keys=True)
        if k not in running:
            config = json.loads((FIXTURES / "config.json").read_text())
            for name, value in (override or {}).items():
                if value is None:
                    config.pop(name, None)
                else:
                    config[name] = value
            path = cfg_dir / f"config-{len(running)}.json"
            path.write_text(json.dumps(config))
            running[k] = Webhook(cert, key, path, ca)
        return running[k]

    yield get
    for w in running.values():
        assert w.stop() == 0, "webhook must exit 0 on SIGTERM:\n" + "\n".join(w.log)


def load_pod(case):
    pod = json.loads((FIXTURES / "pods" / case["pod"]).read_text())
    if case.get("edit"):
        pod = jsonpatch.apply_patch(pod, case["edit"])
    return pod


def path_for(case):
    level = case.get("podSecurity")
    return f"/mutate/pod-security/{level}" if level else "/mutate"


def send(webhook, pod, case, uid="6f1b2c3d-0000-4000-8000-00000000abcd"):
    """Sends the pod and returns (response, patched pod or None)."""
    response, ops = send_review(webhook, admission_review(pod, case["namespace"], uid=uid), path_for(case))
    return response, None if ops is None else jsonpatch.apply_patch(pod, ops)


def send_review(webhook, review, path="/mutate"):
    """Sends an AdmissionReview and returns (response, patch operations or None)."""
    answer = webhook.review(review, path)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"], "the response must echo the request's uid"
    if "patch" not in response:
        return response, None
    assert response["patchType"] == "JSONPatch"
    return response, json.loads(base64.b64decode(response["patch"]))


def assert_valid_pod(pod):
    validate_strict(pod)
    violations = api_server_violations(pod)
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case_over_https(case, webhooks):
    webhook = webhooks(case.get("config"))
    pod = load_pod(case)
    expect = case["expect"]
    result = expect["result"]

    if result == "malformed":
        status, body = webhook.request("POST", path_for(case), json.dumps(admission_review(pod, case["namespace"])).encode())
        assert status == 400, body
        for want in expect["message"]:
            assert want in body.decode()
        return

    # The unpatched input is itself a valid pod (otherwise the case proves nothing).
    if result != "denied":
        assert_valid_pod(pod)

    response, patched = send(webhook, pod, case)
    if result == "denied":
        assert response["allowed"] is False
        assert response["status"]["code"] == 403
        for want in expect["message"]:
            assert want in response["status"]["message"], response["status"]["message"]
        return
    assert response["allowed"] is True
    warning = expect.get("warning")
    if warning:
        assert any(warning in w for w in response.get("warnings", [])), response
    else:
        assert "warnings" not in response
    if result == "untouched":
        assert patched is None, "pods without the annotation must not be touched"
        return

    assert patched is not None
    assert_valid_pod(patched)
    init = {c["name"]: c for c in patched["spec"].get("initContainers", [])}
    for name, want in {**expect.get("sidecars", {}), **expect.get("restores", {})}.items():
        args = init[name]["args"]
        assert args[args.index("--volume") + 1] == want["volume"]
    if "grace" in expect:
        assert patched["spec"]["terminationGracePeriodSeconds"] == expect["grace"]

    # Reinvocation: the webhook's own output yields no patch, also once the
    # API server has defaulted it.
    for again in (patched, default_like_api_server(patched)):
        response, repatched = send(webhook, again, case)
        assert response["allowed"] is True and repatched is None, "own output must give an empty patch"

    # Another webhook adds a container after injection: it gets rewired.
    protected = [v.strip() for v in pod["metadata"]["annotations"]["rewind.dev/volumes"].split(",")]
    other = copy.deepcopy(patched)
    other["spec"]["containers"].append({
        "name": "mesh-proxy", "image": "proxy:1", "imagePullPolicy": "IfNotPresent",
        "volumeMounts": [{"name": protected[0], "mountPath": "/snapshot"}],
    })
    response, rewired = send(webhook, other, case)
    assert rewired is not None
    assert rewired["spec"]["containers"][-1]["volumeMounts"] == [
        {"name": f"rewind-{protected[0]}", "mountPath": "/snapshot", "mountPropagation": "HostToContainer",
         "subPath": "view"}
    ]
    assert_valid_pod(rewired)


def test_injected_pod_shape(webhooks):
    """The statefulset pod, checked field by field where the contract is
    specific: claim only in rewind's containers, privileged Bidirectional in
    the sidecar, HostToContainer in every app container including init."""
    case = next(c for c in CASES if c["pod"] == "statefulset.json" and c["expect"]["result"] == "patched")
    _, pod = send(webhooks(), load_pod(case), case)
    spec = pod["spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["rewind-restore-data", "rewind-restore-wal", "rewind-data", "rewind-wal", "init-perms"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["rewind-data"] == {"name": "rewind-data", "emptyDir": {}}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "data-db-0"
    sidecar = next(c for c in spec["initContainers"] if c["name"] == "rewind-data")
    assert sidecar["securityContext"]["privileged"] is True
    assert sidecar["securityContext"]["runAsNonRoot"] is False  # the pod says runAsNonRoot
    assert {"name": "rewind-data", "mountPath": "/rewind/mnt", "mountPropagation": "Bidirectional"} in sidecar["volumeMounts"]
    # FUSE goes on the emptyDir's view directory, which the app mounts.
    assert sidecar["args"][sidecar["args"].index("--mount") + 1] == "/rewind/mnt/view"
    assert {"name": "data", "mountPath": "/rewind/source"} in sidecar["volumeMounts"]
    assert sidecar["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "512Mi"}}
    assert "livenessProbe" not in sidecar
    restore = next(c for c in spec["initContainers"] if c["name"] == "rewind-restore-data")
    assert restore["args"][restore["args"].index("--once-marker") + 1] == \
        "/rewind/source/.rewind/restored-at-2026-11-24T12_00_05Z"
    for c in spec["initContainers"][4:] + spec["containers"]:
        for m in c["volumeMounts"]:
            assert m["name"] not in ("data", "wal"), f"{c['name']} still mounts the claim"
            if m["name"].startswith("rewind-"):
                assert m["mountPropagation"] == "HostToContainer"
                assert m["subPath"] == "view" or m["subPath"].startswith("view/"), m
    pg = spec["containers"][0]
    assert {"name": "rewind-wal", "mountPath": "/wal", "subPath": "view/pg_wal", "mountPropagation": "HostToContainer"} in pg["volumeMounts"]
    assert pod["metadata"]["annotations"]["rewind.dev/app-grace-period-seconds"] == "120"
    assert spec["terminationGracePeriodSeconds"] == 155


def test_encryption_secret_is_mounted_as_a_file_only(webhooks):
    """With rewind.dev/encryption-secret the patch gives the pod one Secret
    volume (the entry "key" only, mode 0400), mounts it read-only into every
    rewind container and nowhere else, and passes its path: the Secret's name
    appears only as the volume's secretName, and no env var, envFrom or
    argument carries the key or reads the Secret."""
    case = next(c for c in CASES if c["expect"].get("encryptionSecret") and c["pod"] == "statefulset.json")
    secret = case["expect"]["encryptionSecret"]
    pod = load_pod(case)
    response, ops = send_review(webhooks(), admission_review(pod, case["namespace"]), path_for(case))
    assert response["allowed"] is True
    patched = jsonpatch.apply_patch(pod, ops)
    assert_valid_pod(patched)
    spec = patched["spec"]
    key_volumes = [v for v in spec["volumes"] if "secret" in v]
    assert key_volumes == [{"name": "rewind-encryption-key", "secret": {
        "secretName": secret, "items": [{"key": "key", "path": "key"}], "defaultMode": 0o400}}]
    own = [c for c in spec["initContainers"] if c["name"].startswith("rewind-")]
    assert sorted(c["name"] for c in own) == ["rewind-data", "rewind-restore-data", "rewind-restore-wal", "rewind-wal"]
    for c in own:
        assert {"name": "rewind-encryption-key", "mountPath": "/rewind/encryption", "readOnly": True} \
            in c["volumeMounts"], c["name"]
        args = c["args"]
        assert args.count("--encryption-key-file") == 1, c["name"]
        assert args[args.index("--encryption-key-file") + 1] == "/rewind/encryption/key"
    for c in spec["initContainers"] + spec["containers"]:
        if not c["name"].startswith("rewind-"):
            assert all(m["name"] != "rewind-encryption-key" for m in c.get("volumeMounts", [])), c["name"]
        for e in c.get("env", []):
            assert "secretKeyRef" not in e.get("valueFrom", {}), e
            assert "ENCRYPTION" not in e["name"], e
        for e in c.get("envFrom", []):
            assert e.get("secretRef", {}).get("name") != secret, e
    # The Secret's name is in exactly one place of the whole patch.
    assert json.dumps(ops).count(json.dumps(secret)) == 1, ops
    # Reinvocation, also after the API server's defaulting, is a fixed point.
    for again in (patched, default_like_api_server(patched)):
        response, repatched = send(webhooks(), again, case)
        assert response["allowed"] is True and repatched is None


def test_malformed_requests_get_400_and_the_server_survives(webhooks):
    webhook = webhooks()
    good = admission_review(load_pod(CASES[0]), "shop")
    no_uid = copy.deepcopy(good)
    del no_uid["request"]["uid"]
    v1beta1 = copy.deepcopy(good)
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1"
    no_object = copy.deepcopy(good)
    del no_object["request"]["object"]
    for body in [b"", b"{", b"[]", b"null", b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
                 json.dumps(no_uid).encode(), json.dumps(v1beta1).encode(), json.dumps(no_object).encode(),
                 b"\xff\xfe binary", json.dumps({"request": "x"}).encode()]:
        status, text = webhook.request("POST", "/mutate", body)
        assert status == 400, (body[:60], status, text)
    status, _ = webhook.request("POST", "/mutate", b"x" * (5 << 20))
    assert status == 413
    assert webhook.request("GET", "/mutate")[0] == 405
    assert webhook.request("POST", "/elsewhere", b"{}")[0] == 404
    assert webhook.request("GET", "/healthz") == (200, b"ok\n")
    assert webhook.request("GET", "/readyz") == (200, b"ok\n")
    assert webhook.proc.poll() is None
    response, patched = send(webhook, load_pod(CASES[0]), CASES[0])
    assert response["allowed"] and patched is not None


def test_other_operations_and_kinds_pass_untouched(webhooks):
    webhook = webhooks()
    pod = load_pod(CASES[0])
    for op in ("UPDATE", "DELETE", "CONNECT"):
        answer = webhook.review(admission_review(pod, "shop", operation=op))
        assert answer["response"]["allowed"] is True and "patch" not in answer["response"]
    review = admission_review({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}, "shop")
    review["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    answer = webhook.review(review)
    assert answer["response"]["allowed"] is True and "patch" not in answer["response"]


def test_certificate_for_the_service_name_verifies(webhooks):
    """The API server dials <service>.<namespace>.svc and checks the
    certificate against caBundle: the same check here."""
    webhook = webhooks()
    assert webhook.request("GET", "/healthz", server_hostname=API_SERVER_NAME)[0] == 200


def test_rotated_certificate_is_served_without_restart(tmp_path):
    ca = make_ca(tmp_path)
    cert_a, key_a = make_server_cert(tmp_path, "a", ["localhost"])
    cert_b, key_b = make_server_cert(tmp_path, "b", ["localhost"])
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(cert_a, live / "tls.crt")
    shutil.copy(key_a, live / "tls.key")
    config = tmp_path / "config.json"
    config.write_text((FIXTURES / "config.json").read_text())
    webhook = Webhook(live / "tls.crt", live / "tls.key", config, ca)
    try:
        def der(path):
            return ssl.PEM_cert_to_DER_cert(path.read_text())

        assert webhook.peer_certificate() == der(cert_a)
        # Replace both files the way a Secret volume update does: new inodes
        # swapped in by rename (key first, so there is a mismatched moment
        # the server must ride out).
        for src, name in ((key_b, "tls.key"), (cert_b, "tls.crt")):
            shutil.copy(src, live / f".{name}.tmp")
            os.replace(live / f".{name}.tmp", live / name)
        # The server checks the files at most once a second, at handshake
        # time; poll with handshakes until the new certificate is served.
        deadline = time.monotonic() + 15
        while webhook.peer_certificate() != der(cert_b):
            assert time.monotonic() < deadline, "rotated certificate not served:\n" + "\n".join(webhook.log)
            time.sleep(0.05)
        webhook.wait_for_log(r"reloaded TLS certificate", deadline_s=5)
        assert webhook.request("GET", "/healthz")[0] == 200
        assert webhook.proc.poll() is None
    finally:
        assert webhook.stop() == 0


def test_reinvocation_keeps_what_other_mutators_added(webhooks):
    """The API server's sequence for one StatefulSet pod, with request
    bodies shaped like its own (tests/fixtures/webhook/chain/): Rewind's
    first call; then the reinvocation after the ServiceAccount plugin
    mounted its token into every container (Rewind's too), a policy webhook
    gave every container an env var, a CA mount and a seccomp profile, and
    another webhook added a log shipper that mounts the claim; then a third
    call with the result. Rewind must wire the log shipper, keep everything
    the others added, and answer the third call with no patch."""
    webhook = webhooks()
    first = json.loads((CHAIN / "create-db-0.json").read_text())
    response, ops = send_review(webhook, first)
    assert response["allowed"] is True and ops
    assert_valid_pod(jsonpatch.apply_patch(without_null_timestamp(first["request"]["object"]), ops))

    reinvoked = json.loads((CHAIN / "reinvoke-db-0.json").read_text())
    pod = reinvoked["request"]["object"]
    response, ops = send_review(webhook, reinvoked)
    assert response["allowed"] is True and ops, "the log shipper needs wiring"
    after = jsonpatch.apply_patch(pod, ops)

    containers = after["spec"]["initContainers"] + after["spec"]["containers"]
    for c in containers:
        name, mounts = c["name"], c.get("volumeMounts", [])
        assert any(m["mountPath"] == TOKEN_PATH and m["name"].startswith("kube-api-access-") for m in mounts), \
            f"{name} lost the ServiceAccount plugin's token mount"
        assert {"name": "vault-ca", "mountPath": "/vault/ca", "readOnly": True} in mounts, f"{name} lost the CA mount"
        assert {"name": "VAULT_ADDR", "value": "https://vault.vault.svc:8200"} in c.get("env", []), f"{name} lost VAULT_ADDR"
        assert c.get("securityContext", {}).get("seccompProfile") == {"type": "RuntimeDefault"}, \
            f"{name} lost its seccompProfile"
    whole = [op["path"] for op in ops if op["path"] in ("/spec/initContainers", "/spec/containers", "/spec/volumes")]
    assert not whole, f"lists holding others' entries are replaced whole: {whole}"
    shipper = next(c for c in after["spec"]["containers"] if c["name"] == "log-shipper")
    assert {"name": "rewind-data", "mountPath": "/var/lib/postgresql/data", "readOnly": True,
            "mountPropagation": "HostToContainer", "subPath": "view"} in shipper["volumeMounts"]
    # Apart from that mount, nothing the pod held changed.
    unchanged = copy.deepcopy(after)
    for m in next(c for c in unchanged["spec"]["containers"] if c["name"] == "log-shipper")["volumeMounts"]:
        if m["name"] == "rewind-data":
            m["name"] = "data"
            del m["mountPropagation"], m["subPath"]
    assert unchanged == pod
    assert_valid_pod(without_null_timestamp(after))

    third = copy.deepcopy(reinvoked)
    third["request"]["uid"] = "e1d2c3b4-a596-4788-99aa-bbccddeeff00"
    for obj in (after, default_like_api_server(after)):
        third["request"]["object"] = obj
        response, ops = send_review(webhook, third)
        assert response["allowed"] is True and ops is None, f"a third call still patches: {ops}"


def without_null_timestamp(pod):
    """The API server sends metadata.creationTimestamp as null on CREATE
    (the object is not stored yet); the OpenAPI schema wants a string or
    nothing, so the validation sees it absent."""
    pod = copy.deepcopy(pod)
    if pod["metadata"].get("creationTimestamp", "") is None:
        del pod["metadata"]["creationTimestamp"]
    return pod
