//! ONNX models with external data: reading through memory maps, writing atomically.
//!
//! A model is the protobuf (`model.onnx`, small) plus external data files (often far over
//! 2 GB). Loading maps both; tensor bytes are borrowed from the maps, so a multi-GB model
//! is never held in memory. Every external reference is checked against its file when the
//! model is opened, so a bad model fails with a message, not a crash halfway through.

/// The domain and opset of the QINS ops (docs/FORMAT.md): what the rewrite writes and the
/// custom-op library registers.
pub const QINS_DOMAIN: &str = "com.qins";
pub const QINS_OPSET: i64 = 1;

pub mod build;
mod save;

pub use save::{install_interrupt_cleanup, save_model, AtomicDir, SaveOptions, SaveStats};

use crate::files::Folder;
use crate::mapped::MappedFile;
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use prost::Message;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[allow(clippy::all, missing_docs, rustdoc::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::{tensor_proto::DataLocation, AttributeProto, GraphProto, ModelProto, TensorProto};

/// ONNX `TensorProto.DataType` values used by name in this project.
pub mod dtype {
    pub const FLOAT: i32 = 1;
    pub const UINT8: i32 = 2;
    pub const INT8: i32 = 3;
    pub const INT32: i32 = 6;
    pub const INT64: i32 = 7;
    pub const FLOAT16: i32 = 10;
    pub const BFLOAT16: i32 = 16;

    /// Storage size in bits of one element, or `None` for strings and unknown types.
    pub fn bits(dt: i32) -> Option<u64> {
        Some(match dt {
            1 | 6 | 12 => 32,
            2 | 3 | 9 | 17..=20 | 24 => 8,
            4 | 5 | 10 | 16 => 16,
            7 | 11 | 13 | 14 => 64,
            15 => 128,
            21..=23 => 4,
            25 | 26 => 2,
            _ => return None,
        })
    }

    pub fn name(dt: i32) -> &'static str {
        match dt {
            1 => "float32",
            2 => "uint8",
            3 => "int8",
            6 => "int32",
            7 => "int64",
            9 => "bool",
            10 => "float16",
            11 => "float64",
            16 => "bfloat16",
            _ => "other",
        }
    }
}

/// Number of elements of a tensor with these dims (`None` on a negative dim or overflow).
pub fn numel(dims: &[i64]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| u64::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
}

/// Bytes the raw little-endian data of a tensor must have, where the type has a fixed size
/// and the dims are valid (see [`checked_expected_bytes`] for telling those apart).
pub fn expected_bytes(t: &TensorProto) -> Option<u64> {
    checked_expected_bytes(t).ok().flatten()
}

/// Bytes the raw data of a tensor must have: `None` for a type without a fixed size
/// (strings), an error for negative dims or a size past `u64`, which no real tensor has
/// and which would otherwise switch every size check off.
pub fn checked_expected_bytes(t: &TensorProto) -> Result<Option<u64>> {
    let Some(bits) = dtype::bits(t.data_type()) else { return Ok(None) };
    let n = numel(&t.dims)
        .and_then(|n| n.checked_mul(bits))
        .ok_or_else(|| anyhow!("tensor '{}': dims {:?} are negative or too large", t.name(), t.dims))?;
    Ok(Some(n.div_ceil(8)))
}

/// Where an external tensor's bytes are: validated location, offset and length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    pub length: u64,
}

/// Reads and checks the `external_data` entries of a tensor; `None` if it is inline.
pub fn external_ref(t: &TensorProto) -> Result<Option<ExternalRef>> {
    if t.data_location() != DataLocation::External {
        return Ok(None);
    }
    let get = |k: &str| t.external_data.iter().find(|e| e.key() == k).map(|e| e.value());
    let location = get("location").ok_or_else(|| anyhow!("tensor '{}': external data without a location", t.name()))?;
    let num = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| v.parse::<u64>().with_context(|| format!("tensor '{}': bad external {k} '{v}'", t.name())))
            .transpose()
    };
    let offset = num("offset")?.unwrap_or(0);
    let length = match num("length")? {
        Some(l) => l,
        None => expected_bytes(t).ok_or_else(|| anyhow!("tensor '{}': external data without a length", t.name()))?,
    };
    Ok(Some(ExternalRef { location: location.to_string(), offset, length }))
}

/// Calls `f` on every tensor stored in the model: initializers, sparse initializers and
/// tensor-valued node attributes, in the main graph, every subgraph and every function.
pub fn for_each_tensor_mut(model: &mut ModelProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    if let Some(g) = model.graph.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for func in &mut model.functions {
        for node in &mut func.node {
            for a in &mut node.attribute {
                attr_tensors_mut(a, f)?;
            }
        }
    }
    Ok(())
}

fn graph_tensors_mut(g: &mut GraphProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    for t in &mut g.initializer {
        f(t)?;
    }
    for s in &mut g.sparse_initializer {
        for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
            f(t)?;
        }
    }
    for node in &mut g.node {
        for a in &mut node.attribute {
            attr_tensors_mut(a, f)?;
        }
    }
    Ok(())
}

fn attr_tensors_mut(a: &mut AttributeProto, f: &mut dyn FnMut(&mut TensorProto) -> Result<()>) -> Result<()> {
    if let Some(t) = a.t.as_mut() {
        f(t)?;
    }
    for t in &mut a.tensors {
        f(t)?;
    }
    for s in a.sparse_tensor.iter_mut().chain(a.sparse_tensors.iter_mut()) {
        for t in s.values.iter_mut().chain(s.indices.iter_mut()) {
            f(t)?;
        }
    }
    if let Some(g) = a.g.as_mut() {
        graph_tensors_mut(g, f)?;
    }
    for g in &mut a.graphs {
        graph_tensors_mut(g, f)?;
    }
    Ok(())
}

/// A model opened for reading: the decoded protobuf and maps of its external data files.
pub struct Model {
    pub proto: ModelProto,
    /// The `.onnx` file (canonical).
    pub path: PathBuf,
    /// The folder external data locations are relative to (canonical); nothing outside it
    /// is read.
    pub dir: PathBuf,
    folder: Folder,
    data: HashMap<String, Arc<MappedFile>>,
}

impl Model {
    /// Opens `path`: an `.onnx` file, or a folder holding `model.onnx` (or exactly one
    /// `.onnx` file). Checks every external reference against its file; every file read
    /// must be a regular file inside the model's folder, symlinks followed
    /// ([`crate::files::Folder`]).
    pub fn load(path: &Path) -> Result<Model> {
        let (folder, path) = resolve_model_path(path)?;
        let map = MappedFile::open(&path)?;
        let proto = ModelProto::decode(Bytes::from_owner(map))
            .with_context(|| format!("{} is not an ONNX model (protobuf decode failed)", path.display()))?;
        if proto.graph.is_none() {
            bail!("{}: the model has no graph", path.display());
        }
        let mut model = Model { proto, path, dir: folder.root().to_path_buf(), folder, data: HashMap::new() };
        model.map_external_data()?;
        Ok(model)
    }

    /// The model's folder, for reading the files beside the model.
    pub fn folder(&self) -> &Folder {
        &self.folder
    }

    fn map_external_data(&mut self) -> Result<()> {
        let mut refs: Vec<(String, ExternalRef, Option<u64>)> = Vec::new();
        let mut proto = std::mem::take(&mut self.proto);
        let r = for_each_tensor_mut(&mut proto, &mut |t| {
            if let Some(r) = external_ref(t)? {
                refs.push((t.name().to_string(), r, checked_expected_bytes(t)?));
            }
            Ok(())
        });
        self.proto = proto;
        r?;
        for (name, r, want) in refs {
            let map = self.map_location(&r.location).with_context(|| format!("tensor '{name}'"))?;
            let end = r.offset.checked_add(r.length);
            if end.is_none_or(|e| e > map.len() as u64) {
                bail!(
                    "tensor '{name}': external data [{}, +{}) runs past the end of '{}' ({} bytes); the model or its data file is damaged or truncated",
                    r.offset,
                    r.length,
                    r.location,
                    map.len()
                );
            }
            if let Some(w) = want {
                if w != r.length {
                    bail!(
                        "tensor '{name}': external length {} does not match its shape and type ({w} bytes)",
                        r.length
                    );
                }
            }
        }
        Ok(())
    }

    fn map_location(&mut self, location: &str) -> Result<Arc<MappedFile>> {
        if let Some(m) = self.data.get(location) {
            return Ok(m.clone());
        }
        let p = self.folder.inside(Path::new(location)).context("external data location")?;
        let map = Arc::new(MappedFile::open(&p).context("external data")?);
        self.data.insert(location.to_string(), map.clone());
        Ok(map)
    }

    pub fn graph(&self) -> &GraphProto {
        self.proto.graph.as_ref().expect("checked at load")
    }

    /// External data files of the model with their sizes.
    pub fn data_files(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.data.iter().map(|(k, m)| (k.clone(), m.len() as u64)).collect();
        v.sort();
        v
    }

    /// The little-endian bytes of a tensor, borrowed where they are stored raw.
    pub fn tensor_bytes<'a>(&'a self, t: &'a TensorProto) -> Result<Cow<'a, [u8]>> {
        if let Some(r) = external_ref(t)? {
            return self.external_bytes(&r).map(Cow::Borrowed).with_context(|| format!("tensor '{}'", t.name()));
        }
        typed_bytes(t)
    }

    /// The bytes an external reference points at, from this model's data files.
    pub fn external_bytes(&self, r: &ExternalRef) -> Result<&[u8]> {
        let map = self
            .data
            .get(&r.location)
            .ok_or_else(|| anyhow!("data file '{}' is not part of this model", r.location))?;
        let end = r.offset.checked_add(r.length).filter(|e| *e <= map.len() as u64);
        let end = end.ok_or_else(|| anyhow!("[{}, +{}) is outside '{}'", r.offset, r.length, r.location))?;
        Ok(&map[r.offset as usize..end as usize])
    }

    /// Total bytes of all external tensors (the weights, for a typical export).
    pub fn external_tensor_bytes(&self) -> u64 {
        let mut proto = self.proto.clone();
        let mut total = 0;
        let _ = for_each_tensor_mut(&mut proto, &mut |t| {
            total += external_ref(t)?.map_or(0, |r| r.length);
            Ok(())
        });
        total
    }

    /// The graph initializer called `name`.
    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.graph().initializer.iter().find(|t| t.name() == name)
    }
}

/// The raw bytes of an inline tensor, from `raw_data` or the typed repeated fields.
pub fn typed_bytes(t: &TensorProto) -> Result<Cow<'_, [u8]>> {
    let data = if let Some(raw) = &t.raw_data {
        Cow::Borrowed(raw.as_ref())
    } else {
        let dt = t.data_type();
        Cow::Owned(match dt {
            dtype::FLOAT => t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            11 => t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            dtype::INT64 => t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            13 | 12 => {
                let w = if dt == 13 { 8 } else { 4 };
                t.uint64_data.iter().flat_map(|v| v.to_le_bytes()[..w].to_vec()).collect()
            }
            dtype::INT32 => t.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            // 16- and 8-bit types live one per int32 in `int32_data`.
            4 | 5 | dtype::FLOAT16 | dtype::BFLOAT16 => {
                t.int32_data.iter().flat_map(|v| (*v as u16).to_le_bytes()).collect()
            }
            2 | 3 | 9 | 17..=20 => t.int32_data.iter().map(|v| *v as u8).collect(),
            _ => bail!("tensor '{}': inline data of type {} is not supported", t.name(), dt),
        })
    };
    if let Some(w) = checked_expected_bytes(t)? {
        if data.len() as u64 != w {
            bail!("tensor '{}': has {} data bytes, its shape and type need {w}", t.name(), data.len());
        }
    }
    Ok(data)
}

/// The model's folder and its `.onnx` file, both canonical. A folder given on the command
/// line is the model folder and its `.onnx` must lie inside it; a file given is resolved
/// (symlinks the caller named are the caller's choice) and its folder is the model folder.
pub fn resolve_model_path(path: &Path) -> Result<(Folder, PathBuf)> {
    let shown = if path.as_os_str().is_empty() { Path::new(".") } else { path };
    if shown.is_dir() {
        let folder = Folder::open(shown)?;
        let name = if folder.root().join("model.onnx").exists() {
            PathBuf::from("model.onnx")
        } else {
            let onnx: Vec<PathBuf> = std::fs::read_dir(folder.root())
                .with_context(|| format!("read {}", shown.display()))?
                .filter_map(|e| e.ok().map(|e| PathBuf::from(e.file_name())))
                .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
                .collect();
            match <[PathBuf; 1]>::try_from(onnx) {
                Ok([one]) => one,
                Err(v) if v.is_empty() => bail!("{} holds no .onnx model", shown.display()),
                Err(_) => bail!("{} holds several .onnx files; name the one to use", shown.display()),
            }
        };
        let file = folder.inside(&name)?;
        return Ok((folder, file));
    }
    let file = shown.canonicalize().with_context(|| format!("{} does not exist", shown.display()))?;
    let parent = file.parent().ok_or_else(|| anyhow!("{} has no folder", file.display()))?;
    Ok((Folder::open(parent)?, file))
}
