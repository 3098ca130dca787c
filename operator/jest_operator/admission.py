"""The spec checks of the chart's admission policy, offline: what ``jestctl validate`` tells a user first.

Why: the operator creates a job's worker pods with its own rights, so the chart installs a
ValidatingAdmissionPolicy (``charts/jest-operator/templates/admission-policy.yaml``) that refuses a job
whose author could not create those pods, and, as an admin chooses, jobs that mount volume types outside
an allowed list, pick their pods' ServiceAccount, or read Secrets into env. The API server evaluates the
policy; this module evaluates its spec checks on a parsed job, with the same messages word for word (a
test on the real API server compares them), so a refusal can be learnt before ``kubectl apply``. The
author's own permission (pods ``create`` in the namespace) needs the cluster's authorizer and is only
checked there.

:class:`AdmissionPolicy` mirrors the chart's ``admissionPolicy`` values and their defaults (a test fails on
drift); :func:`refusals` is pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jest_operator.api import VOLUME_SOURCES, JESTTrainingJob

#: The chart's default ``admissionPolicy.allowedVolumeTypes``: no Secrets, no projected tokens.
DEFAULT_ALLOWED_VOLUME_TYPES: tuple[str, ...] = ("persistentVolumeClaim", "configMap", "emptyDir", "csi")


@dataclass(frozen=True)
class AdmissionPolicy:
    """The admin's choices of the chart's ``admissionPolicy`` block (defaults = the chart's defaults)."""

    enabled: bool = True
    allowed_volume_types: tuple[str, ...] = DEFAULT_ALLOWED_VOLUME_TYPES
    allow_service_account_name: bool = True
    allow_secret_env: bool = False

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> AdmissionPolicy:
        """The policy of a Helm values document (its ``admissionPolicy`` block; missing keys keep defaults).

        Raises ``ValueError`` naming the value when a volume type is unknown or a flag is not a boolean.
        """
        block = values.get("admissionPolicy") or {}
        if not isinstance(block, Mapping):
            raise ValueError("admissionPolicy: must be a mapping")
        default = cls()
        types = block.get("allowedVolumeTypes", list(default.allowed_volume_types))
        if not isinstance(types, list) or any(t not in VOLUME_SOURCES for t in types):
            raise ValueError(f"admissionPolicy.allowedVolumeTypes: must list some of {', '.join(VOLUME_SOURCES)}, "
                             f"got {types!r}")
        flags = {}
        for key, field in (("enabled", "enabled"), ("allowServiceAccountName", "allow_service_account_name"),
                           ("allowSecretEnv", "allow_secret_env")):
            value = block.get(key, getattr(default, field))
            if not isinstance(value, bool):
                raise ValueError(f"admissionPolicy.{key}: must be true or false, got {value!r}")
            flags[field] = value
        return cls(allowed_volume_types=tuple(types), **flags)


def refusals(job: JESTTrainingJob, policy: AdmissionPolicy) -> list[str]:
    """The messages the chart's policy refuses ``job`` with (empty: admitted), in the policy's order.

    The pods-create check of the author is not among them (it needs the cluster's authorizer).
    """
    if not policy.enabled:
        return []
    template = job.spec.pod_template
    messages: list[str] = []
    forbidden = [source for source in VOLUME_SOURCES if source not in policy.allowed_volume_types]
    refused_volumes = [
        f"{volume.name} ({next(source for source in forbidden if source in volume.sources())})"
        for volume in template.volumes
        if any(source in forbidden for source in volume.sources())
    ]
    if refused_volumes:
        allowed = ", ".join(policy.allowed_volume_types) or "none"
        messages.append(
            f"spec.podTemplate.volumes: {', '.join(refused_volumes)} use volume types this cluster's JEST admission "
            f"policy does not allow (allowed: {allowed}; chart value admissionPolicy.allowedVolumeTypes)"
        )
    if not policy.allow_service_account_name and template.service_account_name:
        messages.append(
            "spec.podTemplate.serviceAccountName: this cluster's JEST admission policy does not let a JESTTrainingJob "
            "choose its pods' ServiceAccount (chart value admissionPolicy.allowServiceAccountName)"
        )
    secret_env = [variable.name for variable in template.env
                  if isinstance(variable.value_from, Mapping) and "secretKeyRef" in variable.value_from]
    if not policy.allow_secret_env and secret_env:
        messages.append(
            f"spec.podTemplate.env: {', '.join(secret_env)} read Secrets (valueFrom.secretKeyRef), which this "
            "cluster's JEST admission policy does not allow (chart value admissionPolicy.allowSecretEnv)"
        )
    return messages
