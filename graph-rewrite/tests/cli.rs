//! The `qins` binary as a careless or hostile user runs it: nothing it is given is ever
//! lost, bad input ends in a clean error (never a panic or a hang), and no command reports
//! success having measured nothing. Each case here once lost data, panicked, hung or
//! passed silently.

use prost::Message;
use qins::onnx::proto::ModelProto;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The binary under test; `QINS_TEST_BIN` points the same tests at another build (to show
/// that each fails on the release before its fix).
fn qins() -> Command {
    let bin = std::env::var_os("QINS_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_qins").into());
    let mut c = Command::new(bin);
    c.env_remove("RUST_BACKTRACE");
    c
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/qins-test/cli").join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d).unwrap();
    }
    std::fs::create_dir_all(&d).unwrap();
    d.canonicalize().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Every file under `dir` with its bytes, to prove nothing changed.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            } else {
                v.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    v.sort();
    v
}

fn run(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("internal error"), "a panic reached the user: {err}");
    o
}

/// Runs and expects a clean failure whose message mentions `want`.
fn fails(c: &mut Command, want: &str) -> String {
    let o = run(c);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "succeeded, expected an error about '{want}'; stderr: {err}");
    assert!(err.contains(want), "'{err}' does not mention '{want}'");
    err
}

fn ok(c: &mut Command) -> Output {
    let o = run(c);
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn model_in(dir: &Path) -> PathBuf {
    copy_dir(&fixture("phi35-tiny-fp32-cpu"), dir);
    dir.to_path_buf()
}

fn edit_model(dir: &Path, f: impl FnOnce(&mut ModelProto)) {
    let p = dir.join("model.onnx");
    let mut m = ModelProto::decode(std::fs::read(&p).unwrap().as_slice()).unwrap();
    f(&mut m);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect()
}

/// `-o X/missing/../IN --force` once replaced IN: `..` after a missing folder slipped past
/// the check. Now refused before anything is created.
#[test]
fn dotdot_after_a_missing_folder_cannot_reach_the_input() {
    let base = scratch("dotdot");
    let input = model_in(&base.join("in"));
    let before = snapshot(&input);
    for force in [true, false] {
        let mut c = qins();
        c.args(["rewrite", "in", "-o", "x/missing/../../in", "-q"]).current_dir(&base);
        if force {
            c.arg("--force");
        }
        fails(&mut c, "is the input");
        assert_eq!(snapshot(&input), before);
        assert!(!base.join("x").exists(), "the missing folders were created");
    }
}

/// Output inside the input folder (e.g. its data folder) once deleted the model's data.
#[test]
fn output_inside_or_around_the_input_is_refused() {
    let base = scratch("inside");
    let input = model_in(&base.join("in"));
    std::fs::create_dir(input.join("data")).unwrap();
    std::fs::rename(input.join("model.onnx.data"), input.join("data/model.onnx.data")).unwrap();
    edit_model(&input, |m| {
        for t in &mut m.graph.as_mut().unwrap().initializer {
            for e in t.external_data.iter_mut().filter(|e| e.key() == "location") {
                e.value = Some("data/model.onnx.data".into());
            }
        }
    });
    ok(qins().args(["inspect"]).arg(&input));
    let before = snapshot(&input);
    for out in ["in/data", "in/new", "in", ".", "in/model.onnx"] {
        fails(qins().args(["rewrite", "in", "-q", "--force", "-o", out]).current_dir(&base), "the input");
        assert_eq!(snapshot(&input), before, "-o {out}");
    }
    // Side outputs may not land on the input either.
    fails(
        qins().args(["rewrite", "in", "-q", "-o", "out", "--report", "in/model.onnx"]).current_dir(&base),
        "the input",
    );
    fails(qins().args(["report", "in", "--json", "in/data/model.onnx.data"]).current_dir(&base), "the input");
    assert_eq!(snapshot(&input), before);
    assert!(!base.join("out").exists());
}

/// A bare file name (`cd IN && qins rewrite model.onnx`) once made the model folder "",
/// which failed without context and switched the output check off.
#[test]
fn a_bare_file_name_is_resolved() {
    let base = scratch("bare");
    let input = model_in(&base.join("in"));
    let before = snapshot(&input);
    fails(qins().args(["rewrite", "model.onnx", "-q", "--force", "-o", "."]).current_dir(&input), "the input");
    fails(qins().args(["rewrite", "model.onnx", "-q", "--force", "-o", "sub"]).current_dir(&input), "the input");
    assert_eq!(snapshot(&input), before);
    ok(qins().args(["rewrite", "model.onnx", "-q", "-o", "../out"]).current_dir(&input));
    assert!(base.join("out/model.onnx").exists() && base.join("out/genai_config.json").exists());
    ok(qins().args(["inspect", "model.onnx"]).current_dir(&input));
}

/// `--force` replaces an earlier output of ours, never a folder that is not one.
#[test]
fn force_replaces_only_our_own_output() {
    let base = scratch("force");
    let input = model_in(&base.join("in"));
    let theirs = base.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("thesis.tex"), b"years of work").unwrap();
    let before = snapshot(&theirs);
    fails(qins().args(["rewrite", "-q", "--force", "-o"]).arg(&theirs).arg(&input), "not an earlier qins output");
    assert_eq!(snapshot(&theirs), before);
    assert!(partials(&base).is_empty());
    let out = base.join("out");
    ok(qins().args(["rewrite", "-q", "-o"]).arg(&out).arg(&input));
    fails(qins().args(["rewrite", "-q", "-o"]).arg(&out).arg(&input), "--force");
    std::fs::write(out.join("old-extra"), b"from before").unwrap();
    ok(qins().args(["rewrite", "-q", "--force", "--bits", "4", "-o"]).arg(&out).arg(&input));
    assert!(!out.join("old-extra").exists() && out.join("qins_report.json").exists());
    // An earlier output that somebody put a folder into is theirs now.
    std::fs::create_dir(out.join("notes")).unwrap();
    fails(qins().args(["rewrite", "-q", "--force", "-o"]).arg(&out).arg(&input), "not an earlier qins output");
    assert!(out.join("notes").exists());
    // A JSON report only replaces an earlier report of ours.
    let foreign = base.join("report.json");
    std::fs::write(&foreign, b"{\"mine\": true}").unwrap();
    fails(qins().args(["report", "--json"]).arg(&foreign).arg(&input), "not an earlier qins output");
    assert_eq!(std::fs::read(&foreign).unwrap(), b"{\"mine\": true}");
    let ours = base.join("ours.json");
    ok(qins().args(["report", "--json"]).arg(&ours).arg(&input));
    ok(qins().args(["report", "--json"]).arg(&ours).arg(&input));
}

/// Symlinks leading out of the model folder are not followed.
#[test]
fn symlinked_external_data_outside_the_folder_is_refused() {
    let base = scratch("symlink");
    let input = model_in(&base.join("in"));
    std::fs::rename(input.join("model.onnx.data"), base.join("elsewhere.data")).unwrap();
    std::os::unix::fs::symlink(base.join("elsewhere.data"), input.join("model.onnx.data")).unwrap();
    fails(qins().args(["inspect"]).arg(&input), "outside the model folder");
    fails(qins().args(["rewrite", "-q", "-o"]).arg(base.join("out")).arg(&input), "outside the model folder");
    assert!(!base.join("out").exists());
    // A sidecar that leads out is not copied either.
    let input2 = model_in(&base.join("in2"));
    std::os::unix::fs::symlink("/etc/hostname", input2.join("tokenizer.json")).unwrap();
    fails(qins().args(["rewrite", "-q", "-o"]).arg(base.join("out2")).arg(&input2), "outside the model folder");
    assert!(!base.join("out2").exists() && partials(&base).is_empty());
}

/// Bad numbers on the command line end in clean errors.
#[test]
fn bad_arguments_are_clean_errors() {
    let base = scratch("args");
    let input = model_in(&base.join("in"));
    let out = base.join("out");
    // Wrapped around to 960..1920 and quantized Q and K.
    fails(
        qins().args(["rewrite", "-q", "--qkv-split", "18446744073709551615,1,960", "-o"]).arg(&out).arg(&input),
        "adds up to more than",
    );
    // Panicked: "chunk size must be non-zero".
    fails(qins().args(["rewrite", "-q", "--qkv-split", "960,0,0", "-o"]).arg(&out).arg(&input), "at least 1");
    fails(qins().args(["parity", "--window", "0", "--text", "x"]).arg(&input).arg(&input), "--window");
    fails(qins().args(["parity", "--windows", "0", "--text", "x"]).arg(&input).arg(&input), "--windows");
    // Grew memory without end.
    fails(qins().args(["parity", "--threads", "100000", "--text", "x"]).arg(&input).arg(&input), "4 per core");
    fails(qins().args(["rewrite", "-q", "--kv-v", "q6", "-o"]).arg(&out).arg(&input), "q8, q4 or none");
    assert!(!out.exists());
    // --preset none with a V cache format is a rewrite of its own (the attention alone).
    let ok = qins()
        .args(["rewrite", "-q", "--preset", "none", "--kv-v", "q8", "-o"])
        .arg(&out)
        .arg(&input)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.join("qins_report.json").is_file());
}

/// When every MatMul is passed over, the error says why.
#[test]
fn skipped_matmuls_say_why() {
    let base = scratch("skips");
    let input = model_in(&base.join("in"));
    let e = fails(qins().args(["rewrite", "-q", "--exclude", ".", "-o"]).arg(base.join("o")).arg(&input), "no MatMul");
    assert!(e.contains("excluded by --exclude"), "{e}");
    let e =
        fails(qins().args(["rewrite", "-q", "--preset", "none", "-o"]).arg(base.join("o")).arg(&input), "no MatMul");
    assert!(e.contains("stays float under the None preset"), "{e}");
    // Weights that are not float: int8.
    edit_model(&input, |m| {
        for t in &mut m.graph.as_mut().unwrap().initializer {
            if t.dims.len() == 2 {
                t.data_type = Some(qins::onnx::dtype::INT8);
                let n: i64 = t.dims.iter().product();
                for e in t.external_data.iter_mut().filter(|e| e.key() == "length") {
                    e.value = Some(n.to_string());
                }
            }
        }
    });
    let e = fails(qins().args(["rewrite", "-q", "-o"]).arg(base.join("o")).arg(&input), "no MatMul");
    assert!(e.contains("weight type int8 is not a float type"), "{e}");
    // A weight whose bytes do not match its shape is passed over at once (it once failed the
    // rewrite after every other weight was encoded).
    let input = model_in(&base.join("in2"));
    edit_model(&input, |m| {
        let g = m.graph.as_mut().unwrap();
        let w = g.initializer.iter_mut().find(|t| t.name().contains("layers.0.mlp.down_proj")).unwrap();
        w.external_data.clear();
        w.data_location = None;
        w.raw_data = Some(vec![0u8; 3].into());
    });
    let o = ok(qins().arg("inspect").arg(&input));
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out.lines().find(|l| l.contains("layers.0/mlp/down_proj")).unwrap();
    assert!(line.contains("no: its data is unreadable"), "{line}");
}

/// `--report` to a folder that cannot be written once failed after the output was written.
#[test]
fn an_unwritable_report_fails_before_the_work() {
    let base = scratch("report");
    let input = model_in(&base.join("in"));
    let out = base.join("out");
    fails(
        qins().args(["rewrite", "-q", "--report", "/proc/qins-report.json", "-o"]).arg(&out).arg(&input),
        "not writable",
    );
    fails(
        qins().args(["rewrite", "-q", "--report"]).arg(base.join("no/such/r.json")).arg("-o").arg(&out).arg(&input),
        "does not exist",
    );
    assert!(!out.exists(), "the output was written although the report could not be");
    ok(qins().args(["rewrite", "-q", "--report"]).arg(base.join("r.json")).arg("-o").arg(&out).arg(&input));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(base.join("r.json")).unwrap()).unwrap();
    assert!(r["generator"].as_str().unwrap().starts_with("qins "));
}

/// `qins inspect MODEL | head -1` once panicked on the closed pipe.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let input = fixture("phi35-tiny-fp32-cpu");
    let mut child = qins().arg("inspect").arg(&input).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    assert!(o.status.success(), "{:?}: {err}", o.status);
}

/// A FIFO where a model file should be once blocked forever.
#[test]
fn a_fifo_model_does_not_hang() {
    let base = scratch("fifo");
    let c = std::ffi::CString::new(base.join("model.onnx").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut child = qins().arg("inspect").arg(&base).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > 30 {
            child.kill().unwrap();
            panic!("qins inspect blocked on a FIFO");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a regular file"));
}

/// A minimal word-level tokenizer.json, enough for the checks that run before a model does.
fn word_tokenizer(dir: &Path) {
    let t = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&t).unwrap()).unwrap();
}

/// Parity with nothing to score once exited 0 with an empty table.
#[test]
fn parity_that_would_measure_nothing_fails() {
    let base = scratch("parity");
    let input = model_in(&base.join("in"));
    word_tokenizer(&input);
    let text = base.join("empty.txt");
    std::fs::write(&text, b"").unwrap();
    fails(qins().args(["parity", "--text"]).arg(&text).arg(&input).arg(&input), "not one window");
    std::fs::write(&text, b"hello").unwrap();
    fails(qins().args(["parity", "--text"]).arg(&text).arg(&input).arg(&input), "not one window");
    fails(qins().args(["parity", "--window", "1", "--text"]).arg(&text).arg(&input).arg(&input), "--window");
    // The JSON and the plots may not land in a model folder.
    std::fs::write(&text, b"hello world hello world").unwrap();
    fails(
        qins().args(["parity", "--json"]).arg(input.join("r.json")).arg("--text").arg(&text).arg(&input).arg(&input),
        "the input",
    );
    fails(
        qins()
            .args(["parity", "--suite", "ci", "--plots"])
            .arg(&input)
            .arg("--text")
            .arg(&text)
            .arg(&input)
            .arg(&input),
        "the input",
    );
}

/// Generating past the context once failed after a minute and threw the tokens away.
#[test]
fn generate_past_the_context_fails_up_front() {
    let base = scratch("generate");
    let input = model_in(&base.join("in"));
    word_tokenizer(&input);
    let t0 = std::time::Instant::now();
    let e = fails(
        qins().args(["generate", "--prompt", "hello world", "--max-tokens", "9000"]).arg(&input),
        "past the model's context of 8192",
    );
    assert!(e.contains("at most 8190 new tokens"), "{e}");
    assert!(t0.elapsed().as_secs() < 20);
}

/// Ctrl-C or SIGTERM during a rewrite once left a hidden partial folder behind forever.
#[test]
fn an_interrupted_rewrite_leaves_nothing() {
    let Some(gguf) = smollm2_gguf() else { return };
    let base = scratch("interrupt");
    ok(qins().args(["import-gguf", "-o"]).arg(base.join("smol")).arg(&gguf));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let out = base.join("out");
        let mut child =
            qins().args(["rewrite", "-q", "--bits", "4", "-o"]).arg(&out).arg(base.join("smol")).spawn().unwrap();
        // Wait until the partial folder has data in it, then interrupt.
        let t0 = std::time::Instant::now();
        loop {
            let p = partials(&base);
            if p.iter().any(|n| base.join(n).join("model.onnx.data").exists()) {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "the rewrite finished before it could be interrupted");
            assert!(t0.elapsed().as_secs() < 120);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        let status = child.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::into_raw(status) >> 8, 128 + sig, "{status:?}");
        assert!(partials(&base).is_empty(), "left behind: {:?}", partials(&base));
        assert!(!out.exists());
    }
    // SIGKILL cannot be caught: the next run removes what the killed one left.
    let out = base.join("out");
    let mut child =
        qins().args(["rewrite", "-q", "--bits", "4", "-o"]).arg(&out).arg(base.join("smol")).spawn().unwrap();
    while partials(&base).is_empty() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(partials(&base).len(), 1);
    let o = ok(qins().args(["rewrite", "-q", "--bits", "4", "-o"]).arg(&out).arg(base.join("smol")));
    assert!(String::from_utf8_lossy(&o.stderr).contains("left behind by an interrupted run"));
    assert!(partials(&base).is_empty() && out.join("model.onnx").exists());
}

/// `-o out/model.onnx` once made a folder named `model.onnx` that ONNX Runtime then failed to
/// parse ("Protobuf parsing failed"); `-o` takes the folder, and a model file name is refused.
#[test]
fn an_onnx_output_path_is_refused() {
    let base = scratch("onnx-out");
    let input = model_in(&base.join("in"));
    for out in ["out/model.onnx", "m.ONNX"] {
        let e = fails(qins().args(["rewrite", "-q", "in", "-o", out]).current_dir(&base), "takes the output folder");
        assert!(e.contains("use -o"), "{e}");
        fails(qins().args(["import-gguf", "x.gguf", "-o", out]).current_dir(&base), "takes the output folder");
    }
    assert!(!base.join("out").exists() && !base.join("m.ONNX").exists());
    ok(qins().args(["rewrite", "-q", "-o"]).arg(base.join("out")).arg(&input));
    assert!(base.join("out/model.onnx").is_file());
}

/// `--json` once meant a stdout flag in one command and a file in the others; now it is a
/// file everywhere, or `-` for stdout (the table then goes to stderr, stdout stays JSON).
#[test]
fn json_is_a_file_or_stdout_everywhere() {
    let base = scratch("json");
    let input = model_in(&base.join("in"));
    let stdout_json = |args: &[&str]| -> serde_json::Value {
        let o = ok(qins().args(args).arg(&input));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e})"))
    };
    assert!(stdout_json(&["inspect", "--json", "-"])["results"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(stdout_json(&["report", "--json", "-"])["generator"].as_str().is_some_and(|g| g.starts_with("qins ")));
    let out = base.join("out");
    let r = stdout_json(&["rewrite", "-o", out.to_str().unwrap(), "--json", "-"]);
    assert!(r["layers"].as_array().is_some_and(|l| !l.is_empty()), "{r}");
    for cmd in ["inspect", "report"] {
        let f = base.join(format!("{cmd}.json"));
        let o = ok(qins().args([cmd, "--json"]).arg(&f).arg(&input));
        assert!(!o.stdout.is_empty(), "{cmd}: the table is still printed");
        let _: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    }
    fails(qins().args(["inspect", "--json", ""]).arg(&input), "--json needs a file name");
}

/// onnxruntime-genai refuses a QINS model until the library is in its folder and named in
/// genai_config.json; `qins rewrite` does both (scripts/test-genai.sh runs genai on it).
#[test]
fn rewrite_places_the_library_for_genai() {
    let base = scratch("library");
    let input = model_in(&base.join("in"));
    let lib = base.join("libqins_provider.so");
    std::fs::write(&lib, b"stand-in for the custom-op library").unwrap();
    let out = base.join("out");
    ok(qins().args(["rewrite", "-q", "--provider-lib"]).arg(&lib).arg("-o").arg(&out).arg(&input));
    assert_eq!(std::fs::read(out.join("libqins_provider.so")).unwrap(), std::fs::read(&lib).unwrap());
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("genai_config.json")).unwrap()).unwrap()
    };
    let (before, mut after) = (config(&input), config(&out));
    let options = &mut after["model"]["decoder"]["session_options"];
    assert_eq!(options["custom_ops_library"], "libqins_provider.so");
    options.as_object_mut().unwrap().remove("custom_ops_library");
    assert_eq!(after, before, "only the library's entry may change");
    // An earlier output with the library in it is still ours to replace.
    ok(qins().args(["rewrite", "-q", "--force", "--no-library", "-o"]).arg(&out).arg(&input));
    assert!(!out.join("libqins_provider.so").exists());
    assert_eq!(
        std::fs::read(out.join("genai_config.json")).unwrap(),
        std::fs::read(input.join("genai_config.json")).unwrap()
    );
    fails(
        qins()
            .args(["rewrite", "-q", "--force", "--provider-lib"])
            .arg(base.join("none.so"))
            .arg("-o")
            .arg(&out)
            .arg(&input),
        "is not a file",
    );
    assert!(out.join("qins_report.json").exists(), "a refused rewrite removed the earlier output");
}

/// The chat template is the model's own (tokenizer_config.json), not a hard-coded ChatML; a
/// `.onnx` file is accepted as well as its folder; `--json -` records what was generated.
#[test]
fn generate_uses_the_models_chat_template() {
    let Some(gguf) = smollm2_gguf() else { return };
    let base = scratch("chat");
    ok(qins().args(["import-gguf", "-o"]).arg(base.join("smol")).arg(&gguf));
    let gen = |model: &Path, extra: &[&str]| -> serde_json::Value {
        let o =
            ok(qins().args(["generate", "--max-tokens", "4", "--json", "-", "--prompt", "Hi"]).args(extra).arg(model));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let inside = base.join("smol/generated.json");
    fails(
        qins().args(["generate", "--prompt", "Hi", "--json"]).arg(&inside).arg(base.join("smol/model.onnx")),
        "lies inside the input",
    );
    let plain = gen(&base.join("smol/model.onnx"), &[]);
    assert_eq!(plain["prompt_tokens"].as_array().unwrap().len(), 1, "{plain}");
    assert_eq!(plain["tokens"].as_array().unwrap().len(), 4);
    let chat = gen(&base.join("smol"), &["--chat", "--system", "Be brief."]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("smol/tokenizer_config.json")).unwrap()).unwrap();
    assert!(cfg["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    // SmolLM2's template: <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n
    let ids = chat["prompt_tokens"].as_array().unwrap();
    assert_eq!(ids[0], 1, "the turn opens with <|im_start|> (id 1): {chat}");
    assert!(ids.len() > 10, "{chat}");
    // The model's template writes a system turn of its own when none is given.
    let default_system = gen(&base.join("smol"), &["--chat"]);
    assert!(default_system["prompt_tokens"].as_array().unwrap().len() > ids.len());
    // The text streamed to stdout, piece by piece, is the text of all the tokens.
    let f = base.join("streamed.json");
    let o = ok(qins()
        .args(["generate", "--max-tokens", "40", "--prompt", "Once upon a time", "--json"])
        .arg(&f)
        .arg(base.join("smol")));
    let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end_matches('\n'), j["text"].as_str().unwrap());
    assert!(j["tokens"].as_array().unwrap().len() > 5, "{j}");
    std::fs::remove_file(base.join("smol/tokenizer_config.json")).unwrap();
    fails(qins().args(["generate", "--chat", "--prompt", "Hi"]).arg(base.join("smol")), "no tokenizer_config.json");
}

fn smollm2_gguf() -> Option<PathBuf> {
    let p = std::env::var_os("QINS_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.exists() {
        return Some(p);
    }
    if std::env::var("QINS_ALLOW_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: SmolLM2 GGUF not found (run scripts/setup.sh)");
        return None;
    }
    panic!("SmolLM2 GGUF not found: run scripts/setup.sh (or set QINS_ALLOW_SKIP=1 to skip)");
}
