"""The admission policy's spec checks offline (jest_operator.admission); the real API server's verdicts on the
same manifests are compared with these in tests/e2e/test_admission_policy.py."""

from __future__ import annotations

from typing import Any

import pytest
from jest_operator.admission import DEFAULT_ALLOWED_VOLUME_TYPES, AdmissionPolicy, refusals
from jest_operator.api import VOLUME_SOURCES, parse_job


def job(**pod_template: Any) -> Any:
    return parse_job({"apiVersion": "jest.training/v1alpha1", "kind": "JESTTrainingJob",
                      "metadata": {"name": "j", "namespace": "team"},
                      "spec": {"image": "trainer:1", "podTemplate": pod_template}})


def volumes(**sources: dict[str, Any]) -> dict[str, Any]:
    return {"volumes": [{"name": name, source: spec} for name, (source, spec) in sources.items()]}


def test_the_defaults_refuse_secret_and_projected_volumes_and_secret_env_only() -> None:
    policy = AdmissionPolicy()
    assert policy.allowed_volume_types == DEFAULT_ALLOWED_VOLUME_TYPES
    assert refusals(job(), policy) == []
    fine = volumes(a=("persistentVolumeClaim", {"claimName": "c"}), b=("configMap", {"name": "m"}),
                   c=("emptyDir", {}), d=("csi", {"driver": "x"}))
    assert refusals(job(**fine, serviceAccountName="trainer"), policy) == []
    bad = volumes(ok=("emptyDir", {}), creds=("secret", {"secretName": "s"}),
                  token=("projected", {"sources": [{"serviceAccountToken": {"path": "t"}}]}))
    assert refusals(job(**bad), policy) == [
        "spec.podTemplate.volumes: creds (secret), token (projected) use volume types this cluster's JEST admission "
        "policy does not allow (allowed: persistentVolumeClaim, configMap, emptyDir, csi; chart value "
        "admissionPolicy.allowedVolumeTypes)"]
    env = [{"name": "PLAIN", "value": "1"},
           {"name": "FROM_MAP", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "k"}}},
           {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    assert refusals(job(env=env), policy) == [
        "spec.podTemplate.env: KEY read Secrets (valueFrom.secretKeyRef), which this cluster's JEST admission policy "
        "does not allow (chart value admissionPolicy.allowSecretEnv)"]


def test_an_admins_choices_change_the_verdicts_and_are_reported_in_order() -> None:
    strict = AdmissionPolicy(allowed_volume_types=(), allow_service_account_name=False, allow_secret_env=True)
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    messages = refusals(job(**volumes(scratch=("emptyDir", {})), serviceAccountName="sa", env=env), strict)
    assert [message.split(":")[0] for message in messages] == ["spec.podTemplate.volumes",
                                                               "spec.podTemplate.serviceAccountName"]
    assert "(allowed: none;" in messages[0]
    assert refusals(job(**volumes(creds=("secret", {"secretName": "s"}))),
                    AdmissionPolicy(allowed_volume_types=VOLUME_SOURCES)) == []
    assert refusals(job(**volumes(creds=("secret", {"secretName": "s"}))), AdmissionPolicy(enabled=False)) == []


def test_values_are_read_like_the_chart_and_bad_values_name_the_key() -> None:
    assert AdmissionPolicy.from_values({}) == AdmissionPolicy()
    chosen = AdmissionPolicy.from_values({"admissionPolicy": {"allowedVolumeTypes": ["secret"],
                                                              "allowSecretEnv": True}})
    assert chosen == AdmissionPolicy(allowed_volume_types=("secret",), allow_secret_env=True)
    for values, key in (({"admissionPolicy": {"allowedVolumeTypes": ["hostPath"]}}, "allowedVolumeTypes"),
                        ({"admissionPolicy": {"allowedVolumeTypes": "secret"}}, "allowedVolumeTypes"),
                        ({"admissionPolicy": {"enabled": "yes"}}, "enabled"),
                        ({"admissionPolicy": {"allowSecretEnv": 1}}, "allowSecretEnv"),
                        ({"admissionPolicy": ["enabled"]}, "admissionPolicy")):
        with pytest.raises(ValueError, match=key):
            AdmissionPolicy.from_values(values)
