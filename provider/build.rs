//! Link flags for the cdylib, and the CUDA kernels.
//!
//! The kernels in `kernels/<op family>/*.cu` (headers shared across families in
//! `kernels/common/`) are compiled here, ahead of time, with nvcc into fat binaries
//! that the library embeds (`src/cuda/module.rs`): sm_80 and sm_90 machine code, and compute_90
//! PTX that newer GPUs' drivers compile at load. nvcc is looked for in `$QINS_NVCC`, then in
//! `.deps/cuda` (where `scripts/setup.sh` installs CUDA 13.0's from PyPI), then in `$CUDA_HOME`
//! and on `PATH`. Without one the library is built with no CUDA kernels (a warning says so),
//! unless `QINS_REQUIRE_CUDA=1`, which CI sets so that kernel compile errors fail the build.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel files, by op family: `kernels/{family}/{file}.cu` becomes `{file}.fatbin`, which
/// `src/cuda/module.rs` embeds. Benchmark-only entry points (`QINS_PROBE_KERNELS`) are not
/// built here: `scripts/gpu/stage.sh` builds them for the probes.
const KERNELS: [(&str, &str); 4] = [
    ("qins_matmul", "qins_matmul"),
    ("qins_matmul", "qins_matmul_prefill"),
    ("qins_matmul", "qins_decode"),
    ("qins_attention", "qins_attention"),
];

fn main() {
    // ONNX Runtime may dlclose a custom-op library when the session options that loaded it go
    // away, while code of ours is still due to run: the destructors of the kernels'
    // thread-local scratch on ORT's pool threads (at those threads' exit), and rayon's worker
    // threads, sleeping inside our code, if a Rust host also called the kernels directly.
    // Marking the library non-deletable keeps it mapped for the life of the process, which is
    // also what a second registration then reuses.
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "android" || os.ends_with("bsd") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(qins_cuda_kernels)");
    println!("cargo:rerun-if-env-changed=QINS_NVCC");
    println!("cargo:rerun-if-env-changed=QINS_REQUIRE_CUDA");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");

    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let kernels = root.join("kernels");
    for dir in std::fs::read_dir(&kernels).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
    let required = std::env::var("QINS_REQUIRE_CUDA").is_ok_and(|v| v == "1");
    let Some(nvcc) = find_nvcc(&root) else {
        if required {
            panic!("QINS_REQUIRE_CUDA=1 but no nvcc was found (set QINS_NVCC, or run scripts/setup.sh)");
        }
        println!("cargo:warning=no nvcc found: building the QINS library without CUDA kernels");
        return;
    };
    println!("cargo:rerun-if-changed={}", nvcc.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // The PyPI nvcc keeps the CUDA headers beside its bin/ folder.
    let include = nvcc.parent().and_then(Path::parent).map(|p| p.join("include"));
    // The files compile in parallel: each takes a while for all its instantiations.
    let jobs: Vec<_> = KERNELS
        .iter()
        .map(|(family, name)| {
            let mut cmd = Command::new(&nvcc);
            cmd.arg("-O3").arg("-std=c++17").arg("-fatbin").arg("-Xptxas=-warn-spills");
            for gencode in
                ["arch=compute_80,code=sm_80", "arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90"]
            {
                cmd.arg(format!("-gencode={gencode}"));
            }
            if let Some(inc) = include.as_ref().filter(|p| p.is_dir()) {
                cmd.arg("-I").arg(inc);
            }
            cmd.arg(kernels.join(family).join(format!("{name}.cu"))).arg("-o").arg(out.join(format!("{name}.fatbin")));
            let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            (name, child)
        })
        .collect();
    for (name, mut child) in jobs {
        let status = child.wait().expect("wait for nvcc");
        if !status.success() {
            panic!("nvcc failed on kernels/.../{name}.cu ({status})");
        }
    }
    println!("cargo:rustc-cfg=qins_cuda_kernels");
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let runs = |p: &Path| Command::new(p).arg("--version").output().is_ok_and(|o| o.status.success());
    if let Some(p) = std::env::var_os("QINS_NVCC") {
        let p = PathBuf::from(p);
        return runs(&p).then_some(p);
    }
    let mut candidates = vec![root.join(".deps/cuda/nvidia/cu13/bin/nvcc")];
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin/nvcc"));
    }
    candidates.push(PathBuf::from("nvcc"));
    candidates.into_iter().find(|p| runs(p))
}
