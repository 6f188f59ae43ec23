//! Writing models: external data packed into one file, the whole output made visible
//! only once complete.

use super::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto, TensorProto};
use super::{expected_bytes, for_each_tensor_mut};
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
            if let Some(want) = expected_bytes(t) {
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
/// written into a hidden sibling folder, renamed into place by [`AtomicDir::commit`], and
/// removed if the work fails or is dropped.
pub struct AtomicDir {
    target: PathBuf,
    tmp: PathBuf,
    overwrite: bool,
    committed: bool,
}

impl AtomicDir {
    pub fn create(target: &Path, overwrite: bool) -> Result<AtomicDir> {
        if target.is_file() {
            bail!("output {} is a file; give a folder", target.display());
        }
        if target.is_dir() && !overwrite && std::fs::read_dir(target)?.next().is_some() {
            bail!("output folder {} exists and is not empty (use --force to replace it)", target.display());
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("create {}", parent.display()))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        Ok(AtomicDir { target: target.to_path_buf(), tmp, overwrite, committed: false })
    }

    /// Where to write the files now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn commit(mut self) -> Result<PathBuf> {
        let mut old = None;
        if self.target.exists() {
            if !self.overwrite && std::fs::read_dir(&self.target)?.next().is_some() {
                bail!("output folder {} appeared while writing; not replacing it", self.target.display());
            }
            let o = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &o).with_context(|| format!("move old {} aside", self.target.display()))?;
            old = Some(o);
        }
        std::fs::rename(&self.tmp, &self.target).with_context(|| format!("rename into {}", self.target.display()))?;
        self.committed = true;
        if let Some(o) = old {
            std::fs::remove_dir_all(o).ok();
        }
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            std::fs::remove_dir_all(&self.tmp).ok();
        }
    }
}
