"""Every setting of the serving side's commands, declared once (with `serving.declaring`):
`python -m serving.client`, `python -m serving.publish` and `python -m serving.local_server`.
Their flags are generated from these. Imports no TensorFlow.
"""

from __future__ import annotations

from serving import DEFAULT_MODEL_NAME, contract
from serving.declaring import AT_LEAST_ONE, NON_NEGATIVE, Check, Rule, declare, setting

DEFAULT_SERVER = "localhost:8500"
# The pod of k8s/serving/tools/publisher.yaml and its namespace (a test keeps them equal).
DEFAULT_POD, DEFAULT_NAMESPACE = "caption-model-publisher", "dist-caption"
POSITIVE_OR_UNSET = Check(lambda v: v > 0, "must be a positive integer")


def version_labels(text: str) -> dict[str, int]:
    """`stable=1,canary=2` as {label: version}; ValueError names the item that is not
    label=version."""
    labels = {}
    for item in filter(None, text.split(",")):
        name, _, version = item.partition("=")
        if not name or not version.isdigit():
            raise ValueError(f"--version_labels: {item!r} is not label=version")
        labels[name] = int(version)
    return labels


def _labels_ok(text: str) -> bool:
    try:
        version_labels(text)
    except ValueError:
        return False
    return True


ClientSettings = declare("ClientSettings", "`python -m serving.client IMAGE...`.", {
    "server": setting(DEFAULT_SERVER, "gRPC address host:port of the model server."),
    "rest": setting(None, "Use the REST API at this URL (http://host:8501) instead of gRPC.",
                    kind=str),
    "model_name": setting(DEFAULT_MODEL_NAME, "Served model name."),
    "signature": setting(contract.DEFAULT, "Signature (greedy captions)."),
    "version": setting(None, "Ask for this model version.", kind=int, check=POSITIVE_OR_UNSET),
    "version_label": setting(None, "Ask for the version with this label.", kind=str),
    "timeout": setting(30.0, "Deadline in seconds for the whole call, retries included.",
                       check=Check(lambda v: v > 0, "must be positive")),
    "beam": setting(0, "Beam width: use the beam_search signature.", check=NON_NEGATIVE),
    contract.MAX_LENGTH: setting(contract.DEFAULTS[contract.MAX_LENGTH], "At most this many "
                                 "words per caption (0: the model's own limit)."),
    contract.MIN_LENGTH: setting(contract.DEFAULTS[contract.MIN_LENGTH], "At least this many "
                                 "words per caption."),
    contract.NO_REPEAT_NGRAM: setting(contract.DEFAULTS[contract.NO_REPEAT_NGRAM], "Never repeat "
                                      "an n-gram of this size in a caption (3: trigram "
                                      "blocking; 0: off)."),
    contract.REPETITION_PENALTY: setting(contract.DEFAULTS[contract.REPETITION_PENALTY], "At "
                                         "least 1: a word already in the caption scores lower "
                                         "(1: off)."),
    contract.LENGTH_PENALTY: setting(contract.DEFAULTS[contract.LENGTH_PENALTY], "With --beam: "
                                     "rank beams by log-probability / length**a (0: off)."),
    "tls": setting(False, "Connect with TLS."),
    "ca_cert": setting(None, "PEM CA certificate that signed the server's.", kind=str),
    "client_cert": setting(None, "PEM client certificate (mutual TLS).", kind=str),
    "client_key": setting(None, "PEM private key of --client_cert.", kind=str),
    "json": setting(False, "Print one JSON object per image."),
    "model_card": setting(False, "Print the served version's model card (commit, data, "
                          "backbone, settings, checkpoint, metrics) instead of captioning."),
}, kw_only=True, module=__name__)

PublishSettings = declare("PublishSettings", "`python -m serving.publish EXPORT/VERSION DEST`.", {
    "version": setting(0, "Version number to publish as (0: the source folder's name).",
                       check=NON_NEGATIVE),
    "skip_check": setting(False, "Do not load the export and replay its warm-up before "
                          "publishing (the folder layout is still checked)."),
    "kubectl": setting(False, "DEST is a folder inside the k8s/serving/tools pod (e.g. "
                       "/models/caption): kubectl cp, then mv inside the pod."),
    "pod": setting(DEFAULT_POD, "With --kubectl: the pod."),
    "namespace": setting(DEFAULT_NAMESPACE, "With --kubectl: its namespace."),
    "kubectl_binary": setting("kubectl", "With --kubectl: the kubectl to run."),
}, kw_only=True, module=__name__)

# Names, defaults and meanings follow tensorflow_model_server's where both have the setting.
ServerSettings = declare("ServerSettings", "`python -m serving.local_server`.", {
    "model_base_path": setting(None, "Folder of integer version folders (what python -m "
                               "dist_caption.export writes).", kind=str),
    "model_config_file": setting(None, "Instead of --model_base_path, --model_name, "
                                 "--num_versions and --version_labels: TF Serving's "
                                 "ModelServerConfig text file with one model (name, base_path, "
                                 "latest/all/specific version policy, version_labels).", kind=str),
    "allow_version_labels_for_unavailable_models": setting(
        False, "As TF Serving's flag: a label may name a version that is not loaded yet "
        "(requests for it get NOT_FOUND until it is)."),
    "model_name": setting(DEFAULT_MODEL_NAME, "Name clients ask for."),
    "port": setting(8500, "gRPC port (0: any free port).", check=NON_NEGATIVE),
    "rest_port": setting(None, "REST port (TF Serving uses 8501; 0: any free port; unset: no "
                         "REST API).", kind=int, check=NON_NEGATIVE),
    "num_versions": setting(1, "Serve the newest N versions (TF Serving's 'latest' version "
                            "policy).", check=AT_LEAST_ONE),
    "version_labels": setting("", "label=version,... (e.g. stable=1,canary=2).",
                              check=Check(_labels_ok, "must be label=version,... (e.g. "
                                          "stable=1,canary=2)")),
    "poll_seconds": setting(1.0, "How often to look for new versions (TF Serving's "
                            "--file_system_poll_wait_seconds).",
                            check=Check(lambda v: v > 0, "must be positive")),
    "max_message_mb": setting(64, "Largest request accepted, in MiB.", check=AT_LEAST_ONE),
    "threads": setting(16, "Requests served at once.", check=AT_LEAST_ONE),
    "enable_batching": setting(False, "Merge concurrent requests into batches (as TensorFlow "
                               "Serving's --enable_batching)."),
    "max_batch_size": setting(64, "Most rows in a merged batch.", check=AT_LEAST_ONE),
    "batch_timeout_micros": setting(2000, "How long a batch waits to fill up.",
                                    check=NON_NEGATIVE),
    "num_batch_threads": setting(2, "Batches run at once.", check=AT_LEAST_ONE),
    "batching_parameters_file": setting(None, "With --enable_batching, instead of "
                                        "--max_batch_size, --batch_timeout_micros and "
                                        "--num_batch_threads: TF Serving's BatchingParameters "
                                        "text file (allowed_batch_sizes pads merged batches up "
                                        "to the next allowed size); unset fields take TF "
                                        "Serving's defaults.", kind=str),
    "xla_cpu_compilation_enabled": setting(False, "Allow XLA-compiled functions (an "
                                           "--export_xla model), as tensorflow_model_server's "
                                           "flag of that name; without it (or "
                                           "--xla_gpu_compilation_enabled) XLA compilation "
                                           "fails."),
    "xla_gpu_compilation_enabled": setting(False, "As tensorflow_model_server's: XLA on CPU and "
                                           "GPU."),
    "ssl_cert": setting(None, "PEM server certificate (with --ssl_key): TLS on the gRPC and the "
                        "REST port.", kind=str),
    "ssl_key": setting(None, "PEM private key of --ssl_cert.", kind=str),
    "ssl_client_ca": setting(None, "PEM CA of client certificates: mutual TLS.", kind=str),
    "ready_file": setting(None, "Written with the ports once the first version is served (for "
                          "scripts and tests).", kind=str),
}, kw_only=True, module=__name__)
SERVER_RULES = (
    Rule(("model_base_path", "model_config_file"), lambda path, file: bool(path) != bool(file),
         "pass model_base_path (with --model_name) or model_config_file, one of them"),
)
