//! GGUF files (llama.cpp's model container): metadata and tensors, read through a memory map.
//!
//! Layout (version 2 and 3, little-endian): magic `GGUF`, version u32, tensor count u64,
//! metadata count u64, the metadata key/value pairs, the tensor descriptors (name, dims,
//! ggml type, offset), padding to `general.alignment`, then the tensor data. Every length
//! and offset read from the file is checked against the file before it is used, so a
//! damaged or hostile file fails with a message naming what is wrong, never with a panic
//! or a huge allocation.

pub mod quant;

use anyhow::{anyhow, bail, Context, Result};
use qins::mapped::MappedFile;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use quant::GgmlType;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }

    /// The value as an integer, whatever integer type the writer chose.
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            _ => return None,
        })
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor descriptor. `dims` are in ggml order: `dims[0]` is the fastest-varying
/// (contiguous) axis, so a matrix of `rows x cols` in row-major terms has `dims = [cols, rows]`.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the file (already checked to lie inside it).
    pub file_offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in row-major (numpy / ONNX) order: the ggml dims reversed.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An opened GGUF file.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Where the tensor data section starts.
    pub data_offset: u64,
    meta_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
    map: Box<dyn AsRef<[u8]> + Send + Sync>,
}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// No real file has keys, names or dimensions counts anywhere near these; they stop a
/// corrupted count from turning into a giant loop.
const MAX_DIMS: u32 = 8;
const MAX_NESTING: u32 = 4;
/// Metadata values (array elements included) a file may hold. Each takes 32 bytes in
/// memory but can take 1 in the file, so the file's size alone would allow 32x its size;
/// real files hold a few hundred thousand (vocabulary, merges, token types: 3 x 256k at
/// most today).
pub const MAX_METADATA_VALUES: u64 = 1 << 24;

impl Gguf {
    /// Opens and checks a GGUF file (a regular file; read through a guarded map,
    /// [`qins::mapped`]).
    pub fn open(path: &Path) -> Result<Gguf> {
        let map = MappedFile::open(path)?;
        Self::parse(path, Box::new(map)).with_context(|| format!("{} is not a readable GGUF file", path.display()))
    }

    /// Parses a GGUF held in memory (`name` is what messages call it).
    pub fn from_bytes(name: &Path, bytes: Vec<u8>) -> Result<Gguf> {
        Self::parse(name, Box::new(bytes)).with_context(|| format!("{} is not a readable GGUF file", name.display()))
    }

    fn parse(path: &Path, map: Box<dyn AsRef<[u8]> + Send + Sync>) -> Result<Gguf> {
        let buf: &[u8] = (*map).as_ref();
        let mut r = Cursor { buf, pos: 0, values: 0 };
        let magic = r.bytes(4).context("file too short for a GGUF header")?;
        if magic != GGUF_MAGIC {
            bail!("bad magic {:02x?} (want \"GGUF\")", magic);
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)");
        }
        let n_tensors = r.u64()?;
        let n_kv = r.u64()?;
        // Each key/value pair takes at least 12 bytes and each descriptor at least 24, so a
        // count beyond what the file could hold is corruption, not a big model.
        if n_kv > r.remaining() / 12 || n_tensors > r.remaining() / 24 {
            bail!("header claims {n_kv} metadata entries and {n_tensors} tensors, more than the file can hold");
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string().with_context(|| format!("metadata entry {i}: key"))?;
            let ty = r.u32().with_context(|| format!("metadata '{key}': type"))?;
            let v = r.value(ty, 0).with_context(|| format!("metadata '{key}'"))?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                bail!("metadata key '{key}' appears twice");
            }
            metadata.push((key, v));
        }
        let alignment = match meta_index.get("general.alignment") {
            None => 32,
            Some(&i) => {
                let a = metadata[i].1.as_i64().ok_or_else(|| anyhow!("general.alignment is not an integer"))?;
                if a <= 0 || (a & (a - 1)) != 0 {
                    bail!("general.alignment {a} is not a power of two");
                }
                a as u64
            }
        };
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = r.string().with_context(|| format!("tensor descriptor {i}: name"))?;
            let nd = r.u32().with_context(|| format!("tensor '{name}': dims count"))?;
            if nd == 0 || nd > MAX_DIMS {
                bail!("tensor '{name}': {nd} dimensions");
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(r.u64().with_context(|| format!("tensor '{name}': dims"))?);
            }
            let ty_id = r.u32().with_context(|| format!("tensor '{name}': type"))?;
            let offset = r.u64().with_context(|| format!("tensor '{name}': offset"))?;
            raw.push((name, dims, ty_id, offset));
        }
        let data_offset = (r.pos as u64).next_multiple_of(alignment);
        let file_len = buf.len() as u64;
        if data_offset > file_len {
            bail!("the tensor data section would start at {data_offset}, past the end of the file ({file_len} bytes)");
        }
        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::new();
        for (name, dims, ty_id, offset) in raw {
            let ty =
                GgmlType::from_id(ty_id).ok_or_else(|| anyhow!("tensor '{name}': unknown ggml type id {ty_id}"))?;
            let numel = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| anyhow!("tensor '{name}': dims {dims:?} overflow"))?;
            let n_bytes = ty.bytes_for(dims[0], numel).map_err(|e| anyhow!("tensor '{name}' {dims:?}: {e}"))?;
            if offset % alignment != 0 {
                bail!("tensor '{name}': data offset {offset} is not a multiple of the alignment {alignment}");
            }
            let start = data_offset.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => {
                    if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                        bail!("tensor '{name}' appears twice");
                    }
                    tensors.push(TensorInfo { name, dims, ty, file_offset: start, n_bytes });
                }
                _ => bail!(
                    "tensor '{name}' ({} {dims:?}, {n_bytes} bytes at data offset {offset}) runs past the end of the \
                     file ({file_len} bytes); the file is truncated or damaged",
                    ty.name()
                ),
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            meta_index,
            tensor_index,
            map,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required integer entry.
    pub fn get_int(&self, key: &str) -> Result<i64> {
        let v = self.get(key).ok_or_else(|| anyhow!("metadata '{key}' is missing"))?;
        v.as_i64().ok_or_else(|| anyhow!("metadata '{key}' is a {}, not an integer", v.type_name()))
    }

    /// A required float entry.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| anyhow!("metadata '{key}' is missing"))?;
        v.as_f64().ok_or_else(|| anyhow!("metadata '{key}' is a {}, not a number", v.type_name()))
    }

    /// A required string entry.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| anyhow!("metadata '{key}' is missing"))?;
        v.as_str().ok_or_else(|| anyhow!("metadata '{key}' is a {}, not a string", v.type_name()))
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key).ok_or_else(|| anyhow!("metadata '{key}' is missing"))?;
        let a = v.as_array().ok_or_else(|| anyhow!("metadata '{key}' is a {}, not an array", v.type_name()))?;
        a.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_str().ok_or_else(|| anyhow!("metadata '{key}'[{i}] is a {}, not a string", e.type_name()))
            })
            .collect()
    }

    /// A required array of integers.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        let v = self.get(key).ok_or_else(|| anyhow!("metadata '{key}' is missing"))?;
        let a = v.as_array().ok_or_else(|| anyhow!("metadata '{key}' is a {}, not an array", v.type_name()))?;
        a.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_i64().ok_or_else(|| anyhow!("metadata '{key}'[{i}] is a {}, not an integer", e.type_name()))
            })
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (still quantized) bytes of a tensor; the range was checked at open.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &(*self.map).as_ref()[t.file_offset as usize..(t.file_offset + t.n_bytes) as usize]
    }

    /// The tensor as f32 values in row-major order of [`TensorInfo::shape`]. Fails on a
    /// value that is not finite: no model works with an Inf or NaN weight, and one would
    /// only surface later as NaN logits.
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let mut out = vec![0f32; t.numel() as usize];
        quant::dequantize(t.ty, self.tensor_data(t), &mut out).with_context(|| format!("tensor '{}'", t.name))?;
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            bail!("tensor '{}': element {i} is {} (a damaged or hostile file)", t.name, out[i]);
        }
        Ok(out)
    }
}

/// Bytes the smallest value of GGUF type `ty` takes in a file.
fn min_encoded_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        // An array: its element type and count.
        9 => 12,
        _ => return None,
    })
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Metadata values read so far (bounded by [`MAX_METADATA_VALUES`]).
    values: u64,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn bytes(&mut self, n: u64) -> Result<&'a [u8]> {
        if n > self.remaining() {
            bail!("needs {n} bytes at offset {}, but the file ends at {}", self.pos, self.buf.len());
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N as u64)?.try_into().expect("length checked"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let at = self.pos;
        let n = self.u64()?;
        let b = self.bytes(n).with_context(|| format!("string of {n} bytes at offset {at}"))?;
        String::from_utf8(b.to_vec()).map_err(|_| anyhow!("string at offset {at} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            bail!("more than {MAX_METADATA_VALUES} metadata values; no real model has that many");
        }
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => bail!("bool value {b}"),
            },
            8 => Value::Str(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    bail!("arrays nested deeper than {MAX_NESTING}");
                }
                let et = self.u32()?;
                let n = self.u64()?;
                // Every element takes at least its smallest encoding in the file: a longer
                // count is corruption. The memory it may take is bounded separately (each
                // value counts against MAX_METADATA_VALUES), and capacity grows as values
                // are actually read, not from the count.
                let min = min_encoded_size(et).ok_or_else(|| anyhow!("array of unknown value type {et}"))?;
                if n.checked_mul(min).is_none_or(|b| b > self.remaining()) {
                    bail!("array of {n} elements, more than the {} bytes left in the file hold", self.remaining());
                }
                if n > MAX_METADATA_VALUES - self.values {
                    bail!("array of {n} elements: more than {MAX_METADATA_VALUES} metadata values in all");
                }
                let mut v = Vec::with_capacity((n as usize).min(1 << 16));
                for i in 0..n {
                    v.push(self.value(et, depth + 1).with_context(|| format!("array element {i}"))?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            t => bail!("unknown value type {t}"),
        })
    }
}
