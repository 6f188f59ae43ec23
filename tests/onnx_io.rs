//! ONNX container handling: external data is checked when a model is opened, a saved model
//! keeps everything, and damaged models fail with messages instead of crashes.

mod common;

use common::{fixture, scratch};
use prost::Message;
use qins::onnx::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
use qins::onnx::{external_ref, save_model, AtomicDir, Model, SaveOptions};
use std::borrow::Cow;
use std::path::Path;

/// Copies a fixture folder so a test can damage it.
fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn edit_model(dir: &Path, f: impl FnOnce(&mut ModelProto)) {
    let p = dir.join("model.onnx");
    let mut m = ModelProto::decode(std::fs::read(&p).unwrap().as_slice()).unwrap();
    f(&mut m);
    std::fs::write(&p, m.encode_to_vec()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir) {
        Ok(_) => panic!("{} loaded although damaged", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn damaged_external_data_is_refused_with_a_reason() {
    let base = scratch("onnx-io-damaged");

    let truncated = base.join("truncated");
    copy_fixture("phi35-tiny-fp32-cpu", &truncated);
    let data = truncated.join("model.onnx.data");
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(len / 2).unwrap();
    let e = load_err(&truncated);
    assert!(e.contains("runs past the end") && e.contains("truncated"), "{e}");

    let missing = base.join("missing");
    copy_fixture("phi35-tiny-fp32-cpu", &missing);
    std::fs::remove_file(missing.join("model.onnx.data")).unwrap();
    let e = load_err(&missing);
    assert!(e.contains("model.onnx.data"), "{e}");

    for (tag, key, value, want) in [
        ("escape", "location", "../../etc/passwd", "plain relative path"),
        ("absolute", "location", "/etc/passwd", "plain relative path"),
        ("offset", "offset", "not-a-number", "bad external offset"),
        ("length", "length", "12", "does not match its shape"),
        ("overflow", "offset", "18446744073709551615", "runs past the end"),
    ] {
        let d = base.join(tag);
        copy_fixture("phi35-tiny-fp32-cpu", &d);
        edit_model(&d, |m| {
            let t = &mut m.graph.as_mut().unwrap().initializer[0];
            assert_eq!(t.data_location(), DataLocation::External);
            match t.external_data.iter_mut().find(|e| e.key() == key) {
                Some(e) => e.value = Some(value.into()),
                None => {
                    t.external_data.push(StringStringEntryProto { key: Some(key.into()), value: Some(value.into()) })
                }
            }
        });
        let e = load_err(&d);
        assert!(e.contains(want), "{tag}: {e}");
    }

    let garbage = base.join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    std::fs::write(garbage.join("model.onnx"), b"this is not protobuf \xff\xff\xff").unwrap();
    let e = load_err(&garbage);
    assert!(e.contains("not an ONNX model"), "{e}");
    let e = load_err(&base.join("does-not-exist"));
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn saving_keeps_every_field_and_relocates_external_data() {
    let m = Model::load(&fixture("phi35-tiny-fp32-cpu")).unwrap();
    let out = scratch("onnx-io-resave");
    let dir = AtomicDir::create(&out.join("model"), false).unwrap();
    let mut proto = m.proto.clone();
    let stats = save_model(&mut proto, &dir.path().join("model.onnx"), &SaveOptions::default(), &mut |t| {
        Ok(Cow::Borrowed(m.external_bytes(&external_ref(t)?.unwrap())?))
    })
    .unwrap();
    let target = dir.commit().unwrap();
    let r = Model::load(&target).unwrap();
    // Identical except for where external bytes sit.
    let strip = |p: &ModelProto| {
        let mut p = p.clone();
        for t in &mut p.graph.as_mut().unwrap().initializer {
            t.external_data.retain(|e| e.key() == "location");
        }
        p
    };
    assert_eq!(strip(&m.proto), strip(&r.proto));
    for (a, b) in m.graph().initializer.iter().zip(&r.graph().initializer) {
        assert_eq!(m.tensor_bytes(a).unwrap(), r.tensor_bytes(b).unwrap(), "{}", a.name());
    }
    // Large tensors start on a page.
    for t in &r.graph().initializer {
        if let Some(x) = external_ref(t).unwrap() {
            if x.length >= 1 << 16 {
                assert_eq!(x.offset % 4096, 0, "{}", t.name());
            }
        }
    }
    assert_eq!(
        stats.external_tensors,
        m.graph().initializer.iter().filter(|t| external_ref(t).unwrap().is_some()).count()
    );
}

#[test]
fn a_failed_save_leaves_nothing_behind() {
    let m = Model::load(&fixture("llama-gqa-tiny-fp32-cpu")).unwrap();
    let out = scratch("onnx-io-fail").join("model");
    let dir = AtomicDir::create(&out, false).unwrap();
    let mut proto = m.proto.clone();
    let mut n = 0;
    let r = save_model(&mut proto, &dir.path().join("model.onnx"), &SaveOptions::default(), &mut |t| {
        n += 1;
        if n == 3 {
            anyhow::bail!("simulated failure on {}", t.name());
        }
        Ok(Cow::Borrowed(m.external_bytes(&external_ref(t)?.unwrap())?))
    });
    assert!(r.unwrap_err().to_string().contains("simulated failure"));
    let tmp = dir.path().to_path_buf();
    drop(dir);
    assert!(!out.exists() && !tmp.exists(), "partial output left behind");
}

/// Nothing outside the model's folder is read: external data that is a symlink leading out
/// of it, or whose path goes through a symlinked folder that does, is refused (ONNX Runtime
/// 1.31 refuses both too); a symlink that stays inside is followed.
#[test]
fn external_data_may_not_escape_through_symlinks() {
    let base = scratch("onnx-io-symlinks");
    let outside = base.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(fixture("phi35-tiny-fp32-cpu").join("model.onnx.data"), outside.join("model.onnx.data")).unwrap();

    let file_link = base.join("file-link");
    copy_fixture("phi35-tiny-fp32-cpu", &file_link);
    std::fs::remove_file(file_link.join("model.onnx.data")).unwrap();
    std::os::unix::fs::symlink(outside.join("model.onnx.data"), file_link.join("model.onnx.data")).unwrap();
    let e = load_err(&file_link);
    assert!(e.contains("outside the model folder"), "{e}");

    let dir_link = base.join("dir-link");
    copy_fixture("phi35-tiny-fp32-cpu", &dir_link);
    std::fs::remove_file(dir_link.join("model.onnx.data")).unwrap();
    std::os::unix::fs::symlink(&outside, dir_link.join("data")).unwrap();
    set_locations(&dir_link, "data/model.onnx.data");
    let e = load_err(&dir_link);
    assert!(e.contains("outside the model folder"), "{e}");

    // The model file itself, linked in from elsewhere, when the folder is named.
    let model_link = base.join("model-link");
    std::fs::create_dir_all(&model_link).unwrap();
    std::os::unix::fs::symlink(fixture("phi35-tiny-fp32-cpu").join("model.onnx"), model_link.join("model.onnx"))
        .unwrap();
    let e = load_err(&model_link);
    assert!(e.contains("outside the model folder"), "{e}");

    let inside = base.join("inside");
    copy_fixture("phi35-tiny-fp32-cpu", &inside);
    std::fs::create_dir_all(inside.join("real")).unwrap();
    std::fs::rename(inside.join("model.onnx.data"), inside.join("real/model.onnx.data")).unwrap();
    std::os::unix::fs::symlink("real", inside.join("data")).unwrap();
    set_locations(&inside, "data/model.onnx.data");
    Model::load(&inside).unwrap();
}

fn set_locations(dir: &Path, location: &str) {
    edit_model(dir, |m| {
        for t in &mut m.graph.as_mut().unwrap().initializer {
            for e in &mut t.external_data {
                if e.key() == "location" {
                    e.value = Some(location.into());
                }
            }
        }
    });
}

/// A FIFO (or device) named like a model file is refused at once instead of blocking.
#[test]
fn a_fifo_is_not_a_model() {
    let base = scratch("onnx-io-fifo");
    let c = std::ffi::CString::new(base.join("model.onnx").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = base.clone();
    std::thread::spawn(move || tx.send(Model::load(&dir).err().map(|e| format!("{e:#}"))).unwrap());
    let e = rx.recv_timeout(std::time::Duration::from_secs(20)).expect("loading a FIFO blocked").unwrap();
    assert!(e.contains("not a regular file"), "{e}");

    let data = base.join("data-fifo");
    copy_fixture("phi35-tiny-fp32-cpu", &data);
    std::fs::remove_file(data.join("model.onnx.data")).unwrap();
    let c = std::ffi::CString::new(data.join("model.onnx.data").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = load_err(&data);
    assert!(e.contains("not a regular file"), "{e}");
}

/// Dims whose element count overflows no longer switch the size checks off: such a model
/// once loaded, was inspected and written, and only ONNX Runtime refused it.
#[test]
fn overflowing_dims_are_refused() {
    let base = scratch("onnx-io-dims");
    for (tag, dims) in [("overflow", vec![1i64 << 62, 64]), ("negative", vec![-1, 64])] {
        let d = base.join(tag);
        copy_fixture("phi35-tiny-fp32-cpu", &d);
        edit_model(&d, |m| m.graph.as_mut().unwrap().initializer[0].dims = dims.clone());
        let e = load_err(&d);
        assert!(e.contains("negative or too large"), "{tag}: {e}");
    }
}

/// Partial folders of a writer that died (SIGKILL) are removed by the next run that writes
/// beside them; a live writer's, and anything not marked as ours, stay.
#[test]
fn stale_partial_outputs_are_removed_and_nothing_else() {
    let base = scratch("onnx-io-stale");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let make = |name: &str, marker: Option<String>| {
        let p = base.join(name);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("model.onnx.data"), vec![0u8; 4096]).unwrap();
        if let Some(m) = marker {
            std::fs::write(p.join(".qins-partial"), m).unwrap();
        }
        p
    };
    // A pid that cannot be running: past the kernel's pid_max (at most 2^22).
    let dead = make(".out.partial-4194999", Some(format!("4194999\n{}\n", boot.trim())));
    // Our parent (the test runner) is alive.
    let parent_pid = std::os::unix::process::parent_id();
    let live = make(&format!(".out.partial-{parent_pid}"), Some(format!("{parent_pid}\n{}\n", boot.trim())));
    let unmarked = make(".out.partial-4194998", None);
    let other_name = make(".other.partial-4194997", Some(format!("4194997\n{}\n", boot.trim())));
    let dir = AtomicDir::create(&base.join("out"), false).unwrap();
    assert!(!dead.exists(), "a dead writer's partial folder stayed");
    assert!(live.exists() && unmarked.exists() && other_name.exists(), "a folder that is not stale went");
    drop(dir);
}

/// A failed run removes the folders it made for its output's parent, and only those.
#[test]
fn a_failed_run_removes_the_folders_it_made() {
    let base = scratch("onnx-io-made");
    let out = base.join("a/b/c/model");
    let dir = AtomicDir::create(&out, false).unwrap();
    assert!(base.join("a/b/c").is_dir());
    drop(dir);
    assert!(!base.join("a").exists(), "made folders were left behind");
    std::fs::create_dir_all(base.join("a")).unwrap();
    std::fs::write(base.join("a/keep"), b"x").unwrap();
    drop(AtomicDir::create(&out, false).unwrap());
    assert!(base.join("a/keep").exists() && !base.join("a/b").exists());
}
