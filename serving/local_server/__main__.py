"""python -m serving.local_server --model_base_path exports/caption [--port 8500] [--rest_port 8501]

Flags follow tensorflow_model_server's where both have the setting (see the package docstring).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from absl import flags, logging

from serving import cli, config, declaring
from serving.local_server import batching, grpc_api, loading, rest_api

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The flags `serving.config.ServerSettings` declares, and its rules."""
    declaring.define_flags(config.ServerSettings)
    declaring.define_rules(config.SERVER_RULES)


def _refuse_with(names: tuple[str, ...], file_flag: str, what: str) -> None:
    """One line if any of the flags `names` is given together with `--file_flag`."""
    given = [f"--{name}" for name in names if FLAGS[name].present]
    if given:
        raise cli.CommandError(f"{', '.join(given)} and --{file_flag} both {what}: put the "
                               "setting in the file")


def _batching() -> dict | None:
    """Batcher settings from the batching flags, as tensorflow_model_server reads them."""
    if FLAGS.batching_parameters_file and not FLAGS.enable_batching:
        # tensorflow_serving/model_servers/server.cc
        raise cli.CommandError("server_options.batching_parameters_file is set without setting "
                               "server_options.enable_batching to true.")
    if not FLAGS.enable_batching:
        return None
    if FLAGS.batching_parameters_file:
        _refuse_with(("max_batch_size", "batch_timeout_micros", "num_batch_threads"),
                     "batching_parameters_file", "set batching")
        try:
            return batching.read_batching_parameters(FLAGS.batching_parameters_file)
        except ValueError as e:
            raise cli.CommandError(str(e)) from None
    return dict(max_batch_size=FLAGS.max_batch_size, timeout=FLAGS.batch_timeout_micros / 1e6,
                threads=FLAGS.num_batch_threads)


def _model_settings() -> dict:
    """ModelManager's name, base path, version policy and labels: from --model_config_file,
    or from --model_base_path, --model_name, --num_versions and --version_labels."""
    if not FLAGS.model_config_file:
        return dict(name=FLAGS.model_name, base_path=FLAGS.model_base_path,
                    num_versions=FLAGS.num_versions,
                    labels=config.version_labels(FLAGS.version_labels))
    _refuse_with(("model_name", "num_versions", "version_labels"), "model_config_file",
                 "describe the model")
    try:
        return loading.read_model_config(FLAGS.model_config_file)
    except ValueError as e:
        raise cli.CommandError(str(e)) from None


def _initial_load(manager: loading.ModelManager, stop: threading.Event) -> None:
    """As tensorflow_model_server at start-up: wait for the first version (as long as it
    takes), load it, and fail to start if it cannot be loaded or a label names a version that
    is not available; only then are the ports opened."""
    warned = False
    while not manager.wanted_versions():
        if not warned:
            logging.warning("No versions of servable %s found under base path %s. Did you "
                            "forget to name your leaf directory as a number (eg. '/1/')?",
                            manager.name, manager.base_path)
            warned = True
        if stop.wait(FLAGS.poll_seconds):
            sys.exit(0)
    manager.poll()
    if not manager.available():
        failures = "; ".join(f"version {v}: {message}"
                             for v, _, _, message in manager.status() if message)
        raise cli.CommandError(f"Failed to start server: {manager.name} did not become "
                               f"available ({failures})", 1)
    for label, version in manager.labels.items():
        if version not in manager.available() and \
                not FLAGS.allow_version_labels_for_unavailable_models:
            raise cli.CommandError(
                f"Failed to start server: Request to assign label to version {version} of "
                f"model {manager.name}, which is not currently available for inference "
                f"(label {label}={version}; or pass "
                "--allow_version_labels_for_unavailable_models)", 1)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.INFO)
    if not (FLAGS.xla_cpu_compilation_enabled or FLAGS.xla_gpu_compilation_enabled):
        loading.disable_xla_compilation()
    tls = rest_tls = None
    if FLAGS.ssl_cert or FLAGS.ssl_key:
        if not (FLAGS.ssl_cert and FLAGS.ssl_key):
            raise cli.CommandError("--ssl_cert and --ssl_key go together")
        tls = (cli.read_file(FLAGS.ssl_cert, "--ssl_cert"),
               cli.read_file(FLAGS.ssl_key, "--ssl_key"),
               cli.read_file(FLAGS.ssl_client_ca, "--ssl_client_ca")
               if FLAGS.ssl_client_ca else None)
        rest_tls = rest_api.server_tls_context(FLAGS.ssl_cert, FLAGS.ssl_key,
                                               FLAGS.ssl_client_ca)
    manager = loading.ModelManager(**_model_settings(), batching=_batching())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    _initial_load(manager, stop)
    limit = FLAGS.max_message_mb << 20
    try:
        server, port = grpc_api.start_grpc(manager, FLAGS.port, limit, FLAGS.threads, tls)
    except RuntimeError as e:
        raise cli.CommandError(f"cannot listen on gRPC port {FLAGS.port} ({e}): is another "
                               "server running? choose another --port") from None
    try:
        rest, rest_port = (rest_api.start_rest(manager, FLAGS.rest_port, limit, rest_tls)
                           if FLAGS.rest_port is not None else (None, None))
    except OSError as e:
        raise cli.CommandError(f"cannot listen on REST port {FLAGS.rest_port} ({e.strerror}): "
                               "choose another --rest_port") from None
    print(f"serving {manager.name} from {manager.base_path}: gRPC :{port}"
          + (f", REST :{rest_port}" if rest else "") + (" (TLS)" if tls else ""), flush=True)
    ready_written = False
    while not stop.is_set():
        if FLAGS.ready_file and not ready_written and manager.available():
            with open(FLAGS.ready_file + ".tmp", "w") as f:
                json.dump({"port": port, "rest_port": rest_port, "pid": os.getpid()}, f)
            os.replace(FLAGS.ready_file + ".tmp", FLAGS.ready_file)
            ready_written = True
        stop.wait(FLAGS.poll_seconds)
        if not stop.is_set():
            manager.poll()
    server.stop(grace=5).wait()
    if rest:
        rest.shutdown()
    manager.close()
    sys.exit(0)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
