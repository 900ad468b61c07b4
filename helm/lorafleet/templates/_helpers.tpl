{{/* Labels shared by every object; component is passed in. */}}
{{- define "lorafleet.labels" -}}
app.kubernetes.io/name: lorafleet
app.kubernetes.io/instance: {{ .root.Values.fleetName }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: lorafleet
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* Pods of the InferenceService (predictor and transformer), as KServe labels them. */}}
{{- define "lorafleet.isvcSelector" -}}
matchLabels:
  serving.kserve.io/inferenceservice: {{ .Values.fleetName }}
{{- end -}}

{{/* Pods of the predictor only. */}}
{{- define "lorafleet.predictorSelector" -}}
matchLabels:
  serving.kserve.io/inferenceservice: {{ .Values.fleetName }}
  component: predictor
{{- end -}}

{{/* The container security context of every lorafleet container (uid of the runtime image). */}}
{{- define "lorafleet.securityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop:
  - ALL
readOnlyRootFilesystem: true
runAsGroup: 10001
runAsNonRoot: true
runAsUser: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "lorafleet.podSecurityContext" -}}
fsGroup: 10001
runAsNonRoot: true
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Writable scratch space: the root filesystem is read-only. */}}
{{- define "lorafleet.scratchVolumes" -}}
- emptyDir: {}
  name: tmp
- emptyDir: {}
  name: cache
{{- end -}}

{{- define "lorafleet.scratchMounts" -}}
- mountPath: /tmp
  name: tmp
- mountPath: /home/lorafleet/.cache
  name: cache
{{- end -}}
