{{/*
The operator's permissions, split by where they can be granted.
Keep these in step with jest_operator.kube.REQUIRED_PERMISSIONS: tests/integration/test_helm_chart.py
fails when a required permission is missing or when anything beyond it is granted. The chart README
has the table (resource -> verbs -> why).
*/}}

{{/* Rules on namespaced resources: a Role per watched namespace, or one ClusterRole when watching all. */}}
{{- define "jest-operator.namespacedRules" -}}
- apiGroups: ["jest.training"]
  resources: ["jesttrainingjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["jest.training"]
  resources: ["jesttrainingjobs/status"]
  verbs: ["get", "patch"]
{{- /* Children carry ownerReferences with blockOwnerDeletion: true; OwnerReferencesPermissionEnforcement
       admits that only for clients that may update the owner's finalizers. */}}
- apiGroups: ["jest.training"]
  resources: ["jesttrainingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and (include "jest-operator.peeringEnabled" .) .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}
{{- end }}

{{/* Rules on cluster-scoped resources: always a ClusterRole. */}}
{{- define "jest-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if and (include "jest-operator.peeringEnabled" .) (not .Values.watchNamespaces) }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}
{{- end }}
