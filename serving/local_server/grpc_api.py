"""The gRPC API: PredictionService `Predict` and `GetModelMetadata`, ModelService
`GetModelStatus`, from the real `tensorflow-serving-api` protos.

Checked against tensorflow_serving/model_servers/prediction_service_impl.cc,
get_model_status_impl.cc and tensorflow_serving/servables/tensorflow/get_model_metadata_impl.cc.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import tensorflow as tf
from google.protobuf import any_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving.local_server import signatures
from serving.local_server.loading import ModelManager
from serving.local_server.signatures import ServingError


def signature_def_map(servable) -> get_model_metadata_pb2.SignatureDefMap:
    """The servable's signatures as GetModelMetadata (and REST metadata) report them."""
    found = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in servable.signature_defs.items():
        found.signature_def[name].CopyFrom(sig)
    return found


def services(manager: ModelManager):
    """(PredictionService, ModelService) servicers over `manager`."""

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            try:
                servable = manager.resolve(request.model_spec)
                outputs = servable.predict(
                    request.model_spec.signature_name,
                    {k: tf.make_ndarray(v) for k, v in request.inputs.items()},
                    tuple(request.output_filter))
            except ServingError as e:
                context.abort(e.code, e.message)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = manager.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = (request.model_spec.signature_name
                                                  or signatures.DEFAULT_SIGNATURE)
            for name, value in outputs.items():
                response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
            return response

        def GetModelMetadata(self, request, context):
            try:
                if list(request.metadata_field) != ["signature_def"]:
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       "Metadata field signature_def must be the only one "
                                       "requested")
                servable = manager.resolve(request.model_spec)
            except ServingError as e:
                context.abort(e.code, e.message)
            packed = any_pb2.Any()
            packed.Pack(signature_def_map(servable))
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = manager.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].CopyFrom(packed)
            return response

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        def GetModelStatus(self, request, context):
            try:
                if request.model_spec.name != manager.name:
                    raise ServingError(grpc.StatusCode.NOT_FOUND,
                                       f"Could not find any versions of model "
                                       f"{request.model_spec.name}")
                version = (request.model_spec.version.value
                           if request.model_spec.HasField("version") else None)
                statuses = manager.status(version)
            except ServingError as e:
                context.abort(e.code, e.message)
            response = get_model_status_pb2.GetModelStatusResponse()
            for v, state, code, error in statuses:
                status = response.model_version_status.add()
                status.version = v
                status.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
                status.status.error_code = code.value[0]
                status.status.error_message = error
            return response

    return PredictionService(), ModelService()


def start_grpc(manager: ModelManager, port: int, max_message_bytes: int, threads: int = 16,
               tls: tuple[bytes, bytes, bytes | None] | None = None):
    """The gRPC server on `port` (0: any free port); returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes)])
    prediction, model = services(manager)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(prediction, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(model, server)
    address = f"0.0.0.0:{port}"
    if tls:
        cert, key, client_ca = tls
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca,
            require_client_auth=client_ca is not None)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    server.start()
    return server, port
