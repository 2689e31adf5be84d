"""Everything in manifests/ and sidecar/: each Kubernetes object validates
strictly against the OpenAPI schema (oldest supported and latest version),
the kustomizations build, the cross-references hold (Service → Deployment,
webhook paths → what the server serves, Secret names, CLI flags), and the
documented install without cert-manager really produces a certificate the
API server would accept. The example StatefulSet's pod goes through a real
webhook and the result validates too.
"""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonpatch
import pytest
import yaml

from webhook_support import (
    REPO,
    REWIND_BIN,
    Webhook,
    admission_review,
    api_server_violations,
    make_ca,
    make_server_cert,
    validate_strict,
)

MANIFESTS = REPO / "manifests"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def k8s_files():
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def objects(kind=None, under=MANIFESTS):
    out = []
    for p in sorted(Path(under).rglob("*.yaml")):
        if p.name == "kustomization.yaml":
            continue
        out += [d for d in docs(p) if kind is None or d["kind"] == kind]
    return out


def one(kind, name=None):
    found = [o for o in objects(kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def check_cert_manager(obj):
    """cert-manager's kinds are CRDs the Kubernetes schema does not know;
    check the fields this install relies on."""
    assert obj["apiVersion"] == "cert-manager.io/v1"
    spec = obj["spec"]
    if obj["kind"] == "Issuer":
        assert list(spec) == ["selfSigned"]
    elif obj["kind"] == "Certificate":
        assert set(spec) <= {"secretName", "commonName", "dnsNames", "duration", "renewBefore", "privateKey", "issuerRef"}
        assert spec["secretName"] and spec["dnsNames"] and spec["issuerRef"]["name"]
    else:
        raise AssertionError(f"unexpected cert-manager kind {obj['kind']}")


def cli_accepts(argv):
    """The real CLI parses argv: with --help appended, clap parses (and
    validates) every argument before it, then prints help and exits 0."""
    r = subprocess.run([REWIND_BIN, *argv, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, f"`rewind {' '.join(argv)}` does not parse: {r.stderr}"


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_validates(path):
    found = docs(path)
    assert found, f"{path} holds no object"
    for obj in found:
        if obj["apiVersion"].startswith("cert-manager.io/"):
            check_cert_manager(obj)
        else:
            validate_strict(obj)


def test_kustomizations_reference_every_file_once():
    listed = set()
    for k in MANIFESTS.rglob("kustomization.yaml"):
        kust = yaml.safe_load(k.read_text())
        for r in kust.get("resources", []):
            target = (k.parent / r).resolve()
            generated = k.parent.name == "without-cert-manager" and r == "tls-secret.yaml"
            assert target.exists() or generated, f"{k}: missing resource {r}"
            listed.add(target)
    for p in k8s_files():
        if "examples" in p.parts or p.parent.name == "without-cert-manager":
            continue
        assert p.resolve() in listed, f"{p} is not part of any kustomization"


def kustomize(path):
    assert shutil.which("kubectl"), "kubectl (with kustomize) is needed to build the kustomizations: install it"
    r = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_default_install_builds_and_validates():
    built = kustomize(MANIFESTS)
    kinds = sorted(o["kind"] for o in built)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "PodDisruptionBudget", "MutatingWebhookConfiguration", "Issuer", "Certificate"])
    for obj in built:
        (check_cert_manager if obj["apiVersion"].startswith("cert-manager.io/") else validate_strict)(obj)


def test_webhook_configuration_is_scoped_and_safe():
    mwc = one("MutatingWebhookConfiguration")
    svc = one("Service", "rewind-webhook")
    ns = one("Namespace", "rewind-system")["metadata"]["name"]
    paths = set()
    for hook in mwc["webhooks"]:
        name = hook["name"]
        assert hook["sideEffects"] == "None", name
        assert hook["failurePolicy"] == "Fail", name
        assert hook["admissionReviewVersions"] == ["v1"], name
        assert 1 <= hook["timeoutSeconds"] <= 30, name  # the API server's bounds
        # failurePolicy Fail only for pods that asked for rewind.
        assert hook["objectSelector"] == {"matchLabels": {"rewind.dev/inject": "true"}}, name
        exprs = hook["namespaceSelector"]["matchExpressions"]
        assert {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [ns, "kube-system"]} in exprs, name
        assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                  "resources": ["pods"], "scope": "Namespaced"}], name
        service = hook["clientConfig"]["service"]
        assert (service["name"], service["namespace"]) == (svc["metadata"]["name"], svc["metadata"]["namespace"])
        assert service["port"] in [p["port"] for p in svc["spec"]["ports"]]
        # The API server's rule for service paths: '/'-separated DNS subdomains.
        path = service["path"]
        assert path.startswith("/") and all(DNS_SUBDOMAIN.match(s) for s in path[1:].split("/")), path
        paths.add(path)
    inject = next(h for h in mwc["webhooks"] if h["clientConfig"]["service"]["path"] == "/mutate")
    assert inject["reinvocationPolicy"] == "IfNeeded"
    # Every namespace is routed to exactly one entry by its Pod Security level.
    levels = {}
    for hook in mwc["webhooks"]:
        pss = next(e for e in hook["namespaceSelector"]["matchExpressions"] if e["key"] == "pod-security.kubernetes.io/enforce")
        levels[hook["clientConfig"]["service"]["path"]] = pss
    assert levels["/mutate"] == {"key": "pod-security.kubernetes.io/enforce", "operator": "NotIn", "values": ["baseline", "restricted"]}
    assert levels["/mutate/pod-security/baseline"]["values"] == ["baseline"]
    assert levels["/mutate/pod-security/restricted"]["values"] == ["restricted"]
    assert paths == {"/mutate", "/mutate/pod-security/baseline", "/mutate/pod-security/restricted"}
    assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{ns}/{one('Certificate')['metadata']['name']}"


def test_webhook_deployment_is_available_unprivileged_and_wired():
    dep = one("Deployment", "rewind-webhook")
    svc = one("Service", "rewind-webhook")
    pdb = one("PodDisruptionBudget", "rewind-webhook")
    sa = one("ServiceAccount", "rewind-webhook")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    assert not objects("Role") and not objects("ClusterRole"), "the webhook needs no API access"
    (c,) = pod["containers"]
    # Pod Security "restricted", which the webhook's namespace enforces.
    sc = c["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
        assert c[probe]["httpGet"]["port"] in [p["name"] for p in c["ports"]]
    target = svc["spec"]["ports"][0]["targetPort"]
    assert target in [p["name"] for p in c["ports"]]
    argv = c["command"][1:] + c["args"]
    cli_accepts(argv)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    flag = lambda f: argv[argv.index(f) + 1]  # noqa: E731
    assert flag("--tls-cert") == mounts["tls"] + "/tls.crt" and flag("--tls-key") == mounts["tls"] + "/tls.key"
    assert flag("--config") == mounts["config"] + "/config.json"
    assert vols["tls"]["secret"]["secretName"] == one("Certificate")["spec"]["secretName"]
    assert vols["config"]["configMap"]["name"] == one("ConfigMap", "rewind-webhook-config")["metadata"]["name"]
    assert validate_pod_of(dep) == []


def validate_pod_of(workload, name="x-0"):
    tmpl = workload["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**tmpl["metadata"], "name": name}, "spec": tmpl["spec"]}
    validate_strict(pod)
    return api_server_violations(pod)


def test_the_config_map_loads_in_the_real_webhook(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(one("ConfigMap", "rewind-webhook-config")["data"]["config.json"])
    ca = make_ca(tmp_path)
    cert, key = make_server_cert(tmp_path, "s", ["localhost"])
    w = Webhook(cert, key, config, ca)
    try:
        assert w.request("GET", "/readyz")[0] == 200
    finally:
        assert w.stop() == 0


def test_install_without_cert_manager(tmp_path):
    """generate-tls.sh makes a Secret and a caBundle the API server accepts:
    the webhook serves the Secret's pair, and a client trusting only the
    caBundle verifies it for the Service's DNS name."""
    work = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, work, ignore=shutil.ignore_patterns("ca", "tls-secret.yaml", "cabundle-patch.yaml"))
    out = work / "without-cert-manager"
    subprocess.run(["sh", str(out / "generate-tls.sh")], check=True, capture_output=True)
    (secret,) = docs(out / "tls-secret.yaml")
    validate_strict(secret)
    assert secret["metadata"]["name"] == one("Certificate")["spec"]["secretName"]
    patch = yaml.safe_load((out / "cabundle-patch.yaml").read_text())
    mwc = jsonpatch.apply_patch(one("MutatingWebhookConfiguration"), patch)
    validate_strict(mwc)
    bundles = {h["clientConfig"]["caBundle"] for h in mwc["webhooks"]}
    assert len(bundles) == 1
    files = {}
    for name in ("tls.crt", "tls.key"):
        files[name] = tmp_path / name
        files[name].write_bytes(base64.b64decode(secret["data"][name]))
    ca = tmp_path / "bundle.crt"
    ca.write_bytes(base64.b64decode(bundles.pop()))
    config = tmp_path / "config.json"
    config.write_text(one("ConfigMap", "rewind-webhook-config")["data"]["config.json"])
    w = Webhook(files["tls.crt"], files["tls.key"], config, ca)
    try:
        assert w.request("GET", "/healthz", server_hostname="rewind-webhook.rewind-system.svc")[0] == 200
    finally:
        assert w.stop() == 0
    # Rotation reuses the CA, so the caBundle stays valid.
    subprocess.run(["sh", str(out / "generate-tls.sh")], check=True, capture_output=True)
    (again,) = docs(out / "tls-secret.yaml")
    assert again["data"]["ca.crt"] == secret["data"]["ca.crt"]
    assert again["data"]["tls.crt"] != secret["data"]["tls.crt"]
    built = kustomize(out)
    for obj in built:
        validate_strict(obj)
    (mwc_built,) = [o for o in built if o["kind"] == "MutatingWebhookConfiguration"]
    assert all(h["clientConfig"].get("caBundle") for h in mwc_built["webhooks"])
    assert "cert-manager.io/inject-ca-from" not in (mwc_built["metadata"].get("annotations") or {})


def test_example_statefulset_pod_is_injected_validly(tmp_path):
    """The example's pod, as the StatefulSet controller creates it, goes
    through a real webhook with the shipped config."""
    sts = one("StatefulSet", "db")
    ns = sts["metadata"]["namespace"]
    assert one("Namespace", ns)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    tmpl = sts["spec"]["template"]
    assert tmpl["metadata"]["labels"]["rewind.dev/inject"] == "true"
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert tmpl["metadata"]["annotations"]["rewind.dev/volumes"].split(",") == claims
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {**tmpl["metadata"], "name": "db-0", "generateName": "db-", "namespace": ns},
        "spec": {**tmpl["spec"], "hostname": "db-0", "subdomain": sts["spec"]["serviceName"],
                 "volumes": [{"name": c, "persistentVolumeClaim": {"claimName": f"{c}-db-0"}} for c in claims]},
    }
    config = tmp_path / "config.json"
    config.write_text(one("ConfigMap", "rewind-webhook-config")["data"]["config.json"])
    ca = make_ca(tmp_path)
    cert, key = make_server_cert(tmp_path, "s", ["localhost"])
    w = Webhook(cert, key, config, ca)
    try:
        response = w.review(admission_review(pod, ns))["response"]
    finally:
        assert w.stop() == 0
    assert response["allowed"] is True, response
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    validate_strict(patched)
    assert api_server_violations(patched) == []
    sidecar = patched["spec"]["initContainers"][0]
    args = sidecar["args"]
    assert args[args.index("--volume") + 1] == f"{ns}/data-db-0"
    cli_accepts(sidecar["command"][1:] + args)


def test_restore_job_restores_into_a_new_claim():
    job = one("Job")
    pvc = one("PersistentVolumeClaim", "data-db-0-restored")
    sts = one("StatefulSet", "db")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c["command"][1:] + c["args"]
    cli_accepts(argv)
    assert argv[0] == "restore"
    target = argv[argv.index("--target") + 1]
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == target)
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert argv[argv.index("--volume") + 1] == f"{sts['metadata']['namespace']}/data-db-0", "the source claim's history"
    assert "--force" not in argv, "a new claim is empty; --force would hide a mistake"
    assert validate_pod_of(job) == []


def test_prune_cronjob_runs_one_prune_at_a_time_with_its_own_credentials():
    cron = one("CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid", "two prunes would only fight over the lock"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c["command"][1:] + c["args"]
    cli_accepts(argv)
    assert argv[0] == "prune"
    sts = one("StatefulSet", "db")
    assert argv[argv.index("--volume") + 1] == f"{sts['metadata']['namespace']}/data-db-0"
    secrets = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    assert secrets == ["rewind-prune-credentials"], "prune deletes: not the sidecar's keys"
    sa = one("ServiceAccount", pod["serviceAccountName"])
    assert sa["metadata"]["namespace"] == cron["metadata"]["namespace"]
    assert pod["automountServiceAccountToken"] is False, "prune talks to the store, not the API server"
    assert c["securityContext"]["runAsNonRoot"] is True, "prune needs no privilege"
    assert validate_pod_of(cron["spec"]["jobTemplate"]) == []


def test_sidecar_image_ships_the_binary_the_webhook_injects():
    dockerfile = (REPO / "sidecar" / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile, re.M | re.I)
    assert len(froms) >= 2, "multi-stage build"
    assert re.search(r"apt-get install[^\n]*\bfuse3\b", dockerfile), "fuse3 in the runtime image"
    binary = json.loads(one("ConfigMap", "rewind-webhook-config")["data"]["config.json"])["binary"]
    assert re.search(rf"COPY --from=\S+ \S*/rewind {re.escape(binary)}\b", dockerfile), f"the image must hold {binary}"
    assert re.search(rf'ENTRYPOINT \["{re.escape(binary)}"\]', dockerfile)
    assert "cargo build --release --locked" in dockerfile
    assert (REPO / "sidecar" / "README.md").exists()
