{{/*
Names, labels and the derived values every template shares. Names are truncated to 63
characters (the DNS label limit) and never end in "-".
*/}}

{{- define "elasticd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "elasticd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The bundled etcd's names leave room for "-etcd-headless" and the pod ordinal. */}}
{{- define "elasticd.etcd.fullname" -}}
{{- printf "%s-etcd" (include "elasticd.fullname" . | trunc 40 | trimSuffix "-") -}}
{{- end -}}

{{- define "elasticd.etcd.headless" -}}
{{- printf "%s-headless" (include "elasticd.etcd.fullname" .) -}}
{{- end -}}

{{- define "elasticd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "elasticd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "elasticd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "elasticd.labels" -}}
helm.sh/chart: {{ include "elasticd.chart" . }}
{{ include "elasticd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: elasticd
{{- end -}}

{{/* Selector of the elasticd pods (component "node") and of the bundled etcd ("etcd"). */}}
{{- define "elasticd.node.selectorLabels" -}}
{{ include "elasticd.selectorLabels" . }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "elasticd.etcd.selectorLabels" -}}
{{ include "elasticd.selectorLabels" . }}
app.kubernetes.io/component: etcd
{{- end -}}

{{- define "elasticd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "elasticd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "elasticd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "elasticd.runId" -}}
{{- default .Release.Name .Values.runId -}}
{{- end -}}

{{- define "elasticd.nprocPerNode" -}}
{{- if .Values.nprocPerNode -}}
{{- .Values.nprocPerNode | int -}}
{{- else -}}
{{- max 1 (.Values.gpu.count | int) -}}
{{- end -}}
{{- end -}}

{{/* Kubernetes SIGKILLs after this: the drain timeout plus a margin, whole seconds. */}}
{{- define "elasticd.terminationGracePeriodSeconds" -}}
{{- add (ceil .Values.drain.timeoutSeconds | int) (.Values.drain.graceMarginSeconds | int) -}}
{{- end -}}

{{/* Where the elasticd pods mount etcd's CA and their client certificate. */}}
{{- define "elasticd.etcd.tlsDir" -}}/etc/elasticd-tls/etcd{{- end -}}

{{/*
Securing the bundled etcd (docs/kubernetes.md): "true" when it serves TLS and requires client
certificates, "" otherwise (plain HTTP, or an external etcd).
*/}}
{{- define "elasticd.etcd.bundledTls" -}}
{{- if and (eq .Values.etcd.mode "bundled") .Values.etcd.bundled.tls.enabled -}}true{{- end -}}
{{- end -}}

{{- define "elasticd.etcd.scheme" -}}
{{- if include "elasticd.etcd.bundledTls" . -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* Where the etcd pods mount their server (and peer) certificate. */}}
{{- define "elasticd.etcd.serverTlsDir" -}}/etc/etcd/tls{{- end -}}

{{/* The bundled etcd's certificate Secrets: the given ones, or those the chart generates. */}}
{{- define "elasticd.etcd.serverTlsSecret" -}}
{{- default (printf "%s-server-tls" (include "elasticd.etcd.fullname" .)) .Values.etcd.bundled.tls.existingSecret -}}
{{- end -}}

{{- define "elasticd.etcd.clientTlsSecret" -}}
{{- default (printf "%s-client-tls" (include "elasticd.etcd.fullname" .)) .Values.etcd.bundled.tls.existingClientSecret -}}
{{- end -}}

{{/*
The Secret the elasticd pods mount at elasticd.etcd.tlsDir, as JSON {secretName, caKey, certKey,
keyKey} (certKey/keyKey empty: no client certificate), or {} for none: the bundled etcd's client
certificate, or etcd.external.tls.
*/}}
{{- define "elasticd.etcd.clientTls" -}}
{{- $etcd := .Values.etcd -}}
{{- if include "elasticd.etcd.bundledTls" . -}}
{{- toJson (dict "secretName" (include "elasticd.etcd.clientTlsSecret" .) "caKey" "ca.crt" "certKey" "tls.crt" "keyKey" "tls.key") -}}
{{- else if and (eq $etcd.mode "external") $etcd.external.tls.secretName -}}
{{- toJson $etcd.external.tls -}}
{{- else -}}
{{- toJson dict -}}
{{- end -}}
{{- end -}}

{{/*
DNS names of the bundled etcd's server certificate, as a JSON list: each member's name first
(a connecting peer's certificate must name its address, and etcd checks the names in order),
the members under a wildcard, both Services in every namespace form, and localhost.
*/}}
{{- define "elasticd.etcd.serverNames" -}}
{{- $name := include "elasticd.etcd.fullname" . -}}
{{- $headless := include "elasticd.etcd.headless" . -}}
{{- $ns := .Release.Namespace -}}
{{- $suffixes := list "" (printf ".%s" $ns) (printf ".%s.svc" $ns) (printf ".%s.svc.%s" $ns .Values.clusterDomain) -}}
{{- $names := list -}}
{{- range $i := until (.Values.etcd.bundled.replicas | int) -}}
{{- $names = append $names (printf "%s-%d.%s%s" $name $i $headless (last $suffixes)) -}}
{{- end -}}
{{- range $suffix := rest $suffixes -}}
{{- $names = append $names (printf "*.%s%s" $headless $suffix) -}}
{{- end -}}
{{- range $service := list $name $headless -}}
{{- range $suffix := $suffixes -}}
{{- $names = append $names (printf "%s%s" $service $suffix) -}}
{{- end -}}
{{- end -}}
{{- append $names "localhost" | toJson -}}
{{- end -}}

{{/* The job config inside the pod: elasticd runs it, elasticctl --config reads it. */}}
{{- define "elasticd.configDir" -}}/etc/elasticd{{- end -}}
{{- define "elasticd.configPath" -}}{{ include "elasticd.configDir" . }}/config.yaml{{- end -}}

{{/* Client URLs of etcd, one per bundled member (failover), or the external ones. */}}
{{- define "elasticd.etcd.endpoints" -}}
{{- $endpoints := list -}}
{{- if eq .Values.etcd.mode "bundled" -}}
{{- $name := include "elasticd.etcd.fullname" . -}}
{{- $domain := printf "%s.%s.svc.%s" (include "elasticd.etcd.headless" .) .Release.Namespace .Values.clusterDomain -}}
{{- range $i := until (.Values.etcd.bundled.replicas | int) -}}
{{- $endpoints = append $endpoints (printf "%s://%s-%d.%s:2379" (include "elasticd.etcd.scheme" $) $name $i $domain) -}}
{{- end -}}
{{- else -}}
{{- $endpoints = .Values.etcd.external.endpoints -}}
{{- end -}}
{{- toJson $endpoints -}}
{{- end -}}

{{/*
The elasticd config document: the `config` value with the chart-owned keys filled in. Keys
the chart owns win; the schema rejects them inside `config`, so nothing is silently dropped.
*/}}
{{- define "elasticd.config" -}}
{{- $v := .Values -}}
{{- $doc := deepCopy ($v.config | default dict) -}}
{{- $_ := set $doc "run_id" (include "elasticd.runId" .) -}}
{{- $_ = set $doc "run_dir" $v.runDir.path -}}
{{- $_ = set $doc "nproc_per_node" (include "elasticd.nprocPerNode" . | int) -}}
{{- $_ = set $doc "nodes" (merge (dict "min" $v.nodes.min "max" $v.nodes.max) (get $doc "nodes" | default dict)) -}}
{{- $_ = set $doc "drain" (dict "timeout_seconds" $v.drain.timeoutSeconds) -}}
{{- $_ = set $doc "metrics" (dict "bind" "0.0.0.0" "port" $v.metrics.port) -}}
{{- $etcd := dict "endpoints" (include "elasticd.etcd.endpoints" . | fromJsonArray) -}}
{{- $tls := include "elasticd.etcd.clientTls" . | fromJson -}}
{{- if $tls -}}
{{- $dir := include "elasticd.etcd.tlsDir" . -}}
{{- $_ = set $etcd "tls_ca" (printf "%s/%s" $dir $tls.caKey) -}}
{{- if $tls.certKey -}}
{{- $_ = set $etcd "tls_cert" (printf "%s/%s" $dir $tls.certKey) -}}
{{- $_ = set $etcd "tls_key" (printf "%s/%s" $dir $tls.keyKey) -}}
{{- end -}}
{{- end -}}
{{- $_ = set $doc "etcd" (merge $etcd (get $doc "etcd" | default dict)) -}}
{{- $ckpt := dict -}}
{{- if eq $v.checkpoint.storage "s3" -}}
{{- $_ = set $ckpt "url" $v.checkpoint.s3.url -}}
{{- $options := dict -}}
{{- if $v.checkpoint.s3.endpointUrl -}}
{{- $_ = set $options "endpoint_url" $v.checkpoint.s3.endpointUrl -}}
{{- end -}}
{{- if $v.checkpoint.s3.region -}}
{{- $_ = set $options "client_kwargs" (dict "region_name" $v.checkpoint.s3.region) -}}
{{- end -}}
{{- if $options -}}
{{- $_ = set $ckpt "storage_options" $options -}}
{{- end -}}
{{- else -}}
{{- $_ = set $ckpt "url" $v.checkpoint.pvc.mountPath -}}
{{- end -}}
{{- $_ = set $doc "checkpoint" (merge $ckpt (get $doc "checkpoint" | default dict)) -}}
{{- toPrettyJson $doc -}}
{{- end -}}

{{/* What a schema cannot check: relations between values. Included by the StatefulSet. */}}
{{- define "elasticd.validate" -}}
{{- $v := .Values -}}
{{- if gt ($v.nodes.min | int) ($v.nodes.max | int) -}}
{{- fail (printf "nodes.min=%v must be <= nodes.max=%v" $v.nodes.min $v.nodes.max) -}}
{{- end -}}
{{- $replicas := $v.replicas | int -}}
{{- if and (ne $replicas 0) (or (lt $replicas ($v.nodes.min | int)) (gt $replicas ($v.nodes.max | int))) -}}
{{- fail (printf "replicas=%v must lie in nodes.min..nodes.max (%v..%v), or be 0" $v.replicas $v.nodes.min $v.nodes.max) -}}
{{- end -}}
{{- if eq $v.etcd.mode "external" -}}
{{- if not $v.etcd.external.endpoints -}}
{{- fail "etcd.mode=external needs etcd.external.endpoints" -}}
{{- end -}}
{{- $tls := $v.etcd.external.tls -}}
{{- if and $tls.secretName (ne (empty $tls.certKey) (empty $tls.keyKey)) -}}
{{- fail "etcd.external.tls.certKey and keyKey must be given together (or both empty)" -}}
{{- end -}}
{{- else if $v.etcd.external.endpoints -}}
{{- fail "etcd.external.endpoints is set but etcd.mode=bundled: set etcd.mode=external" -}}
{{- else -}}
{{- include "elasticd.validate.etcdHistory" . -}}
{{- include "elasticd.validate.etcdTls" . -}}
{{- end -}}
{{- if eq $v.checkpoint.storage "s3" -}}
{{- if not (hasPrefix "s3://" $v.checkpoint.s3.url) -}}
{{- fail (printf "checkpoint.storage=s3 needs checkpoint.s3.url=s3://BUCKET/PREFIX (got %q)" $v.checkpoint.s3.url) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The bundled etcd must hold the run's rounds (docs/kubernetes.md, "etcd sizing"). Keep-alives
write nothing (liveness is the node lease) and steady state writes next to nothing, so history
follows rounds, not time: a round writes N joins + an open and a close record (N + 2 revisions).
- The closed round record names every participant and goes to etcd in one transaction, which
  must fit etcd's --max-request-bytes (the chart leaves etcd's default, 1.5 MiB): nodes.max x
  (63-character pod name + 3) + 1 KiB for the rest of the record and the transaction.
- Compaction must stay on (retention 0 keeps every round forever).
- A burst of rounds (a crash loop, a resize storm; bounded as one round per 5 s) must fit the
  quota until the next compaction: periodic compaction runs every min(retention, 1h) and keeps
  the retention's history, so up to retention + min(retention, 1h) of rounds, each costing
  768 B per node (join put, its deletion, its name in the closed record; measured 290 B with the
  chart's pod names, 643 B with 63-character names and a 53-character run id).
*/}}
{{- define "elasticd.validate.etcdHistory" -}}
{{- $v := .Values -}}
{{- $e := $v.etcd.bundled -}}
{{- $maxRequestBytes := 1572864 -}}
{{- $recordBytes := add (mul ($v.nodes.max | int) 66) 1024 -}}
{{- if gt $recordBytes $maxRequestBytes -}}
{{- fail (printf "nodes.max=%v: the closed round record (nodes.max x 66 B + 1 KiB = %d B) would exceed the bundled etcd's --max-request-bytes=%d; at most %d nodes (docs/kubernetes.md, etcd sizing)" $v.nodes.max $recordBytes $maxRequestBytes (div (sub $maxRequestBytes 1024) 66)) -}}
{{- end -}}
{{- $r := toString $e.autoCompactionRetention -}}
{{- $seconds := 0.0 -}}
{{- if hasSuffix "s" $r -}}
{{- $seconds = float64 (trimSuffix "s" $r) -}}
{{- else if hasSuffix "m" $r -}}
{{- $seconds = mulf (float64 (trimSuffix "m" $r)) 60 -}}
{{- else -}}
{{- $seconds = mulf (float64 (trimSuffix "h" $r)) 3600 -}}
{{- end -}}
{{- if eq $seconds 0.0 -}}
{{- fail (printf "etcd.bundled.autoCompactionRetention=%s: 0 turns compaction off and every round's writes stay until etcd's quota stops all writes" $r) -}}
{{- end -}}
{{- $rounds := divf (addf $seconds (minf $seconds 3600)) 5 -}}
{{- $peak := mulf $rounds 768 (float64 $v.nodes.max) -}}
{{- if gt $peak (float64 $e.quotaBackendBytes) -}}
{{- fail (printf "nodes.max=%v with etcd.bundled.autoCompactionRetention=%s: a burst of rounds (one per 5 s) until compaction would write about %.2f GB ((retention + min(retention, 1h)) / 5 s x nodes.max x 768 B), over etcd.bundled.quotaBackendBytes=%v; shorten the retention or raise the quota (docs/kubernetes.md, etcd sizing)" $v.nodes.max $r (divf $peak 1e9) ($e.quotaBackendBytes | int64)) -}}
{{- end -}}
{{- end -}}

{{/* The bundled etcd's certificates: both Secrets given, or neither (the chart's). */}}
{{- define "elasticd.validate.etcdTls" -}}
{{- $tls := .Values.etcd.bundled.tls -}}
{{- if and (not $tls.enabled) (or $tls.existingSecret $tls.existingClientSecret) -}}
{{- fail "etcd.bundled.tls.existingSecret/existingClientSecret are set but etcd.bundled.tls.enabled=false: the bundled etcd would serve plain HTTP" -}}
{{- end -}}
{{- if ne (empty $tls.existingSecret) (empty $tls.existingClientSecret) -}}
{{- fail "etcd.bundled.tls.existingSecret and existingClientSecret must be given together (the server's certificate and the daemons' client certificate, from one CA), or both empty for the chart's own" -}}
{{- end -}}
{{- end -}}
