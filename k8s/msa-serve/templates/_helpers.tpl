{{- define "msa-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "msa-serve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "msa-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "msa-serve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "msa-serve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
redis://{{ include "msa-serve.fullname" . }}-redis:6379/0
{{- else -}}
{{- required "redis.externalUrl is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{- define "msa-serve.modelPath" -}}
/models/{{ .Values.model.path }}
{{- end -}}

{{/*
A Ray pod: the project's image, the model volume at /models, API keys from the Secret.
Arguments: (dict "root" $ "group" "head"|"cpu-workers"|"gpu-workers" "spec" <group values>)
*/}}
{{- define "msa-serve.rayPod" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "msa-serve.selectorLabels" $root | nindent 4 }}
    msa-serve/group: {{ .group }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq $root.Values.model.source "download" }}
  initContainers:
    - name: download-model
      image: {{ $root.Values.model.download.image }}
      command:
        {{- toYaml $root.Values.model.download.command | nindent 8 }}
      {{- with $root.Values.model.download.env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: model
          mountPath: /models
  {{- end }}
  containers:
    - name: ray-{{ .group }}
      image: {{ include "msa-serve.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if $root.Values.apiKeys.existingSecret }}
      env:
        - name: MSA_SERVE_API_KEYS
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.apiKeys.existingSecret }}
              key: {{ $root.Values.apiKeys.key }}
      {{- end }}
      resources:
        {{- $resources := deepCopy .spec.resources }}
        {{- if eq .group "gpu-workers" }}
        {{- $_ := set $resources.limits "nvidia.com/gpu" (.spec.gpusPerPod | toString) }}
        {{- $_ := set $resources.requests "nvidia.com/gpu" (.spec.gpusPerPod | toString) }}
        {{- end }}
        {{- toYaml $resources | nindent 8 }}
      # Ready once this pod's Serve proxy answers the app's /health; liveness stays KubeRay's.
      readinessProbe:
        httpGet: {path: /health, port: {{ $root.Values.service.httpPort }}}
        periodSeconds: 10
        failureThreshold: 3
      {{- if eq .group "head" }}
      ports:
        - {containerPort: 6379, name: gcs}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        - {containerPort: {{ $root.Values.service.httpPort }}, name: serve}
        - {containerPort: {{ $root.Values.service.grpcPort }}, name: grpc}
      {{- end }}
      volumeMounts:
        - name: model
          mountPath: /models
          readOnly: {{ eq $root.Values.model.source "pvc" }}
          {{- with $root.Values.model.pvc.subPath }}
          subPath: {{ . }}
          {{- end }}
        - name: shm
          mountPath: /dev/shm
  volumes:
    - name: model
      {{- if eq $root.Values.model.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ $root.Values.model.pvc.claimName }}
        readOnly: true
      {{- else }}
      emptyDir:
        sizeLimit: {{ $root.Values.model.download.sizeLimit }}
      {{- end }}
    - name: shm  # Ray's object store lives in shared memory
      emptyDir:
        medium: Memory
  {{- with .spec.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .spec.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* serveConfigV2: files/serve_config.yaml with the cluster's facts and .Values.app merged in. */}}
{{- define "msa-serve.serveConfig" -}}
{{- $config := .Files.Get "files/serve_config.yaml" | fromYaml -}}
{{- $app := index $config.applications 0 -}}
{{- $args := mergeOverwrite (deepCopy $app.args) (deepCopy .Values.app) -}}
{{- $model := $args.model -}}
{{- $engine := $model.engine -}}
{{- $_ := set $engine "model" (include "msa-serve.modelPath" .) -}}
{{- $_ := set $engine "device" "cuda" -}}
{{- with .Values.model.servedModelName }}{{ $_ := set $engine "served_model_name" . }}{{ end -}}
{{- $replicas := .Values.modelReplicas -}}
{{- $ranks := $replicas.tensorParallelSize | default 1 | int -}}
{{- if gt $ranks (.Values.gpuWorkers.gpusPerPod | int) -}}
{{- fail (printf "modelReplicas.tensorParallelSize (%d) exceeds gpuWorkers.gpusPerPod (%d): a replica's ranks share one node" $ranks (.Values.gpuWorkers.gpusPerPod | int)) -}}
{{- end -}}
{{- $_ := set $engine "tensor_parallel_size" $ranks -}}
{{- $_ := set $engine "expert_parallel" ($replicas.expertParallel | default false) -}}
{{- $_ := set $model "num_gpus" $replicas.gpusPerReplica -}}
{{- $_ := set $model "num_cpus" $replicas.cpusPerReplica -}}
{{- $_ := set $model "max_ongoing_requests" $replicas.maxOngoingRequests -}}
{{- if $replicas.autoscaling -}}
{{- $_ := set $model "autoscaling" (dict "min_replicas" $replicas.autoscaling.minReplicas "max_replicas" $replicas.autoscaling.maxReplicas "target_ongoing_requests" $replicas.autoscaling.targetOngoingRequests) -}}
{{- $_ := set $model "num_replicas" nil -}}
{{- else -}}
{{- $_ := set $model "num_replicas" $replicas.numReplicas -}}
{{- end -}}
{{- $_ := set $args.redis "url" (include "msa-serve.redisUrl" .) -}}
{{- $_ := set $app "args" $args -}}
{{- $_ := set $config "proxy_location" "EveryNode" -}}
{{- $_ := set $config.http_options "host" "0.0.0.0" -}}
{{- $_ := set $config.http_options "port" .Values.service.httpPort -}}
{{- $_ := set $config.grpc_options "port" .Values.service.grpcPort -}}
{{- toYaml $config -}}
{{- end -}}
