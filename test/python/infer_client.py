#!/usr/bin/env python3
"""Calls normserve's Open Inference Protocol API the way tritonclient's gRPC client does.

tritonclient itself is not packaged for Debian, so this builds its requests and reads its answers
with the same steps (tritonclient/grpc/_client.py, _infer_input.py, _requested_output.py,
_utils.py _get_inference_request, _infer_result.py), over Debian's python3-grpcio and
python3-protobuf and stubs that protoc generates into a temporary directory.

    infer_client.py ADDRESS MODEL INPUT_FILE SHAPE

INPUT_FILE holds the input as little-endian float32, SHAPE is its shape ("4,3,5"). Prints one JSON
object: the server and model calls' answers, the output as tritonclient's InferResult.as_numpy
gives it (base64 of its bytes), and the error tritonclient would raise for an unknown model.
"""
import base64
import importlib
import json
import os
import struct
import subprocess
import sys
import tempfile

import grpc
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# tritonclient/grpc/_client.py: MAX_GRPC_MESSAGE_SIZE and the KeepAliveOptions defaults.
INT32_MAX = 2 ** (struct.Struct("i").size * 8 - 1) - 1
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", INT32_MAX),
    ("grpc.max_receive_message_length", INT32_MAX),
    ("grpc.keepalive_time_ms", INT32_MAX),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
]
# tritonclient passes client_timeout to every call as the gRPC timeout: None (no deadline) for
# infer, sys.maxsize for the health and metadata calls. Debian's grpcio 1.51 fails a call with
# sys.maxsize with DEADLINE_EXCEEDED before sending it, so those get a timeout as a user would pass.
INFER_TIMEOUT = None
CLIENT_TIMEOUT = 60
# tritonclient.utils.triton_to_np_dtype, for the datatype this test uses.
NP_DTYPES = {"FP32": np.float32}


def load_stubs(out_dir):
    """protoc's Python messages and gRPC stubs for the proto, generated into out_dir."""
    subprocess.run(
        [
            "protoc",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            "--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin",
            "-I",
            "proto",
            "proto/inference/grpc_predict_v2.proto",
        ],
        cwd=REPO,
        check=True,
    )
    sys.path.insert(0, out_dir)
    return importlib.import_module("inference.grpc_predict_v2_pb2"), importlib.import_module("inference.grpc_predict_v2_pb2_grpc")


def infer_input(pb, name, shape, datatype, array):
    """InferInput(name, shape, datatype).set_data_from_numpy(array): the tensor and its raw content."""
    tensor = pb.ModelInferRequest().InferInputTensor()
    tensor.name = name
    tensor.ClearField("shape")
    tensor.shape.extend(shape)
    tensor.datatype = datatype
    if NP_DTYPES[datatype] != array.dtype:
        raise ValueError(f"got unexpected datatype {array.dtype} from numpy array, expected {datatype}")
    if list(tensor.shape) != list(array.shape):
        raise ValueError(f"got unexpected numpy array shape {array.shape}, expected {list(tensor.shape)}")
    return tensor, array.tobytes()


def requested_output(pb, name):
    """InferRequestedOutput(name), without classification."""
    output = pb.ModelInferRequest().InferRequestedOutputTensor()
    output.name = name
    return output


def inference_request(pb, model_name, inputs, model_version="", request_id="", outputs=None):
    """_get_inference_request, without sequence, priority, timeout or custom parameters."""
    request = pb.ModelInferRequest()
    request.model_name = model_name
    request.model_version = model_version
    if request_id != "":
        request.id = request_id
    for tensor, content in inputs:
        request.inputs.extend([tensor])
        if content is not None:
            request.raw_input_contents.extend([content])
    if outputs is not None:
        for output in outputs:
            request.outputs.extend([output])
    return request


def as_numpy(response, name):
    """InferResult.as_numpy for a numeric datatype."""
    index = 0
    for output in response.outputs:
        if output.name == name:
            shape = list(output.shape)
            if index < len(response.raw_output_contents):
                array = np.frombuffer(response.raw_output_contents[index], dtype=NP_DTYPES[output.datatype])
            elif len(output.contents.bytes_contents) != 0:
                array = np.array(output.contents.bytes_contents, copy=False)
            else:
                array = np.empty(0)
            return array.reshape(shape)
        index += 1
    return None


def tensor_metadata(t):
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def raised(call):
    """The status and message of the InferenceServerException tritonclient would raise."""
    try:
        call()
    except grpc.RpcError as err:
        return {"status": str(err.code()), "message": err.details()}
    return None


def main(address, model, input_file, shape_text):
    shape = [int(d) for d in shape_text.split(",")]
    x = np.fromfile(input_file, dtype="<f4").reshape(shape)
    with tempfile.TemporaryDirectory() as out_dir:
        pb, pb_grpc = load_stubs(out_dir)
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            result = {
                "server_live": stub.ServerLive(pb.ServerLiveRequest(), timeout=CLIENT_TIMEOUT).live,
                "server_ready": stub.ServerReady(pb.ServerReadyRequest(), timeout=CLIENT_TIMEOUT).ready,
            }
            server = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=CLIENT_TIMEOUT)
            result["server_metadata"] = {"name": server.name, "version": server.version, "extensions": list(server.extensions)}
            result["model_ready"] = stub.ModelReady(pb.ModelReadyRequest(name=model, version=""), timeout=CLIENT_TIMEOUT).ready
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=""), timeout=CLIENT_TIMEOUT)
            result["model_metadata"] = {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
                "inputs": [tensor_metadata(t) for t in meta.inputs],
                "outputs": [tensor_metadata(t) for t in meta.outputs],
            }
            # Names and datatype as a user takes them from the model's metadata.
            declared_input, declared_output = meta.inputs[0], meta.outputs[0]
            inputs = [infer_input(pb, declared_input.name, x.shape, declared_input.datatype, x)]
            outputs = [requested_output(pb, declared_output.name)]
            response = stub.ModelInfer(inference_request(pb, model, inputs, request_id="py-1", outputs=outputs), timeout=INFER_TIMEOUT)
            y = as_numpy(response, declared_output.name)
            result["infer"] = {
                "model_name": response.model_name,
                "model_version": response.model_version,
                "id": response.id,
                "outputs": [tensor_metadata(t) for t in response.outputs],
                "typed_contents": [t.HasField("contents") for t in response.outputs],
                "dtype": str(y.dtype),
                "shape": list(y.shape),
                "data": base64.b64encode(y.tobytes()).decode("ascii"),
            }
            unknown = inference_request(pb, model + "-missing", inputs)
            result["unknown_model"] = raised(lambda: stub.ModelInfer(unknown, timeout=INFER_TIMEOUT))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
