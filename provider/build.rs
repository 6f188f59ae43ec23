//! Link flags for the cdylib.

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
}
