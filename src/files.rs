//! The files a command reads and writes.
//!
//! Reading: a model folder is resolved once to its canonical path, and every file read
//! from it (external data, configs, tokenizers) must resolve, symlinks followed, to a
//! regular file inside it; ONNX Runtime 1.31 refuses external data that escapes the model
//! folder, and so do we. Regular files only, opened without blocking: a FIFO or a device
//! in a model folder is refused instead of blocking forever or reading without end. Small
//! files are read with a size bound.
//!
//! Writing: an output path is resolved the way creating it would resolve it (the existing
//! part canonicalized, `..` after a missing folder undoing that folder), before anything
//! is created. It may not equal, lie inside or contain anything the command reads
//! ([`Inputs`]). An existing output is replaced only when it is an earlier output of ours
//! ([`is_our_output_dir`], [`is_our_output_file`]).

use anyhow::{anyhow, bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Largest config or report file read whole (`genai_config.json`, `qins_report.json`).
/// Real ones are a few kB; this only stops a hostile one from exhausting memory.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Largest `tokenizer.json` read (real ones: 2-20 MB; Gemma's is 33 MB).
pub const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// The marker files of our output folders: a folder holding one of them (and nothing but
/// regular files) is an earlier output of `qins rewrite`, `qins import-gguf` or the
/// synthesizer, which `--force` may replace.
pub const OUTPUT_MARKERS: [&str; 3] = ["qins_report.json", "qins_import.json", "qins_synth.json"];

/// The `generator` field every JSON file we write carries, so that a later run can tell
/// its own earlier output from somebody else's file of the same name.
pub fn generator() -> String {
    format!("qins {}", env!("CARGO_PKG_VERSION"))
}

/// Opens `path` for reading, if it is a regular file. The open does not block (a FIFO
/// would wait for a writer forever), and the type is checked on the open file, so a file
/// swapped in between a check and the open cannot slip through.
pub fn open_regular(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let md = f.metadata().with_context(|| format!("stat {}", path.display()))?;
    if !md.is_file() {
        bail!(
            "{} is not a regular file (a folder, FIFO, socket or device cannot be read as a model file)",
            path.display()
        );
    }
    Ok(f)
}

/// Reads a whole regular file of at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    let f = open_regular(path)?;
    let len = f.metadata()?.len();
    if len > max {
        bail!("{} is {len} bytes, more than the {max} a file of its kind may have", path.display());
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` bounds the read even if the file grows while we read it.
    f.take(max + 1).read_to_end(&mut buf).with_context(|| format!("read {}", path.display()))?;
    if buf.len() as u64 > max {
        bail!("{} grew past {max} bytes while being read", path.display());
    }
    Ok(buf)
}

/// A folder files are read from: canonical, and nothing read through it leaves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folder {
    root: PathBuf,
}

impl Folder {
    /// `path` must be an existing folder; symlinks on the way to it are the caller's
    /// choice and are resolved once, here.
    pub fn open(path: &Path) -> Result<Folder> {
        let shown = if path.as_os_str().is_empty() { Path::new(".") } else { path };
        let root = shown.canonicalize().with_context(|| format!("{} does not exist", shown.display()))?;
        if !root.is_dir() {
            bail!("{} is not a folder", shown.display());
        }
        Ok(Folder { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The canonical path of `rel` inside the folder. `rel` must be a plain relative path
    /// (no root, no `..`), and with every symlink followed it must still lie inside.
    pub fn inside(&self, rel: &Path) -> Result<PathBuf> {
        if rel.as_os_str().is_empty()
            || rel.is_absolute()
            || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            bail!("'{}' must be a plain relative path inside the model folder {}", rel.display(), self.root.display());
        }
        let joined = self.root.join(rel);
        let real = joined.canonicalize().with_context(|| format!("open {}", joined.display()))?;
        if !real.starts_with(&self.root) {
            bail!(
                "{} resolves to {}, outside the model folder {} (a symlink leads out of it); copy the file into the folder",
                joined.display(),
                real.display(),
                self.root.display()
            );
        }
        Ok(real)
    }

    /// Opens the regular file `rel` inside the folder.
    pub fn open_file(&self, rel: &Path) -> Result<File> {
        open_regular(&self.inside(rel)?)
    }

    /// Reads the small file `name` inside the folder: `None` if there is no such entry.
    pub fn read_optional(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        if std::fs::symlink_metadata(self.root.join(name)).is_err() {
            return Ok(None);
        }
        read_bounded(&self.inside(Path::new(name))?, max).map(Some)
    }
}

/// `path` as an absolute path without `.`, `..` or symlinks, the way creating it would
/// resolve it, without creating anything: its existing part is canonicalized, and after
/// the first missing component names are applied as they are (`..` undoes the missing
/// folder before it, as `mkdir -p` followed by a lookup would).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.as_os_str().is_empty() {
        bail!("an empty path");
    }
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().context("the current folder")?.join(path)
    };
    let mut out = PathBuf::from("/");
    let mut existing = true;
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                // The existing part of `out` is canonical, so its lexical parent is its real
                // one; back inside that part, names are looked up again.
                out.pop();
                existing = out.exists();
            }
            Component::Normal(name) => {
                out.push(name);
                if !existing {
                    continue;
                }
                match std::fs::symlink_metadata(&out) {
                    Ok(md) => {
                        if md.file_type().is_symlink() {
                            out = out.canonicalize().map_err(|e| {
                                anyhow!("{} is a symlink to a missing or unreadable target: {e}", out.display())
                            })?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => existing = false,
                    Err(e) => return Err(anyhow!("{}: {e}", out.display())),
                }
            }
        }
    }
    Ok(out)
}

/// Everything a command reads (model folders, GGUF files, text), canonical, so that an
/// output can be checked against all of it.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    paths: Vec<PathBuf>,
}

impl Inputs {
    pub fn new() -> Inputs {
        Inputs::default()
    }

    /// Adds an input that exists (canonicalized).
    pub fn add(&mut self, p: &Path) -> Result<&mut Self> {
        let c = p.canonicalize().with_context(|| format!("{} does not exist", p.display()))?;
        self.paths.push(c);
        Ok(self)
    }

    pub fn with(mut self, p: &Path) -> Result<Self> {
        self.add(p)?;
        Ok(self)
    }

    /// Resolves `out` ([`resolve`]) and refuses it if it is, lies inside or contains one of
    /// the inputs. Returns the resolved path, which is where the output must then go.
    pub fn check_output(&self, out: &Path, what: &str) -> Result<PathBuf> {
        let r = resolve(out).with_context(|| format!("{what} {}", out.display()))?;
        for i in &self.paths {
            let why = if &r == i {
                "is"
            } else if r.starts_with(i) {
                "lies inside"
            } else if i.starts_with(&r) {
                "contains"
            } else {
                continue;
            };
            bail!(
                "{what} {} (resolved: {}) {why} the input {}; nothing an input holds is ever replaced, write elsewhere",
                out.display(),
                r.display(),
                i.display()
            );
        }
        Ok(r)
    }
}

/// True when `dir` is an earlier output folder of ours: it holds one of
/// [`OUTPUT_MARKERS`], and nothing but regular files (our outputs have no subfolders or
/// links, so anything else was put there by somebody else).
pub fn is_our_output_dir(dir: &Path) -> Result<bool> {
    let mut marked = false;
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        if !e.file_type()?.is_file() {
            return Ok(false);
        }
        marked |= OUTPUT_MARKERS.iter().any(|m| e.file_name() == *m);
    }
    Ok(marked)
}

/// True when the existing file `path` is an earlier JSON output of ours (a JSON object
/// whose `generator` names qins).
pub fn is_our_output_file(path: &Path) -> bool {
    let Ok(bytes) = read_bounded(path, 1 << 30) else { return false };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return false };
    v.get("generator").and_then(|g| g.as_str()).is_some_and(|g| g.starts_with("qins "))
}

/// Checks, before any work, that `out` may take a JSON file of ours: not an input, in a
/// folder that exists and can be written, and not an existing file unless it is an
/// earlier output of ours. Returns the resolved path to write to.
pub fn check_output_file(out: &Path, inputs: &Inputs, what: &str) -> Result<PathBuf> {
    let r = inputs.check_output(out, what)?;
    match std::fs::symlink_metadata(&r) {
        Ok(md) if !md.is_file() => bail!("{what} {} exists and is not a regular file", out.display()),
        Ok(_) if !is_our_output_file(&r) => bail!(
            "{what} {} exists and is not an earlier qins output (no \"generator\": \"qins ...\"); not replacing it: \
             remove it yourself or choose another path",
            out.display()
        ),
        _ => {}
    }
    check_writable_parent(&r, what, out)?;
    Ok(r)
}

/// The folder that would hold `r` must exist and be writable: checked up front so that a
/// long run does not fail at its end over a path that could never have been written.
fn check_writable_parent(r: &Path, what: &str, shown: &Path) -> Result<()> {
    let parent = r.parent().ok_or_else(|| anyhow!("{what} {} has no parent folder", shown.display()))?;
    if !parent.is_dir() {
        bail!("{what} {}: the folder {} does not exist", shown.display(), parent.display());
    }
    // Permission bits do not tell (root passes access(2) on /proc, a read-only mount
    // fails only at write time): create and remove a probe file of our own.
    let probe = parent.join(format!(".qins-probe-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            std::fs::remove_file(&probe).ok();
            Ok(())
        }
        Err(e) => bail!("{what} {}: the folder {} is not writable ({e})", shown.display(), parent.display()),
    }
}

/// Writes `value` as pretty JSON with our `generator` field (added at the top level of an
/// object; anything else is wrapped as `{"generator", "results"}`) through a temporary
/// file renamed into place, so a crash leaves the old file or the new one, never half.
pub fn write_json_output(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(&json_document(value)?)?)
}

/// `value` as the JSON document every output of ours is: an object naming its generator
/// (anything else becomes the object's `results`). The same whether it goes to a file or to
/// stdout.
pub fn json_document(value: &impl serde::Serialize) -> Result<serde_json::Value> {
    Ok(match serde_json::to_value(value)? {
        serde_json::Value::Object(mut m) => {
            m.insert("generator".into(), generator().into());
            serde_json::Value::Object(m)
        }
        other => serde_json::json!({ "generator": generator(), "results": other }),
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| anyhow!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let r = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if r.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    r.with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qins-files-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(&d).unwrap();
        d.canonicalize().unwrap()
    }

    #[test]
    fn resolve_undoes_missing_folders_as_mkdir_would() {
        let d = scratch("resolve");
        std::fs::create_dir(d.join("in")).unwrap();
        assert_eq!(resolve(&d.join("x/missing/../in")).unwrap(), d.join("x/in"));
        assert_eq!(resolve(&d.join("missing/../in")).unwrap(), d.join("in"));
        assert_eq!(resolve(&d.join("in/./a/../../in")).unwrap(), d.join("in"));
        std::os::unix::fs::symlink(d.join("in"), d.join("link")).unwrap();
        assert_eq!(resolve(&d.join("link/new")).unwrap(), d.join("in/new"));
        std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
        assert!(resolve(&d.join("dangling")).is_err());
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn outputs_may_not_touch_inputs() {
        let d = scratch("inputs");
        std::fs::create_dir_all(d.join("in/data")).unwrap();
        let inputs = Inputs::new().with(&d.join("in")).unwrap();
        for bad in ["in", "in/data", "in/new", ".", "x/../in", "x/y/../../in/data"] {
            let e = inputs.check_output(&d.join(bad), "output").unwrap_err().to_string();
            assert!(e.contains("the input"), "{bad}: {e}");
        }
        assert_eq!(inputs.check_output(&d.join("out"), "output").unwrap(), d.join("out"));
        assert_eq!(inputs.check_output(&d.join("in2"), "output").unwrap(), d.join("in2"));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn folder_reads_stay_inside() {
        let d = scratch("folder");
        std::fs::create_dir_all(d.join("m/sub")).unwrap();
        std::fs::write(d.join("secret"), b"s").unwrap();
        std::fs::write(d.join("m/sub/ok"), b"ok").unwrap();
        std::os::unix::fs::symlink(d.join("secret"), d.join("m/out")).unwrap();
        std::os::unix::fs::symlink(&d, d.join("m/up")).unwrap();
        std::os::unix::fs::symlink(d.join("m/sub"), d.join("m/in")).unwrap();
        let f = Folder::open(&d.join("m")).unwrap();
        assert!(f.inside(Path::new("out")).unwrap_err().to_string().contains("outside the model folder"));
        assert!(f.inside(Path::new("up/secret")).unwrap_err().to_string().contains("outside the model folder"));
        assert!(f.inside(Path::new("../secret")).is_err());
        assert!(f.inside(Path::new("/etc/passwd")).is_err());
        assert_eq!(f.read_optional("in/ok", 10).unwrap().unwrap(), b"ok");
        assert_eq!(f.read_optional("nothing", 10).unwrap(), None);
        assert!(f.read_optional("sub/ok", 1).unwrap_err().to_string().contains("more than"));
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn fifos_are_refused_without_blocking() {
        let d = scratch("fifo");
        let p = d.join("model.onnx");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_regular(&p).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_dir_all(&d).ok();
    }

    #[test]
    fn json_outputs_are_recognised_as_ours() {
        let d = scratch("json");
        let p = d.join("r.json");
        write_json_output(&p, &serde_json::json!({"a": 1})).unwrap();
        assert!(is_our_output_file(&p));
        write_json_output(&p, &vec![1, 2]).unwrap();
        assert!(is_our_output_file(&p));
        std::fs::write(&p, b"{\"a\": 1}").unwrap();
        assert!(!is_our_output_file(&p));
        let inputs = Inputs::new();
        assert!(check_output_file(&p, &inputs, "--json").unwrap_err().to_string().contains("not an earlier qins"));
        assert!(check_output_file(&d.join("nofolder/r.json"), &inputs, "--json").is_err());
        std::fs::remove_dir_all(&d).ok();
    }
}
