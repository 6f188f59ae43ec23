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
