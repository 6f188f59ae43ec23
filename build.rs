//! Build steps for the shared `qins` crate.
//!
//! The ONNX protobuf schema is compiled with `protox`, a pure-Rust compiler, so that
//! building needs no `protoc` on the machine. Byte fields become `bytes::Bytes`: a model
//! decoded from a memory map then slices its inline tensors out of the map instead of
//! copying them.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx-ml.proto");
    let fds = protox::compile(["proto/onnx-ml.proto"], ["proto"]).expect("compile onnx-ml.proto");
    let mut cfg = prost_build::Config::new();
    cfg.bytes(["."]);
    cfg.compile_fds(fds).expect("generate ONNX protobuf code");
}
