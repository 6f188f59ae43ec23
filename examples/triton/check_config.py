#!/usr/bin/env python3
"""Check a config.pbtxt against a model the way Triton's ONNX Runtime backend does at load time.

Without a Triton server: the config is parsed with the ModelConfig message that ships in the
`tritonclient` package (pip install tritonclient[grpc]), the model is opened with ONNX Runtime
with the QINS library registered (as the backend does through `op_library_filename`), and the
backend's load-time rules are applied to the session's inputs and outputs. The rules are those
of ModelInstanceState::ValidateInputs / ValidateOutputs in triton-inference-server/
onnxruntime_backend src/onnxruntime.cc (read at commit 00fd3e8, 2026-06-29):

- the config lists as many inputs as the session has;
- every configured input and output exists, with the same data type;
- dims: an input's -1 in the model matches any configured size; an output's dims must be equal,
  -1 for -1 (compare_exact);
- with max_batch_size 0 the dims include the batch dimension.

It also checks that the config lists every output, which Triton does not require.

    python3 check_config.py CONFIG.pbtxt MODEL_DIR [--lib target/release/libqins_provider.so]
"""

import argparse
import os
import sys

ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(float16)": "TYPE_FP16",
    "tensor(bfloat16)": "TYPE_BF16",
    "tensor(double)": "TYPE_FP64",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("model", help="model folder (model.onnx) or .onnx file")
    ap.add_argument("--lib", default="target/release/libqins_provider.so")
    a = ap.parse_args()

    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(open(a.config).read(), model_config_pb2.ModelConfig())
    type_name = model_config_pb2.DataType.Name

    so = ort.SessionOptions()
    so.register_custom_ops_library(a.lib)
    path = os.path.join(a.model, "model.onnx") if os.path.isdir(a.model) else a.model
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def infos(values):
        return {v.name: (ORT_TO_TRITON.get(v.type, v.type), [d if isinstance(d, int) else -1 for d in v.shape])
                for v in values}

    model_in, model_out = infos(sess.get_inputs()), infos(sess.get_outputs())
    errors = []
    if cfg.max_batch_size != 0:
        errors.append(f"max_batch_size {cfg.max_batch_size}: this check covers max_batch_size 0 only")
    if len(cfg.input) != len(model_in):
        errors.append(f"config has {len(cfg.input)} inputs, the model {len(model_in)}")

    def compare(section, ios, model, exact):
        for io in ios:
            if io.name not in model:
                errors.append(f"{section} {io.name}: not in the model")
                continue
            mtype, mdims = model[io.name]
            if type_name(io.data_type) != mtype:
                errors.append(f"{section} {io.name}: config {type_name(io.data_type)}, model {mtype}")
            dims = list(io.dims)
            ok = len(dims) == len(mdims) and all(
                m == c for m, c in zip(mdims, dims) if exact or m != -1)
            if not ok:
                errors.append(f"{section} {io.name}: config dims {dims}, model {mdims}")

    compare("input", cfg.input, model_in, exact=False)
    compare("output", cfg.output, model_out, exact=True)
    missing = sorted(set(model_out) - {o.name for o in cfg.output})
    if missing:
        errors.append(f"outputs not in the config: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    libs = list(cfg.model_operations.op_library_filename)
    print(f"{a.config}: {len(cfg.input)} inputs, {len(cfg.output)} outputs, backend {cfg.backend!r}, "
          f"op libraries {libs}; model {path}: {len(model_in)} inputs, {len(model_out)} outputs")
    if errors:
        print("\n".join("error: " + e for e in errors))
        sys.exit(1)
    print("ok: Triton's load-time input/output checks pass against the ONNX Runtime session")


if __name__ == "__main__":
    main()
