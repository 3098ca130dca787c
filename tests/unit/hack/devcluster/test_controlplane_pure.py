"""The pure parts of hack.devcluster.controlplane: the kubeconfig it writes and the generated PKI."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import yaml

from hack.devcluster.controlplane import ADMISSION_PLUGINS, KCM_CONTROLLERS, generate_pki, render_kubeconfig


def test_kubeconfig_inlines_the_ca_and_kubectl_reads_it(tmp_path: Path) -> None:
    text = render_kubeconfig("https://127.0.0.1:6443", b"PEM", "jest-admin", "tok")
    doc = yaml.safe_load(text)
    cluster = doc["clusters"][0]["cluster"]
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"PEM"
    assert doc["users"][0] == {"name": "jest-admin", "user": {"token": "tok"}}
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    out = subprocess.run(["kubectl", "--kubeconfig", str(path), "config", "view", "--minify", "-o",
                          "jsonpath={.clusters[0].cluster.server}"], capture_output=True, text=True, check=True)
    assert out.stdout == "https://127.0.0.1:6443"


def test_serving_certificate_is_signed_by_the_ca_and_names_loopback(tmp_path: Path) -> None:
    generate_pki(tmp_path)
    verify = subprocess.run(["openssl", "verify", "-CAfile", "ca.crt", "apiserver.crt", "apiserver-kubelet-client.crt"],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    front = subprocess.run(["openssl", "verify", "-CAfile", "front-proxy-ca.crt", "front-proxy-client.crt"],
                           cwd=tmp_path, capture_output=True, text=True, check=False)
    assert front.returncode == 0, front.stderr
    sans = subprocess.run(["openssl", "x509", "-in", "apiserver.crt", "-noout", "-ext", "subjectAltName"],
                          cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in sans
    assert "DNS:kubernetes.default.svc" in sans


def test_the_admission_plugin_issue_11_names_is_enabled() -> None:
    assert "OwnerReferencesPermissionEnforcement" in ADMISSION_PLUGINS
    assert {"garbage-collector-controller", "deployment-controller", "replicaset-controller",
            "serviceaccount-token-controller"} <= set(KCM_CONTROLLERS)
    assert not any("node-lifecycle" in c or "ipam" in c for c in KCM_CONTROLLERS)
