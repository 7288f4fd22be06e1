"""A TensorFlow-Serving-compatible model server for laptops and tests. Not a replacement for
`tensorflow/serving` (a simpler batching scheduler, no GPU sharing, no model config reloads):
it exists because the real binary cannot be installed everywhere, and it speaks its protocol
and loads models the way it does.

    python -m serving.local_server --model_base_path exports/caption --model_name caption \\
        --port 8500 [--rest_port 8501] [--enable_batching] [--xla_cpu_compilation_enabled]

The modules, one job each:
- `loading`: `SavedModelBundle`, a SavedModel loaded as TensorFlow Serving loads it (the
  MetaGraphDef imported into a Session, the saver's restore op, the init op, signatures run by
  their SignatureDef tensor names), warm-up replay, and `ModelManager`, the versions of one model
  (newest `--num_versions`, labels, a failed load reported while the old version serves on);
- `signatures`: a request checked against its SignatureDef, and errors with TensorFlow
  Serving's codes and messages;
- `batching`: `--enable_batching`, concurrent requests merged along the batch dimension;
- `grpc_api`: PredictionService `Predict` / `GetModelMetadata`, ModelService `GetModelStatus`;
- `rest_api`: `POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict` (row `instances` or
  columnar `inputs`, `{"b64": ...}` for bytes), `GET /v1/models/<name>[/versions/<v>]` (status),
  `GET .../metadata`; HTTPS with `--ssl_cert`;
- `__main__`: the flags and the poll loop.

As in TensorFlow Serving, XLA compilation is disabled in the process (TensorFlow's own
`DisableXlaCompilation`) unless `--xla_cpu_compilation_enabled` or `--xla_gpu_compilation_enabled`
is given, so an `--export_xla` model fails its warm-up, and so its load, without it. The README's
fidelity record names the TensorFlow Serving source each behaviour was checked against and what
differs.
"""
