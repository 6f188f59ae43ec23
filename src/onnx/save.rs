//! Writing models: external data packed into one file, the whole output made visible
//! only once complete.

use super::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto, TensorProto};
use super::{checked_expected_bytes, for_each_tensor_mut};
use anyhow::{bail, Context, Result};
use prost::Message;
use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct SaveOptions {
    /// File name of the external data, beside the `.onnx` file.
    pub data_file: String,
    /// Inline tensors of at least this many bytes move to the data file (`None`: keep them
    /// where they are).
    pub externalize_min_bytes: Option<usize>,
    /// Wait until the data is on disk (fsync) before returning. The output is complete and
    /// renamed into place either way; this adds durability across a power loss, at the cost
    /// of waiting for the disk.
    pub fsync: bool,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { data_file: "model.onnx.data".into(), externalize_min_bytes: None, fsync: false }
    }
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SaveStats {
    pub onnx_bytes: u64,
    pub data_bytes: u64,
    pub external_tensors: usize,
}

/// Large tensors start on a page boundary so that ONNX Runtime can map them directly.
fn alignment(len: u64) -> u64 {
    if len >= 1 << 16 {
        4096
    } else {
        64
    }
}

/// Writes `proto` to `onnx_path` and every external tensor to one data file beside it,
/// rewriting their `external_data` entries. `resolve` supplies the bytes of each external
/// tensor (from the input's maps, or freshly encoded); it is called once per tensor, in
/// file order, so encoders can run lazily and nothing is held longer than one tensor.
pub fn save_model<'r>(
    proto: &mut ModelProto,
    onnx_path: &Path,
    opts: &SaveOptions,
    resolve: &mut dyn FnMut(&TensorProto) -> Result<Cow<'r, [u8]>>,
) -> Result<SaveStats> {
    let dir = onnx_path.parent().unwrap_or(Path::new("."));
    let data_path = dir.join(&opts.data_file);
    let file = File::create(&data_path).with_context(|| format!("create {}", data_path.display()))?;
    let mut pos = 0u64;
    let mut stats = SaveStats::default();
    // A writer thread takes the bytes while the next tensor is being produced (encoding
    // uses every core; copying into the page cache then overlaps it). Two tensors in
    // flight bound the memory held.
    let fsync = opts.fsync;
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Cow<'r, [u8]>>(2);
        let writer = scope.spawn(move || -> Result<()> {
            let mut out = BufWriter::with_capacity(8 << 20, file);
            for chunk in rx {
                out.write_all(&chunk)?;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            if fsync {
                file.sync_data()?;
            }
            Ok(())
        });
        let walk = for_each_tensor_mut(proto, &mut |t| {
            let bytes: Cow<[u8]> = if t.data_location() == DataLocation::External {
                resolve(t)?
            } else {
                match (&t.raw_data, opts.externalize_min_bytes) {
                    (Some(raw), Some(min)) if raw.len() >= min => Cow::Owned(raw.to_vec()),
                    _ => return Ok(()),
                }
            };
            if let Some(want) = checked_expected_bytes(t)? {
                if want != bytes.len() as u64 {
                    bail!("tensor '{}': {} bytes supplied, its shape and type need {want}", t.name(), bytes.len());
                }
            }
            let len = bytes.len() as u64;
            let pad = pos.next_multiple_of(alignment(len)) - pos;
            // A failed send means the writer stopped; its own error is reported below.
            if pad > 0 && tx.send(Cow::Owned(vec![0u8; pad as usize])).is_err() {
                bail!("writer stopped");
            }
            pos += pad;
            if tx.send(bytes).is_err() {
                bail!("writer stopped");
            }
            t.raw_data = None;
            t.set_data_location(DataLocation::External);
            t.external_data =
                vec![kv("location", &opts.data_file), kv("offset", &pos.to_string()), kv("length", &len.to_string())];
            pos += len;
            stats.external_tensors += 1;
            Ok(())
        });
        drop(tx);
        let written = writer.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
        written.with_context(|| format!("write {}", data_path.display()))?;
        walk
    })?;
    stats.data_bytes = pos;
    if stats.external_tensors == 0 {
        std::fs::remove_file(&data_path).ok();
    }
    let buf = proto.encode_to_vec();
    if buf.len() as u64 >= 2 << 30 {
        bail!(
            "the graph itself is {} bytes, over protobuf's 2 GB limit; move more tensors to external data",
            buf.len()
        );
    }
    std::fs::write(onnx_path, &buf).with_context(|| format!("write {}", onnx_path.display()))?;
    if opts.fsync {
        File::open(onnx_path)?.sync_all()?;
    }
    stats.onnx_bytes = buf.len() as u64;
    Ok(stats)
}

fn kv(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto { key: Some(k.into()), value: Some(v.into()) }
}

/// An output folder that appears under its final name only when complete: files are
/// written into a hidden sibling folder (`.NAME.partial-PID`), put in place by
/// [`AtomicDir::commit`], and removed if the work fails, is dropped, or the process is
/// interrupted ([`install_interrupt_cleanup`]). Partial folders of processes that died
/// without a chance to clean up (SIGKILL, power loss) are removed by the next run that
/// writes beside them.
///
/// An existing target is replaced only with `overwrite` and only when it is an earlier
/// output of ours ([`crate::files::is_our_output_dir`]); the target must already have
/// been checked against the inputs ([`crate::files::Inputs::check_output`]).
pub struct AtomicDir {
    target: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
    /// Folders made for the target's parent, removed again (if still empty) on failure.
    made: Vec<PathBuf>,
}

/// The file that marks a folder as one of our partial outputs, with the writer's process
/// id and boot id, so a later run can tell whether its writer is gone.
const PARTIAL_MARKER: &str = ".qins-partial";

/// Partial folders of this process, removed when it is interrupted.
static LIVE_PARTIALS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn live_partials() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE_PARTIALS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a process's partial folder for `name` goes.
fn partial_name(name: &str, pid: u32) -> String {
    format!(".{name}.partial-{pid}")
}

/// Removes partial folders for `name` in `parent` whose writer is gone: marked as ours,
/// and written by a process that no longer runs (or by an earlier boot).
fn remove_stale_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let boot = boot_id();
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|r| r.parse::<u32>().ok()) else { continue };
        let path = e.path();
        if !e.file_type().is_ok_and(|t| t.is_dir()) || pid == std::process::id() {
            continue;
        }
        let Ok(marker) = crate::files::read_bounded(&path.join(PARTIAL_MARKER), 4096) else { continue };
        let marker = String::from_utf8_lossy(&marker);
        let mut lines = marker.lines();
        let (Some(p), Some(b)) = (lines.next(), lines.next()) else { continue };
        if p.parse::<u32>().ok() != Some(pid) {
            continue;
        }
        let Ok(pid_t) = libc::pid_t::try_from(pid) else { continue };
        if pid_t <= 0 {
            continue;
        }
        // SAFETY: kill with signal 0 only asks whether the process exists (EPERM: it does,
        // under another user).
        let alive = b == boot
            && (unsafe { libc::kill(pid_t, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
        if !alive && std::fs::remove_dir_all(&path).is_ok() {
            eprintln!("removed {}, left behind by an interrupted run (process {pid})", path.display());
        }
    }
}

impl AtomicDir {
    pub fn create(target: &Path, overwrite: bool) -> Result<AtomicDir> {
        let target = crate::files::resolve(target)?;
        if let Ok(md) = std::fs::symlink_metadata(&target) {
            if !md.is_dir() {
                bail!("output {} exists and is not a folder; give a folder", target.display());
            }
            if std::fs::read_dir(&target)?.next().is_some() {
                if !overwrite {
                    bail!(
                        "output folder {} exists and is not empty (--force replaces an earlier qins output)",
                        target.display()
                    );
                }
                if !crate::files::is_our_output_dir(&target)? {
                    bail!(
                        "output folder {} is not an earlier qins output (it lacks {} or holds subfolders or links); \
                         --force replaces only qins's own earlier output: remove it yourself or choose another folder",
                        target.display(),
                        crate::files::OUTPUT_MARKERS.join(" / ")
                    );
                }
            }
        }
        let parent = target.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        let mut made = Vec::new();
        let mut missing = Vec::new();
        let mut p = parent.as_path();
        while !p.exists() {
            missing.push(p.to_path_buf());
            match p.parent() {
                Some(q) => p = q,
                None => break,
            }
        }
        for m in missing.into_iter().rev() {
            match std::fs::create_dir(&m) {
                Ok(()) => made.push(m),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    remove_made(&made);
                    return Err(e).with_context(|| format!("create {}", m.display()));
                }
            }
        }
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        remove_stale_partials(&parent, &name);
        let tmp = parent.join(partial_name(&name, std::process::id()));
        let mut dir = AtomicDir { target, tmp, overwrite, committed: false, made };
        if std::fs::symlink_metadata(&dir.tmp).is_ok() {
            // Our own pid's name: an earlier AtomicDir of this process for the same target.
            std::fs::remove_dir_all(&dir.tmp).with_context(|| format!("remove {}", dir.tmp.display()))?;
        }
        std::fs::create_dir(&dir.tmp).with_context(|| format!("create {}", dir.tmp.display()))?;
        live_partials().push(dir.tmp.clone());
        let marker = format!("{}\n{}\n", std::process::id(), boot_id());
        std::fs::write(dir.tmp.join(PARTIAL_MARKER), marker)
            .with_context(|| format!("write into {}", dir.tmp.display()))?;
        dir.made.shrink_to_fit();
        Ok(dir)
    }

    /// Where to write the files now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Puts the finished folder in place: atomically swapped with an earlier output when
    /// there is one (that earlier output is then removed), so that at no moment is there
    /// neither the old folder nor the new one. Fails, keeping nothing, if an input file
    /// shrank while being read ([`crate::mapped::check_intact`]).
    pub fn commit(mut self) -> Result<PathBuf> {
        crate::mapped::check_intact()?;
        std::fs::remove_file(self.tmp.join(PARTIAL_MARKER))
            .with_context(|| format!("finish {}", self.tmp.display()))?;
        if std::fs::symlink_metadata(&self.target).is_ok() {
            let replaceable = std::fs::read_dir(&self.target)?.next().is_none()
                || (self.overwrite && crate::files::is_our_output_dir(&self.target)?);
            if !replaceable {
                bail!("output folder {} appeared or changed while writing; not replacing it", self.target.display());
            }
            exchange(&self.tmp, &self.target)
                .with_context(|| format!("put {} in place of the earlier output", self.target.display()))?;
            self.committed = true;
            // `tmp` now holds the earlier output.
            std::fs::remove_dir_all(&self.tmp).ok();
        } else {
            std::fs::rename(&self.tmp, &self.target)
                .with_context(|| format!("rename into {}", self.target.display()))?;
            self.committed = true;
        }
        live_partials().retain(|p| p != &self.tmp);
        Ok(self.target.clone())
    }
}

/// Swaps two folders atomically (Linux `renameat2(RENAME_EXCHANGE)`); where the file
/// system cannot, moves the old one aside first.
fn exchange(new: &Path, old: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(new)?, c(old)?);
    // SAFETY: two valid NUL-terminated paths relative to the current folder.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(e);
    }
    let mut aside = new.as_os_str().to_owned();
    aside.push(".old");
    let aside = PathBuf::from(aside);
    std::fs::rename(old, &aside)?;
    std::fs::rename(new, old)?;
    std::fs::rename(&aside, new)
}

fn remove_made(made: &[PathBuf]) {
    for m in made.iter().rev() {
        // Only if still empty: never anything somebody else put there meanwhile.
        std::fs::remove_dir(m).ok();
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            std::fs::remove_dir_all(&self.tmp).ok();
            live_partials().retain(|p| p != &self.tmp);
            remove_made(&self.made);
        }
    }
}

/// Makes SIGINT, SIGTERM and SIGHUP remove this process's partial output folders before
/// it exits (with 128 + the signal, as the shell expects). Blocks those signals in the
/// calling thread and every thread it starts later, and waits for them in a thread of its
/// own, so the cleanup runs as ordinary code, not in a signal handler. Call it first thing
/// in `main`, before any thread starts.
pub fn install_interrupt_cleanup() {
    // SAFETY: plain signal-set manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is initialised; sigwait writes the signal into `sig`.
        while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
        let dirs = live_partials().clone();
        for d in &dirs {
            // Writer threads may still add a file between the two steps: try a few times.
            for _ in 0..5 {
                if std::fs::remove_dir_all(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let note = if dirs.is_empty() { String::new() } else { format!("; removed {} partial output", dirs.len()) };
        eprintln!("\ninterrupted{note}");
        std::process::exit(128 + sig);
    });
}
