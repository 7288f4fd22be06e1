"""Kubernetes manifests: every overlay renders, validates against the Kubernetes schemas, passes
checkov (any skipped check carries its reason beside the resource), and agrees with the client's
defaults and the pod entrypoint's TF_CONFIG."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT
from dist_caption import cluster
from dist_caption.cluster import PEER_LOST, PREEMPTED
from serving import client

K8S = os.path.join(ROOT, "k8s")
SERVING = ["cpu", "gpu", "cpu-xla", "gpu-xla", "cpu-object-store", "canary"]
TRAINING = ["training", "training/overlays/gpu"]
OBJECT_STORE_TRAINING = "training/overlays/object-store"
# Each JobSet variant and the Indexed Job variant whose pods it runs.
JOBSET_OF = {"training/jobset": "training", "training/overlays/gpu-jobset": "training/overlays/gpu",
             "training/overlays/object-store-jobset": OBJECT_STORE_TRAINING}
JOBSET_TRAINING = list(JOBSET_OF)
ALL_TRAINING = TRAINING + [OBJECT_STORE_TRAINING] + JOBSET_TRAINING
TOOLS = ["serving/tools", "serving/monitoring"]
KUSTOMIZATIONS = [f"serving/overlays/{o}" for o in SERVING] + ALL_TRAINING + TOOLS
# Kinds defined by a CustomResourceDefinition: the Kubernetes schemas of kubernetes-validate do
# not have them, so test_service_monitor_* and test_jobset_* check them against the CRD's
# documented fields (a JobSet's Job templates are validated as batch/v1 Jobs).
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"),
             ("jobset.x-k8s.io/v1alpha2", "JobSet")}
CHECKOV = os.path.join(ROOT, ".venv", "checkov", "bin", "checkov")

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None,
                                   reason="no `kubectl` on PATH to render the kustomizations")


def render(path: str) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", os.path.join(K8S, path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("no `kubectl` on PATH to render the kustomizations")
    return {path: render(path) for path in KUSTOMIZATIONS}


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind
               and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


def args_of(objects: list[dict]) -> list[str]:
    deployment = find(objects, "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]["args"]


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schemas(rendered, path):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    version = latest_version()
    for obj in rendered[path]:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)
        for job in jobset_jobs(obj):
            kubernetes_validate.validate(job, version, strict=True)
        assert obj["metadata"].get("namespace") == "dist-caption" or obj["kind"] == "Namespace"


def jobset_jobs(obj: dict) -> list[dict]:
    """The first child Job of each replicated job of a JobSet, as the controller names it
    (<jobset>-<replicatedJob>-<index>), a batch/v1 Job; none for other objects."""
    if obj["kind"] != "JobSet":
        return []
    return [{"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {**rj["template"].get("metadata", {}),
                          "name": f"{obj['metadata']['name']}-{rj['name']}-0",
                          "namespace": obj["metadata"]["namespace"]},
             "spec": rj["template"]["spec"]} for rj in obj["spec"]["replicatedJobs"]]


def pod_templates(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(owner, pod template) for every pod the objects make: a Deployment's or a Job's template,
    the template of each of a JobSet's replicated jobs, a Pod itself."""
    out = []
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            out.append((obj, obj["spec"]["template"]))
        elif obj["kind"] == "JobSet":
            out += [(obj, rj["template"]["spec"]["template"])
                    for rj in obj["spec"]["replicatedJobs"]]
        elif obj["kind"] == "Pod":
            out.append((obj, obj))
    return out


@needs_kubectl
def test_serving_has_every_piece(rendered):
    objects = rendered["serving/overlays/cpu"]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["Namespace", "PersistentVolumeClaim", "ConfigMap", "Service",
                            "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                            "NetworkPolicy"])
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    import tensorflow as tf

    # The server runs the TensorFlow version the export is written with.
    assert container["image"] == f"tensorflow/serving:{tf.__version__.split('-')[0]}"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # The metadata of the model answers only once a version is loaded.
        assert container[probe]["httpGet"]["path"] == "/v1/models/caption/metadata"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    args = args_of(objects)
    assert "--enable_batching=true" in args
    assert not any("xla" in a for a in args)
    service = find(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    policy = find(objects, "NetworkPolicy")
    assert sorted(p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]) == [
        8500, 8501]
    assert find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == \
        find(objects, "Deployment")["metadata"]["name"]


@needs_kubectl
def test_manifests_match_the_clients_defaults(rendered):
    objects = rendered["serving/overlays/cpu"]
    service = find(objects, "Service")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports["grpc"] == int(client.DEFAULT_SERVER.rsplit(":", 1)[1])
    assert ports["http"] == 8501
    annotations = service["metadata"]["annotations"]
    assert annotations["dist-caption.io/model-name"] == client.DEFAULT_MODEL_NAME
    assert annotations["dist-caption.io/signature"] == client.DEFAULT_SIGNATURE
    config = find(objects, "ConfigMap")["data"]
    assert re.search(r'name: "(\w+)"', config["models.config"]).group(1) == \
        client.DEFAULT_MODEL_NAME
    assert "max_batch_size { value: 64 }" in config["batching.config"]
    container = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 8500,
                                                                           "http": 8501}
    assert "--port=8500" in container["args"] and "--rest_api_port=8501" in container["args"]


@needs_kubectl
def test_xla_overlays_set_the_xla_flag_and_gpu_overlays_ask_for_gpus(rendered):
    assert "--xla_cpu_compilation_enabled=true" in args_of(rendered["serving/overlays/cpu-xla"])
    assert "--xla_gpu_compilation_enabled=true" in args_of(rendered["serving/overlays/gpu-xla"])
    for overlay in ("gpu", "gpu-xla"):
        container = find(rendered[f"serving/overlays/{overlay}"], "Deployment")[
            "spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["image"].endswith("-gpu")
    config = find(rendered["serving/overlays/cpu-object-store"], "ConfigMap")["data"]
    assert 'base_path: "gs://' in config["models.config"]


def _batching(objects: list[dict], tmp_path) -> dict:
    from serving.local_server.batching import read_batching_parameters

    path = tmp_path / f"batching-{len(list(tmp_path.iterdir()))}.config"
    path.write_text(find(objects, "ConfigMap")["data"]["batching.config"])
    return read_batching_parameters(str(path))


@needs_kubectl
def test_memory_request_and_limit_are_derived_from_the_measured_model(rendered):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from serving_memory import memory_settings

    with open(os.path.join(ROOT, "benchmarks", "results", "serving_memory.json")) as f:
        measured = json.load(f)
    assert measured["memory_settings"] == memory_settings(measured)
    for overlay in ("cpu", "cpu-xla", "canary", "cpu-object-store"):
        resources = find(rendered[f"serving/overlays/{overlay}"], "Deployment")[
            "spec"]["template"]["spec"]["containers"][0]["resources"]
        assert {k: resources[k]["memory"] for k in ("requests", "limits")} == \
            measured["memory_settings"], overlay


@needs_kubectl
def test_xla_overlays_batch_only_the_sizes_the_export_warms_up(rendered, tmp_path):
    from dist_caption import exporting
    from dist_caption.data import images

    for overlay in ("cpu-xla", "gpu-xla"):
        params = _batching(rendered[f"serving/overlays/{overlay}"], tmp_path)
        assert params["allowed_batch_sizes"] == exporting.DEFAULT_WARMUP_BATCH_SIZES
        # The last allowed size is max_batch_size (or TF Serving refuses the load), and the
        # largest merged batch is one the export's default --max_batch accepts.
        assert params["max_batch_size"] == images.MAX_BATCH == params["allowed_batch_sizes"][-1]
    for overlay in ("cpu", "gpu"):
        assert _batching(rendered[f"serving/overlays/{overlay}"], tmp_path)[
            "allowed_batch_sizes"] == ()


@needs_kubectl
def test_canary_overlay_labels_two_versions_and_allows_labels_before_they_load(rendered,
                                                                              tmp_path):
    from serving.local_server.loading import read_model_config

    objects = rendered["serving/overlays/canary"]
    config = tmp_path / "models.config"
    config.write_text(find(objects, "ConfigMap")["data"]["models.config"])
    settings = read_model_config(str(config))
    assert settings["versions"] == (1, 2)
    assert settings["labels"] == {"stable": 1, "canary": 2}
    assert settings["name"] == client.DEFAULT_MODEL_NAME
    # Every pod of a rollout starts with the labels in its first config.
    assert "--allow_version_labels_for_unavailable_models=true" in args_of(objects)
    assert args_of(objects)[:-1] == args_of(rendered["serving/overlays/cpu"])


@needs_kubectl
def test_the_publisher_pod_writes_where_the_servers_read(rendered):
    from serving import config

    pod = find(rendered["serving/tools"], "Pod")
    assert pod["metadata"]["name"] == config.DEFAULT_POD
    assert pod["metadata"]["namespace"] == config.DEFAULT_NAMESPACE
    serving = rendered["serving/overlays/cpu"]
    served = find(serving, "Deployment")["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    container = pod["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert claims["models"] == served["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert not mount.get("readOnly")
    base_path = re.search(r'base_path: "([^"]+)"',
                          find(serving, "ConfigMap")["data"]["models.config"]).group(1)
    assert mount["mountPath"] == os.path.dirname(base_path)
    # Files it writes belong to the user and group the serving pods read as.
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert pod["spec"]["securityContext"][key] == served["securityContext"][key]


# The ServiceMonitor fields, as documented by the Prometheus Operator's CRD
# (example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml, operator 0.84):
# the subset used here, each with its type.
SERVICE_MONITOR_SPEC = {"selector": dict, "namespaceSelector": dict, "endpoints": list,
                        "jobLabel": str, "targetLabels": list, "podTargetLabels": list,
                        "sampleLimit": int}
SERVICE_MONITOR_ENDPOINT = {"port": str, "targetPort": (str, int), "path": str, "scheme": str,
                            "interval": str, "scrapeTimeout": str, "honorLabels": bool}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                      r"(([0-9]+)s)?(([0-9]+)ms)?)$")


@needs_kubectl
def test_service_monitor_fields_match_the_crd_and_scrape_the_metrics_endpoint(rendered):
    monitor = find(rendered["serving/monitoring"], "ServiceMonitor")
    assert (monitor["apiVersion"], monitor["kind"]) in CRD_KINDS
    spec = monitor["spec"]
    assert set(spec) <= set(SERVICE_MONITOR_SPEC) and "selector" in spec
    for key, value in spec.items():
        assert isinstance(value, SERVICE_MONITOR_SPEC[key]), key
    serving = rendered["serving/overlays/cpu"]
    service = find(serving, "Service")
    # It selects the serving Service, in its namespace, by labels the Service carries.
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert spec["namespaceSelector"] == {"matchNames": [service["metadata"]["namespace"]]}
    metrics = re.search(r'path: "([^"]+)"',
                        find(serving, "ConfigMap")["data"]["monitoring.config"]).group(1)
    annotations = find(serving, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= set(SERVICE_MONITOR_ENDPOINT)
        for key, value in endpoint.items():
            assert isinstance(value, SERVICE_MONITOR_ENDPOINT[key]), key
        assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
        assert endpoint["path"] == metrics == annotations["prometheus.io/path"]
        # The REST port: the same one the plain prometheus.io annotations name.
        assert ports[endpoint["port"]] == int(annotations["prometheus.io/port"]) == 8501
    assert annotations["prometheus.io/scrape"] == "true"


@needs_kubectl
@pytest.mark.parametrize("path", TRAINING)
def test_training_job_builds_tf_config_from_its_index(rendered, path):
    objects = rendered[path]
    job = find(objects, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    service = find(objects, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["DIST_CAPTION_WORKERS"]) == spec["completions"]
    assert env["DIST_CAPTION_JOB_NAME"] == job["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert service["spec"]["ports"][0]["port"] == int(env["DIST_CAPTION_PORT"])
    workers = spec["completions"]
    for index in range(workers):
        config = cluster.pod_tf_config({**env, "JOB_COMPLETION_INDEX": str(index)})
        # Kubernetes names Indexed Job pods <job>-<index>, resolvable under the subdomain.
        assert config == {"cluster": {"worker": [
            f"caption-train-{i}.caption-train-workers:2222" for i in range(workers)]},
            "task": {"type": "worker", "index": index}}
    # Checkpoints on the shared run volume, the export where the serving Deployment reads.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert env["DIST_CAPTION_MODEL_DIR"].startswith(mounts["runs"] + "/")
    assert claims["runs"] == find(objects, "PersistentVolumeClaim", "caption-runs")[
        "metadata"]["name"]
    serving = rendered["serving/overlays/cpu"]
    served_claim = find(serving, "Deployment")["spec"]["template"]["spec"]["volumes"][0]
    assert claims["models"] == served_claim["persistentVolumeClaim"]["claimName"]
    base_path = re.search(r'base_path: "([^"]+)"',
                          find(serving, "ConfigMap")["data"]["models.config"]).group(1)
    assert env["DIST_CAPTION_EXPORT_BASE"] == base_path
    assert mounts["models"] == "/models" == os.path.dirname(base_path)


@needs_kubectl
def test_object_store_overlays_need_no_shared_volume_and_meet_at_the_bucket(rendered):
    training = rendered[OBJECT_STORE_TRAINING]
    serving = rendered["serving/overlays/cpu-object-store"]
    for objects in (training, serving):
        assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
        workload = next(o for o in objects if o["kind"] in ("Job", "Deployment"))
        pod = workload["spec"]["template"]["spec"]
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        account = find(objects, "ServiceAccount", pod["serviceAccountName"])
        assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        assert pod["automountServiceAccountToken"] is False
        mounts = [m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]]
        assert "/models" not in mounts and "/runs" not in mounts
    job = find(training, "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    bucket = "gs://YOUR-BUCKET/"
    for name in ("DIST_CAPTION_CACHE_DIR", "DIST_CAPTION_MODEL_DIR", "DIST_CAPTION_EXPORT_BASE"):
        assert env[name].startswith(bucket), name
    base_path = re.search(r'base_path: "([^"]+)"',
                          find(serving, "ConfigMap")["data"]["models.config"]).group(1)
    assert env["DIST_CAPTION_EXPORT_BASE"] == base_path  # where the servers read
    # What each pod still writes locally (the synthetic images) is on its writable /tmp.
    synthetic_dir = re.search(r"--synthetic_dir=(\S+)", env["DIST_CAPTION_DATA_FLAGS"])[1]
    assert synthetic_dir.startswith("/tmp/")
    assert "/tmp" in [m["mountPath"] for m in container["volumeMounts"]]
    # The rest of the Job is the base's: same workers, same TF_CONFIG.
    base_job = find(rendered["training"], "Job")
    assert job["spec"]["completions"] == base_job["spec"]["completions"]
    assert container["args"] == base_job["spec"]["template"]["spec"]["containers"][0]["args"]


@needs_kubectl
def test_gpu_training_runs_one_worker_per_pod_over_its_gpus(rendered):
    cpu_pod = find(rendered["training"], "Job")["spec"]["template"]["spec"]
    job = find(rendered["training/overlays/gpu"], "Job")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus > 1 and "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    # The pod's worker sees the GPUs Kubernetes gives it and mirrors the model over them:
    # nothing hides them or narrows them down.
    assert not {"--cpu", "--gpus_per_worker"} & {a.split("=")[0] for a in container["args"]}
    assert not any(e["name"] == "CUDA_VISIBLE_DEVICES" for e in container["env"])
    global_batch = int(next(a for a in container["args"] if a.startswith(
        "--global_batch_size=")).split("=")[1])
    assert global_batch % (gpus * job["spec"]["completions"]) == 0
    assert container["image"] == "dist-caption-train-gpu:0.1.0"
    assert pod["nodeSelector"] and {"key": "nvidia.com/gpu", "operator": "Exists",
                                    "effect": "NoSchedule"} in pod["tolerations"]
    # NCCL's shared memory: /dev/shm from RAM, not the runtime's 64 MB default.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    # The same security settings as the CPU pod.
    assert container["securityContext"] == cpu_pod["containers"][0]["securityContext"]
    assert pod["securityContext"] == cpu_pod["securityContext"]


def test_gpu_extra_and_image_install_the_tensorflow_of_the_dependency_range():
    import tomllib

    import tensorflow as tf

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    tensorflow = next(d for d in project["dependencies"] if re.match(r"tensorflow[<>=]", d))
    assert project["optional-dependencies"]["gpu"] == [
        tensorflow.replace("tensorflow", "tensorflow[and-cuda]", 1)]
    with open(os.path.join(K8S, "training", "Dockerfile.gpu")) as f:
        dockerfile = f.read()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M)[1]
    assert base == f"tensorflow/tensorflow:{tf.__version__.split('-')[0]}-gpu"
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)


@needs_kubectl
@pytest.mark.skipif(not os.path.exists(CHECKOV),
                    reason="checkov is not installed in .venv/checkov (bash launch/setup.sh)")
def test_checkov_finds_no_unexplained_failure(rendered, tmp_path):
    for path, objects in rendered.items():
        with open(tmp_path / (path.replace("/", "-") + ".yaml"), "w") as f:
            yaml.safe_dump_all(objects, f)
    result = subprocess.run([CHECKOV, "-d", str(tmp_path), "--framework", "kubernetes",
                             "-o", "json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results.get("failed_checks", [])]
    assert not failed, failed
    assert report["summary"]["passed"] > 100
    by_resource = {}
    for objects in rendered.values():
        for obj in objects:
            key = f"{obj['kind']}.{obj['metadata'].get('namespace', 'default')}." \
                  f"{obj['metadata']['name']}"
            by_resource[key] = obj["metadata"].get("annotations", {})
    for skipped in results.get("skipped_checks", []):
        reasons = [v for k, v in by_resource[skipped["resource"]].items()
                   if k.startswith("checkov.io/skip") and v.startswith(skipped["check_id"] + "=")]
        assert reasons and len(reasons[0]) > len(skipped["check_id"]) + 20, skipped["resource"]


# ------------------------------------------------------------------------------------------------
# Training as a JobSet
# ------------------------------------------------------------------------------------------------

# JobSet's API as published by kubernetes-sigs/jobset v0.12.0 (api/jobset/v1alpha2/jobset_types.go
# and the CRD generated from it, config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml): every
# field of each type these manifests reach, with its JSON type; a string names another type here,
# a one-element list is a list of that type, `object` is left to kubernetes-validate (which checks
# each replicated job's template as a batch/v1 Job). The CRD's copies of JobSpec, PodSpec and
# ObjectMeta list the fields below (the API server prunes any other, e.g. a newer Kubernetes one).
JOBSET_TYPES = {
    "JobSet": {"apiVersion": str, "kind": str, "metadata": dict, "spec": "JobSetSpec"},
    "JobSetSpec": {"replicatedJobs": ["ReplicatedJob"], "network": "Network",
                   "successPolicy": dict, "failurePolicy": "FailurePolicy",
                   "startupPolicy": dict, "suspend": bool, "coordinator": dict, "managedBy": str,
                   "ttlSecondsAfterFinished": int, "volumeClaimPolicies": list},
    "Network": {"enableDNSHostnames": bool, "subdomain": str, "publishNotReadyAddresses": bool},
    "FailurePolicy": {"maxRestarts": int, "restartStrategy": str, "rules": ["FailurePolicyRule"]},
    "FailurePolicyRule": {"name": str, "action": str, "onJobFailureReasons": [str],
                          "onJobFailureMessagePatterns": [str], "targetReplicatedJobs": [str]},
    "ReplicatedJob": {"name": str, "groupName": str, "template": "JobTemplateSpec",
                      "replicas": int, "dependsOn": list},
    "JobTemplateSpec": {"metadata": "EmbeddedObjectMeta", "spec": "JobSpec"},
    "JobSpec": {**dict.fromkeys(
        ["activeDeadlineSeconds", "backoffLimit", "backoffLimitPerIndex", "completionMode",
         "completions", "managedBy", "manualSelector", "maxFailedIndexes", "parallelism",
         "podFailurePolicy", "podReplacementPolicy", "selector", "successPolicy", "suspend",
         "ttlSecondsAfterFinished"], object), "template": "PodTemplateSpec"},
    "PodTemplateSpec": {"metadata": "EmbeddedObjectMeta", "spec": "PodSpec"},
    "EmbeddedObjectMeta": {"name": str, "namespace": str, "labels": dict, "annotations": dict,
                           "finalizers": list},
    "PodSpec": dict.fromkeys(
        ["activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
         "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
         "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "hostnameOverride",
         "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead",
         "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
         "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
         "schedulingGroup", "securityContext", "serviceAccount", "serviceAccountName",
         "setHostnameAsFQDN", "shareProcessNamespace", "subdomain",
         "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes"],
        object),
}
JOBSET_REQUIRED = {"FailurePolicyRule": {"name", "action"}, "ReplicatedJob": {"name", "template"},
                   "JobSpec": {"template"}, "PodSpec": {"containers"}}
JOBSET_ENUMS = {
    ("FailurePolicyRule", "action"): {"FailJobSet", "RestartJobSet",
                                      "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
                                      "RestartJobAndIgnoreMaxRestarts"},
    ("FailurePolicy", "restartStrategy"): {"Recreate", "BlockingRecreate", "InPlaceRestart"},
}
# What JobSet's admission webhook (pkg/webhooks/jobset_webhook.go, v0.12.0) accepts: the reasons
# a failed Job's condition can have, and the form of a failure policy rule's name (it becomes
# part of the JobSet's condition reason).
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "FailedIndexes",
                       "MaxFailedIndexesExceeded", "PodFailurePolicy"}
RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _check_jobset_type(value, type_name: str, path: str) -> None:
    fields = JOBSET_TYPES[type_name]
    assert isinstance(value, dict), f"{path}: not an object"
    unknown = set(value) - set(fields)
    assert not unknown, f"{path}: {sorted(unknown)} are not fields of {type_name}"
    missing = JOBSET_REQUIRED.get(type_name, set()) - set(value)
    assert not missing, f"{path}: {type_name} needs {sorted(missing)}"
    for key, item in value.items():
        where, kind = f"{path}.{key}", fields[key]
        if (type_name, key) in JOBSET_ENUMS:
            assert item in JOBSET_ENUMS[type_name, key], f"{where}: {item!r}"
        if isinstance(kind, list):
            assert isinstance(item, list), f"{where}: not a list"
            for i, element in enumerate(item):
                _check_jobset_value(element, kind[0], f"{where}[{i}]")
        else:
            _check_jobset_value(item, kind, where)


def _check_jobset_value(value, kind, path: str) -> None:
    if isinstance(kind, str):
        _check_jobset_type(value, kind, path)
    elif kind is not object:
        assert isinstance(value, kind) and not (kind is int and isinstance(value, bool)), \
            f"{path}: {value!r} is not {kind.__name__}"


@needs_kubectl
@pytest.mark.parametrize("path", JOBSET_TRAINING)
def test_jobset_fields_are_those_of_the_published_jobset_api(rendered, path):
    jobset = find(rendered[path], "JobSet")
    assert (jobset["apiVersion"], jobset["kind"]) in CRD_KINDS
    _check_jobset_type(jobset, "JobSet", "JobSet")
    spec = jobset["spec"]
    # What the webhook refuses (or defaults to what a podFailurePolicy refuses).
    rules = spec["failurePolicy"]["rules"]
    names = [rule["name"] for rule in rules]
    assert len(set(names)) == len(names)
    replicated = {rj["name"] for rj in spec["replicatedJobs"]}
    for rule in rules:
        assert RULE_NAME.match(rule["name"]) and len(rule["name"]) <= 128, rule["name"]
        assert set(rule.get("onJobFailureReasons", [])) <= JOB_FAILURE_REASONS, rule["name"]
        assert set(rule.get("targetReplicatedJobs", [])) <= replicated, rule["name"]
        # RestartJob and RestartJobAndIgnoreMaxRestarts are refused unless the controller runs
        # with the RestartJob feature gate.
        assert rule["action"] not in ("RestartJob", "RestartJobAndIgnoreMaxRestarts")
    assert DNS_1035_LABEL.match(spec["network"]["subdomain"])
    assert len(spec["network"]["subdomain"]) <= 63
    for rj in spec["replicatedJobs"]:
        job_spec = rj["template"]["spec"]
        last_job = f"{jobset['metadata']['name']}-{rj['name']}-{rj.get('replicas', 1) - 1}"
        last_pod = f"{last_job}-{job_spec['completions'] - 1}-abcde"  # + the 5 random characters
        for name in (last_job, last_pod):
            assert DNS_1035_LABEL.match(name) and len(name) <= 63, name
        # The webhook sets an empty restartPolicy to OnFailure, which a podFailurePolicy refuses.
        assert job_spec["template"]["spec"]["restartPolicy"] == "Never"


@needs_kubectl
@pytest.mark.parametrize("path", JOBSET_TRAINING)
def test_jobset_runs_the_indexed_jobs_pods_and_fails_its_job_on_any_failure(rendered, path):
    objects = rendered[path]
    indexed = rendered[JOBSET_OF[path]]
    job = find(indexed, "Job")
    jobset = find(objects, "JobSet")
    # One replicated job of one Indexed Job: pod i is the Indexed Job's worker i.
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated.get("replicas", 1) == 1
    spec = replicated["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == job["spec"]["completions"]
    # Any pod's failure fails the child Job, and so restarts the group.
    assert spec["backoffLimit"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    # The same pod template, but for the workers' host names.
    template = copy.deepcopy(spec["template"])
    env = template["spec"]["containers"][0]["env"]
    patterns = [e for e in env if e["name"] == "DIST_CAPTION_WORKER_HOST_PATTERN"]
    assert len(patterns) == 1
    env.remove(patterns[0])
    assert template == job["spec"]["template"]
    # The JobSet replaces the Job and its Service (the controller makes one for the subdomain);
    # everything else is the Indexed Job variant's.
    subdomain = jobset["spec"]["network"]["subdomain"]

    def replaced(o):
        return o["kind"] in ("Job", "JobSet") or (
            o["kind"] == "Service" and o["metadata"]["name"] == subdomain)

    assert [o["kind"] for o in objects if replaced(o)] == ["JobSet"]
    assert sorted(json.dumps(o, sort_keys=True) for o in objects if not replaced(o)) == \
        sorted(json.dumps(o, sort_keys=True) for o in indexed if not replaced(o))
    assert jobset["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert jobset["metadata"]["labels"] == job["metadata"]["labels"]


@needs_kubectl
@pytest.mark.parametrize("path", JOBSET_TRAINING)
def test_jobset_workers_tf_config_names_the_jobset_pods_hostnames(rendered, path):
    jobset = find(rendered[path], "JobSet")
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True
    # Peers resolve each other while starting, before any is Ready (JobSet's default too).
    assert network.get("publishNotReadyAddresses", True) is True
    subdomain = network["subdomain"]
    (replicated,) = jobset["spec"]["replicatedJobs"]
    pod = replicated["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert len(env) == len(container["env"])
    # The controller sets each pod's subdomain to the network's: the template says the same.
    assert pod["subdomain"] == subdomain == env["DIST_CAPTION_SERVICE"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["collective"] == int(env["DIST_CAPTION_PORT"])
    workers = replicated["template"]["spec"]["completions"]
    assert int(env["DIST_CAPTION_WORKERS"]) == workers
    # Network.enableDNSHostnames (jobset_types.go, v0.12.0): pods are reachable at
    # <jobSet.name>-<spec.replicatedJob.name>-<job-index>-<pod-index>.<subdomain>.
    hosts = [f"{jobset['metadata']['name']}-{replicated['name']}-0-{i}.{subdomain}:"
             f"{ports['collective']}" for i in range(workers)]
    assert hosts[0] == "caption-train-workers-0-0.caption-train-workers:2222"
    for index in range(workers):
        config = cluster.pod_tf_config({**env, "JOB_COMPLETION_INDEX": str(index)})
        assert config == {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}}


# ------------------------------------------------------------------------------------------------
# What a worker's failure does: models of the documented rules, not the controllers
# ------------------------------------------------------------------------------------------------

POD_FAILURE_ACTIONS = ("FailJob", "FailIndex", "Ignore", "Count")


def pod_failure_action(policy: dict | None, pod: dict) -> str:
    """The action a Job's podFailurePolicy takes on one failed pod, by the rules of the API
    reference (batch/v1 PodFailurePolicy, PodFailurePolicyRule, PodFailurePolicyOnExitCodes-
    Requirement, PodFailurePolicyOnPodConditionsPattern, as kubernetes-validate ships them;
    https://kubernetes.io/docs/concepts/workloads/controllers/job/#pod-failure-policy): the
    rules are tried in order and the first that matches gives the action; none matching gives
    Count (the default: the failure counts towards backoffLimit); a rule with an unknown action
    is skipped. onExitCodes looks at the non-zero exit codes of its containerName (of every
    container when unset): In matches when one of them is in `values`, NotIn when one is not,
    an unknown operator never. onPodConditions matches when the pod has a condition of a
    pattern's type and status (True by default). `pod` is {"exit_codes": {container: code},
    "conditions": [{"type": ..., "status": ...}]}. A model of the Job controller's documented
    rule matching, not the controller."""
    for rule in (policy or {}).get("rules", []):
        if rule["action"] in POD_FAILURE_ACTIONS and _pod_failure_rule_matches(rule, pod):
            return rule["action"]
    return "Count"


def _pod_failure_rule_matches(rule: dict, pod: dict) -> bool:
    requirement = rule.get("onExitCodes")
    if requirement:
        codes = [code for name, code in pod.get("exit_codes", {}).items()
                 if code != 0 and requirement.get("containerName") in (None, name)]
        if requirement["operator"] == "In":
            return any(code in requirement["values"] for code in codes)
        if requirement["operator"] == "NotIn":
            return any(code not in requirement["values"] for code in codes)
        return False
    return any(pattern["type"] == condition["type"]
               and pattern.get("status", "True") == condition.get("status", "True")
               for pattern in rule.get("onPodConditions") or []
               for condition in pod.get("conditions", []))


class JobFailureCounting:
    """An Indexed Job's handling of failed pods as documented: Count adds one to the failures
    and the Job fails (reason BackoffLimitExceeded) once they exceed backoffLimit ("the number of
    retries before marking this job failed", 6 when unset); Count and Ignore replace the pod (its
    index runs again); FailJob fails the Job at once (reason PodFailurePolicy); FailIndex fails
    the pod's index, which does not run again. Once failed, the Job terminates its other pods:
    their failures change nothing. A model of the documented counting, not the Job controller."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.failures = 0
        self.failed_reason: str | None = None
        self.failed_indexes: set[int] = set()
        self.replaced: list[int] = []

    def pod_failed(self, index: int, pod: dict) -> None:
        if self.failed_reason:
            return
        action = pod_failure_action(self.spec.get("podFailurePolicy"), pod)
        if action == "FailJob":
            self.failed_reason = "PodFailurePolicy"
        elif action == "FailIndex":
            self.failed_indexes.add(index)
        else:
            if action == "Count":
                self.failures += 1
                if self.failures > self.spec.get("backoffLimit", 6):
                    self.failed_reason = "BackoffLimitExceeded"
                    return
            self.replaced.append(index)


class JobSetRestarts:
    """A JobSet's failurePolicy as documented by kubernetes-sigs/jobset v0.12.0
    (api/jobset/v1alpha2/jobset_types.go): when a child Job fails, the rules are tried in order,
    and the first whose onJobFailureReasons (empty: any), onJobFailureMessagePatterns (regular
    expressions; empty: any) and targetReplicatedJobs (empty: all) match the failed Job acts;
    none matching means RestartJobSet. RestartJobSet recreates every child Job when fewer than
    maxRestarts counted restarts were made (and counts one more), else fails the JobSet;
    RestartJobSetAndIgnoreMaxRestarts recreates them without counting; FailJobSet fails it. No
    failurePolicy: the first failed Job fails the JobSet. A model of the documented policy, not
    the JobSet controller."""

    def __init__(self, jobset: dict):
        self.policy = jobset["spec"].get("failurePolicy")
        self.restarts = 0
        self.counted = 0
        self.failed = False

    def child_job_failed(self, replicated_job: str, reason: str, message: str = "") -> None:
        assert not self.failed
        if self.policy is None:
            self.failed = True
            return
        action = "RestartJobSet"
        for rule in self.policy.get("rules", []):
            if ((not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"])
                    and (not rule.get("onJobFailureMessagePatterns") or any(
                        re.search(p, message) for p in rule["onJobFailureMessagePatterns"]))
                    and (not rule.get("targetReplicatedJobs")
                         or replicated_job in rule["targetReplicatedJobs"])):
                action = rule["action"]
                break
        if action == "FailJobSet":
            self.failed = True
        elif action == "RestartJobSet":
            if self.counted >= self.policy.get("maxRestarts", 0):
                self.failed = True
            else:
                self.counted += 1
                self.restarts += 1
        elif action == "RestartJobSetAndIgnoreMaxRestarts":
            self.restarts += 1
        else:
            raise AssertionError(f"{action} is not modelled here")


def exited(code: int, *conditions: str) -> dict:
    """A failed worker pod: its container `worker` exited `code`; `conditions` are True."""
    return {"exit_codes": {"worker": code},
            "conditions": [{"type": c, "status": "True"} for c in conditions]}


def incident(workers: int, failed: dict[int, dict], peers_first: bool = False):
    """The pod failures of one incident: the workers in `failed` (index: pod) fail, and every
    other worker then exits PEER_LOST; with peers_first, the survivors' exits are seen first."""
    peers = [(i, exited(PEER_LOST)) for i in range(workers) if i not in failed]
    return peers + list(failed.items()) if peers_first else list(failed.items()) + peers


def test_the_pod_failure_policy_model_follows_the_documented_example():
    # The example of the Kubernetes documentation (controllers/job-pod-failure-policy-
    # example.yaml): the Job fails when its container `main` exits 42; disruptions (the
    # DisruptionTarget condition) do not count towards backoffLimit; other failures do.
    policy = {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": "main", "operator": "In", "values": [42]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    assert pod_failure_action(policy, {"exit_codes": {"main": 42}}) == "FailJob"
    assert pod_failure_action(policy, {"exit_codes": {"main": 1}}) == "Count"
    assert pod_failure_action(policy, {"exit_codes": {"sidecar": 42, "main": 0}}) == "Count"
    disrupted = {"exit_codes": {"main": 137}, "conditions": [{"type": "DisruptionTarget",
                                                              "status": "True"}]}
    assert pod_failure_action(policy, disrupted) == "Ignore"
    disrupted["conditions"][0]["status"] = "False"
    assert pod_failure_action(policy, disrupted) == "Count"
    # The first rule that matches wins; exit code 0 is never looked at; unknown actions skip.
    not_in = {"rules": [{"action": "Ignore", "onExitCodes": {"operator": "NotIn", "values": [1]}},
                        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}}]}
    assert pod_failure_action(not_in, {"exit_codes": {"a": 2}}) == "Ignore"
    assert pod_failure_action(not_in, {"exit_codes": {"a": 1, "b": 0}}) == "Count"
    unknown = {"rules": [{"action": "Later", "onPodConditions": [{"type": "DisruptionTarget"}]},
                         {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    assert pod_failure_action(unknown, exited(137, "DisruptionTarget")) == "Ignore"
    job = JobFailureCounting({"backoffLimit": 1, "podFailurePolicy": policy})
    for pod in ({"exit_codes": {"main": 1}}, {"exit_codes": {"main": 1}}):
        assert job.failed_reason is None
        job.pod_failed(0, pod)
    assert (job.failures, job.failed_reason, job.replaced) == (2, "BackoffLimitExceeded", [0])


@needs_kubectl
@pytest.mark.parametrize("path", TRAINING + [OBJECT_STORE_TRAINING])
def test_indexed_job_counts_a_dead_worker_once_and_not_its_peers_or_a_preemption(rendered, path):
    spec = find(rendered[path], "Job")["spec"]
    workers, limit = spec["completions"], spec["backoffLimit"]
    assert workers > 1 and limit > 0
    assert spec["podReplacementPolicy"] == "Failed"  # one pod per index at any time
    # One worker SIGKILLed (e.g. out of memory), its peers exit PEER_LOST: one failure, every
    # index runs again, whichever pods are seen to fail first.
    for peers_first in (False, True):
        job = JobFailureCounting(spec)
        for index, pod in incident(workers, {1: exited(137)}, peers_first):
            job.pod_failed(index, pod)
        assert (job.failures, job.failed_reason) == (1, None)
        assert sorted(job.replaced) == list(range(workers))
    # A preemption (every worker checkpoints and exits PREEMPTED), a drained node (its worker
    # killed after the grace period, the pod marked DisruptionTarget): nothing counts.
    for failed in ({i: exited(PREEMPTED) for i in range(workers)},
                   {0: exited(137, "DisruptionTarget")}):
        job = JobFailureCounting(spec)
        for index, pod in incident(workers, failed):
            job.pod_failed(index, pod)
        assert (job.failures, job.failed_reason) == (0, None)
        assert sorted(job.replaced) == list(range(workers))
    # A worker that fails on every run (a bug: exit 1): backoffLimit runs are retried, the next
    # failure fails the Job.
    job = JobFailureCounting(spec)
    for _ in range(limit + 1):
        assert job.failed_reason is None
        for index, pod in incident(workers, {0: exited(1)}):
            job.pod_failed(index, pod)
    assert (job.failures, job.failed_reason) == (limit + 1, "BackoffLimitExceeded")
    # What the Indexed Job cannot do: a worker stalled while Running is never replaced; only its
    # peers' PEER_LOST exits are, uncounted.
    job = JobFailureCounting(spec)
    for index in range(1, workers):
        job.pod_failed(index, exited(PEER_LOST))
    assert (job.failures, job.failed_reason) == (0, None) and 0 not in job.replaced


@needs_kubectl
@pytest.mark.parametrize("path", JOBSET_TRAINING)
def test_jobset_restarts_the_group_once_per_failure_counting_only_the_trainings(rendered, path):
    jobset = find(rendered[path], "JobSet")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    name, child = replicated["name"], replicated["template"]["spec"]
    workers = child["completions"]
    max_restarts = jobset["spec"]["failurePolicy"]["maxRestarts"]
    assert max_restarts > 0
    # Both variants survive as many failures of the training itself.
    assert max_restarts == find(rendered[JOBSET_OF[path]], "Job")["spec"]["backoffLimit"]

    def child_job_failure(pods) -> str | None:
        job = JobFailureCounting(child)
        for index, pod in pods:
            job.pod_failed(index, pod)
        return job.failed_reason

    # PEER_LOST is not ignored: the peers of a worker stalled while Running fail the child Job,
    # and the restart recreates every pod, the stalled one with them.
    stalled = child_job_failure([(i, exited(PEER_LOST)) for i in range(1, workers)])
    assert stalled == "BackoffLimitExceeded"
    group = JobSetRestarts(jobset)
    group.child_job_failed(name, stalled)
    assert (group.restarts, group.counted, group.failed) == (1, 1, False)
    # One worker SIGKILLed, its peers exit PEER_LOST: one counted restart, whichever comes first.
    for peers_first in (False, True):
        group = JobSetRestarts(jobset)
        group.child_job_failed(name, child_job_failure(
            incident(workers, {1: exited(137)}, peers_first)))
        assert (group.restarts, group.counted, group.failed) == (1, 1, False)
    # Preemptions and disruptions restart the group without using up maxRestarts.
    group = JobSetRestarts(jobset)
    for _ in range(max_restarts + 2):
        for failed in ({i: exited(PREEMPTED) for i in range(workers)},
                       {0: exited(137, "DisruptionTarget")}):
            reason = child_job_failure(incident(workers, failed))
            assert reason == "PodFailurePolicy"
            group.child_job_failed(name, reason)
    assert (group.restarts, group.counted, group.failed) == (2 * (max_restarts + 2), 0, False)
    # A worker that fails on every run: maxRestarts restarts, then the JobSet fails.
    group = JobSetRestarts(jobset)
    for _ in range(max_restarts + 1):
        assert not group.failed
        group.child_job_failed(name, child_job_failure(incident(workers, {0: exited(1)})))
    assert (group.restarts, group.counted, group.failed) == (max_restarts, max_restarts, True)


# ------------------------------------------------------------------------------------------------
# Serving and training in one namespace: which policy selects which pod
# ------------------------------------------------------------------------------------------------

def selects(selector: dict | None, labels: dict) -> bool:
    """Whether a label selector matches `labels`, as meta/v1 LabelSelector is documented:
    matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist) ANDed; an empty selector
    matches everything, a null one nothing."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for requirement in selector.get("matchExpressions") or []:
        key, values = requirement["key"], requirement.get("values") or []
        ok = {"In": lambda: key in labels and labels[key] in values,
              "NotIn": lambda: key not in labels or labels[key] not in values,
              "Exists": lambda: key in labels,
              "DoesNotExist": lambda: key not in labels}[requirement["operator"]]()
        if not ok:
            return False
    return True


def _policy_types(policy: dict) -> list[str]:
    # Unset: Ingress, and Egress too if the policy has egress rules (NetworkPolicySpec).
    spec = policy["spec"]
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


def ingress_allowed(policies: list[dict], target: tuple[dict, dict], source: tuple[dict, dict],
                    port: int) -> bool:
    """Whether TCP traffic from pod `source` reaches `port` of pod `target` (both (owner, pod
    template), in one namespace) under `policies`, as NetworkPolicySpec documents it: allowed if
    no policy with Ingress selects the target, else if one of the ingress rules of those that do
    admits it (`from` unset or empty: any source; `ports` unset or empty: any port)."""
    def namespace(pod):
        return pod[0]["metadata"]["namespace"]

    def labels(pod):
        return pod[1]["metadata"].get("labels", {})

    isolating = [p for p in policies if "Ingress" in _policy_types(p)
                 and p["metadata"]["namespace"] == namespace(target)
                 and selects(p["spec"].get("podSelector", {}), labels(target))]
    named = {p["name"]: p["containerPort"] for c in target[1]["spec"]["containers"]
             for p in c.get("ports", []) if "name" in p}

    def peer_matches(peer):
        assert set(peer) == {"podSelector"}, "only podSelector peers are modelled here"
        return namespace(source) == namespace(target) and selects(peer["podSelector"],
                                                                  labels(source))

    def port_matches(rule_port):
        if rule_port.get("protocol", "TCP") != "TCP":
            return False
        if "port" not in rule_port:
            return True
        first = named.get(rule_port["port"]) if isinstance(rule_port["port"], str) else \
            rule_port["port"]
        return first is not None and first <= port <= rule_port.get("endPort", first)

    return not isolating or any(
        (not rule.get("from") or any(peer_matches(peer) for peer in rule["from"]))
        and (not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
        for policy in isolating for rule in policy["spec"].get("ingress") or [])


@needs_kubectl
@pytest.mark.parametrize("training", ALL_TRAINING)
def test_serving_and_training_policies_each_select_and_admit_only_their_own(rendered, training):
    for serving in [f"serving/overlays/{o}" for o in SERVING]:
        objects = rendered[serving] + rendered[training] + rendered["serving/tools"]
        policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        by_name = {p["metadata"]["name"]: p for p in policies}
        assert sorted(by_name) == ["caption-model-publisher", "caption-serving",
                                   "caption-training"], (serving, training)
        pods = pod_templates(objects)
        serving_pods = [p for p in pods if p[0]["kind"] == "Deployment"]
        training_pods = [p for p in pods if p[0]["kind"] in ("Job", "JobSet")]
        other_pods = [p for p in pods if p[0]["kind"] == "Pod"]  # the model publisher
        assert serving_pods and training_pods and other_pods
        # The publisher admits nothing (it is reached through the API server).
        for target in other_pods:
            assert not any(ingress_allowed(policies, target, source, p) for p in (
                2222, 8500, 8501) for source in serving_pods + training_pods + other_pods)

        def selected(name, pod):
            return selects(by_name[name]["spec"].get("podSelector", {}),
                           pod[1]["metadata"].get("labels", {}))

        assert all(selected("caption-serving", p) for p in serving_pods), serving
        assert not any(selected("caption-serving", p) for p in training_pods + other_pods)
        assert all(selected("caption-training", p) for p in training_pods), training
        assert not any(selected("caption-training", p) for p in serving_pods + other_pods)
        # The PodDisruptionBudget keeps serving pods alone (a null selector would keep none).
        budget = find(objects, "PodDisruptionBudget")["spec"].get("selector")
        assert all(selects(budget, p[1]["metadata"].get("labels", {})) for p in serving_pods)
        assert not any(selects(budget, p[1]["metadata"].get("labels", {}))
                       for p in training_pods + other_pods)
        for target in training_pods:
            container = target[1]["spec"]["containers"][0]
            port = int({e["name"]: e["value"] for e in container["env"]}["DIST_CAPTION_PORT"])
            # Peers reach each other's collective port; no other pod reaches a worker.
            assert all(ingress_allowed(policies, target, source, port)
                       for source in training_pods)
            for source in serving_pods + other_pods:
                assert not any(ingress_allowed(policies, target, source, p)
                               for p in (port, 8500, 8501, 40000))
            # NCCL, between GPU pods, listens on ports of its choosing; CPU workers need 2222 only.
            nccl = "nvidia.com/gpu" in container["resources"]["limits"]
            assert all(ingress_allowed(policies, target, source, 40000) == nccl
                       for source in training_pods), training
        for target in serving_pods:
            for source in serving_pods + training_pods + other_pods:
                assert ingress_allowed(policies, target, source, 8500)
                assert ingress_allowed(policies, target, source, 8501)
                assert not ingress_allowed(policies, target, source, 2222)
