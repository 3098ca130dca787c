{{/*
Naming and labelling helpers shared by every template.
selectorLabels are a strict subset of labels and never change between releases: Deployment selectors
are immutable, so anything version-like stays out of them.
*/}}

{{/* The chart name, or nameOverride; truncated to a DNS label. */}}
{{- define "jest-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name: fullnameOverride, else "<release>-<name>" (just "<release>" when the
release name already contains the chart name). Truncated to 63 characters (the DNS label limit).
*/}}
{{- define "jest-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "jest-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels of every object the chart renders. The managed-by label says Helm: the value
"jest-operator" is reserved for the trainer pods the operator creates (the PodMonitor selects on it).
*/}}
{{- define "jest-operator.labels" -}}
helm.sh/chart: {{ include "jest-operator.chart" . }}
{{ include "jest-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jest-operator
{{- end }}

{{/* Immutable selector labels: name + instance only. */}}
{{- define "jest-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jest-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "jest-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jest-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference; the tag defaults to the chart's appVersion. */}}
{{- define "jest-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* True (non-empty) when the operator runs as a Kopf peering group (replicas > 1). */}}
{{- define "jest-operator.peeringEnabled" -}}
{{- if gt (int .Values.replicas) 1 }}true{{- end }}
{{- end }}

{{/* Name of the Kopf peering object(s). */}}
{{- define "jest-operator.peeringName" -}}
{{- default (include "jest-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* The resource-policy annotation for cluster-scoped definitions that must outlive the release. */}}
{{- define "jest-operator.keepAnnotation" -}}
{{- if .Values.crds.keep }}
helm.sh/resource-policy: keep
{{- end }}
{{- end }}

{{/*
Init-container script that creates the Kopf peering object(s) if missing (idempotent: 409 is success).
It runs with the operator image, which ships the kubernetes client; names come from the environment.
*/}}
{{- define "jest-operator.peeringInitScript" -}}
import os
from kubernetes import client, config
from kubernetes.client.rest import ApiException

config.load_config()
api = client.CustomObjectsApi()
name = os.environ["KOPF_RUN_PEERING"]
for namespace in os.environ.get("JEST_PEERING_NAMESPACES", "").split() or [None]:
    kind = "KopfPeering" if namespace else "ClusterKopfPeering"
    body = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
    try:
        if namespace:
            api.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", body)
        else:
            api.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
        print(f"created {kind} {name} {namespace or ''}", flush=True)
    except ApiException as error:
        if error.status != 409:
            raise
        print(f"found {kind} {name} {namespace or ''}", flush=True)
{{- end }}

{{/*
Kopf pauses every replica that sees a live peer with the same priority, so each replica draws its own
random priority at start; the highest one works, the others stand by.
*/}}
{{- define "jest-operator.priorityWrapper" -}}
exec jest-operator "$@" --priority="$(python3 -c 'import secrets; print(secrets.randbelow(1000000) + 1)')"
{{- end }}

{{/*
Every volume source a JESTTrainingJob's podTemplate can express (jest_operator.api.VOLUME_SOURCES; a test
fails on drift), as a JSON list: the admission policy refuses those outside admissionPolicy.allowedVolumeTypes.
*/}}
{{- define "jest-operator.volumeSources" -}}
["persistentVolumeClaim", "emptyDir", "configMap", "secret", "csi", "ephemeral", "projected", "downwardAPI"]
{{- end }}
