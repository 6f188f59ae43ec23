//! A mapped input that shrinks while it is read: the read sees zeros instead of killing the
//! process with SIGBUS, and the fault is reported before anything is committed. Its own
//! test binary, because a fault marks the whole process as having read garbage.

use qins::mapped::{check_intact, install_sigbus_guard, MappedFile};

#[test]
fn a_truncated_map_is_an_error_not_a_crash() {
    install_sigbus_guard();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.onnx.data");
    std::fs::write(&p, vec![7u8; 64 << 10]).unwrap();
    let map = MappedFile::open(&p).unwrap();
    assert_eq!(map[40_000], 7);
    check_intact().unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(4096).unwrap();
    // Past the new end: without the guard this read raises SIGBUS and ends the process.
    let sum: u64 = map[8192..].iter().map(|&b| b as u64).sum();
    assert_eq!(sum, 0, "the missing pages read as zeros");
    assert_eq!(map[100], 7, "the pages still in the file are untouched");
    let e = check_intact().unwrap_err().to_string();
    assert!(e.contains("model.onnx.data") && e.contains("shrank"), "{e}");
    drop(map);
    // The fault stays reported after the map is gone.
    assert!(check_intact().unwrap_err().to_string().contains("model.onnx.data"));
    // A save that would commit now refuses.
    let out = dir.path().join("out");
    let d = qins::onnx::AtomicDir::create(&out, false).unwrap();
    let tmp = d.path().to_path_buf();
    assert!(d.commit().is_err());
    assert!(!out.exists() && !tmp.exists());
}
