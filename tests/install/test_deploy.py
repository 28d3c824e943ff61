"""The deployment files under deploy/: the Kubernetes manifests pass the API's schema (strict:
no unknown fields) and say what the server does (its flags exist, the probes hit the right
endpoints, the drain fits the grace period); the HAProxy configuration parses."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
VERSION = "1.30.0"  # the oldest Kubernetes the manifests are written for


def manifests() -> dict[str, dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[doc["kind"]] = doc
    return out


def test_manifests_pass_the_kubernetes_schema_strictly():
    import kubernetes_validate

    docs = manifests()
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, VERSION, strict=True)
    # the check catches a misspelt field
    bad = copy.deepcopy(docs["Deployment"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_the_deployment_matches_the_server():
    from frontends.serve import build_parser

    docs = manifests()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "ppx-serve"
    args = build_parser().parse_args(c["args"][1:])  # every flag is one ppx-serve has
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert args.drain_timeout + pause < pod["terminationGracePeriodSeconds"]
    port = c["ports"][0]["containerPort"]
    assert args.port == port and args.host == "0.0.0.0"
    svc = docs["Service"]["spec"]
    assert svc["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    # the metric the autoscaler reads is one ppx-serve exports
    from frontends.serve import server
    assert f'"{hpa["metrics"][0]["pods"]["metric"]["name"]}"' in Path(server.__file__).read_text()


HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_the_haproxy_configuration_parses():
    r = subprocess.run([HAPROXY, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
