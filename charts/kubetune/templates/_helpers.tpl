{{- define "kubetune.name" -}}kubetune{{- end -}}

{{- define "kubetune.fullname" -}}
{{- if contains "kubetune" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-kubetune" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kubetune.labels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: kubetune
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "kubetune.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ default .Chart.AppVersion .Values.operator.image.tag }}
{{- end -}}

{{- define "kubetune.trainerImage" -}}
{{ .Values.trainer.image.repository }}:{{ default .Chart.AppVersion .Values.trainer.image.tag }}
{{- end -}}

{{/* Rules on namespaced resources: the FineTuneJobs, their children, pods and events. */}}
{{- define "kubetune.namespacedRules" -}}
# Each verb and why (docs/security.md; tests/operator/test_rbac.py runs the operator with exactly these):
# finetunejobs: list+watch (kopf's watch and index), get (kopf re-reads an object), patch (kopf removes the
#   metadata.finalizers entry that operators with a per-job timer set; the operator never writes spec or annotations)
- apiGroups: [kubetune.io]
  resources: [finetunejobs]
  verbs: [get, list, watch, patch]
# finetunejobs/status: patch (the operator's only write: status, as a merge patch)
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status]
  verbs: [patch]
# jobs: list+watch (index), create (one per attempt), get (a create that conflicts: is it ours?),
#   patch (spec.suspend for suspend/resume)
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
# configmaps: create (the trainer config), get (a create that conflicts: is it ours?)
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create]
# services: create (the headless Service of a multi-node attempt: torchrun's rendezvous on pod 0), get (a
#   create that conflicts: is it ours?)
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# jobsets: list+watch (index), create (a multi-node attempt where the cluster serves jobset.x-k8s.io), get (a
#   create that conflicts: is it ours?), patch (spec.suspend for suspend/resume); unused without JobSet
- apiGroups: [jobset.x-k8s.io]
  resources: [jobsets]
  verbs: [get, list, watch, create, patch]
# pods: list+watch (index: GPUs in use per node, trainer pods' exit codes and IPs)
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# events: create (an Event per transition, posted by kopf)
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.ha.enabled }}
# kopfpeerings: kopf's peering (one active replica)
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end -}}
