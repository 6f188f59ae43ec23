//! Runs the importer by hand until the `qins` CLI wires it in:
//! `cargo run --release -p qins-models --example import_gguf -- MODEL.gguf OUT_DIR [--force]`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force = args.iter().any(|a| a == "--force");
    let paths: Vec<&String> = args.iter().filter(|a| *a != "--force").collect();
    let [gguf, out] = paths[..] else {
        anyhow::bail!("usage: import_gguf MODEL.gguf OUT_DIR [--force]");
    };
    let report = qins_models::import_gguf(&PathBuf::from(gguf), &PathBuf::from(out), force, &mut |m| eprintln!("{m}"))?;
    println!("{report}");
    Ok(())
}
