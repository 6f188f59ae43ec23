//! The README's Rust example, compiled by CI (`cargo build --all-targets`) and run by
//! scripts/test-snippets.sh, which also checks that the README shows this code as it is here
//! (between the `snippet` markers).
//!
//!     cargo run --release --example load_library  # in a folder holding smollm2-qins/

// snippet: rust
use ort::session::Session;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // ONNX Runtime's library (here the one of the onnxruntime wheel), loaded at run time.
    let env = ort::init_from(std::env::var("ORT_DYLIB_PATH")?)?.build()?;
    let session = Session::builder(&env)?
        // `qins rewrite` puts the custom-op library beside the model it writes.
        .with_operator_library("smollm2-qins/libqins_provider.so")?
        .commit_from_file("smollm2-qins/model.onnx")?;
    println!("{} inputs, {} outputs", session.inputs().len(), session.outputs().len());
    Ok(())
}
// snippet end
