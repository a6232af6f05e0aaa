//! GGUF files (llama.cpp): metadata, tensors dequantized on load, HF config and tokenizer rebuilt.
//!
//! Supported architectures: `llama` (incl. SmolLM2) and `qwen2`. Tensor types F32, F16, BF16,
//! Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K (block layouts as in ggml's
//! `ggml-quants.c`; values bit-identical to gguf-py's `gguf.quants.dequantize`). llama.cpp's
//! converter permutes the rows of the Q and K projections of `llama` models for its RoPE layout;
//! reading undoes it (rows as `(n_heads, head_dim / 2, 2)`, last two axes swapped).
//! Reference: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::{json, Value as Json};
use tch::{Kind, Tensor};

use crate::config::{Config, GenerationConfig, TokenIds};
use crate::error::{ModelError, Result, TorchContext};
use crate::loader::TensorSource;

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
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

/// ggml tensor types (the ones rlrun reads, plus names for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q5_0: GgmlType = GgmlType(6);
    pub const Q5_1: GgmlType = GgmlType(7);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const Q2_K: GgmlType = GgmlType(10);
    pub const Q3_K: GgmlType = GgmlType(11);
    pub const Q4_K: GgmlType = GgmlType(12);
    pub const Q5_K: GgmlType = GgmlType(13);
    pub const Q6_K: GgmlType = GgmlType(14);
    pub const BF16: GgmlType = GgmlType(30);

    pub fn name(self) -> String {
        const NAMES: &[&str] = &[
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16",
        ];
        NAMES
            .get(self.0 as usize)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("type {}", self.0))
    }

    /// (elements per block, bytes per block) for the supported types.
    fn block(self) -> Option<(usize, usize)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2_K => (256, 84),
            GgmlType::Q3_K => (256, 110),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
            _ => return None,
        })
    }
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions in ggml order (fastest first), i.e. reversed from torch.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: usize,
}

impl GgufTensor {
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
    /// Torch shape (slowest dimension first).
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    mmap: Mmap,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<GgufTensor>,
    index: HashMap<String, usize>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn err(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| self.err(format!("truncated at byte {} (needed {n} more)", self.pos)))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().unwrap_or([0; 2]),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| self.err(format!("invalid UTF-8 string at byte {}", self.pos)))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.u8()? as u64),
            1 => Value::I64(self.u8()? as i8 as i64),
            2 => Value::U64(self.u16()? as u64),
            3 => Value::I64(self.u16()? as i16 as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32()?) as f64),
            7 => Value::Bool(self.u8()? != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deeply".into()));
                }
                let elem = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.buf.len() {
                    return Err(self.err(format!("array of {n} elements is larger than the file")));
                }
                let mut out = Vec::with_capacity(n);
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }
}

impl GgufFile {
    /// Maps and parses a GGUF file (metadata and tensor directory; data is read lazily).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the file is opened read-only; rlrun never writes to model files it reads.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let mut r = Reader {
            buf: &mmap,
            pos: 0,
            path,
        };
        if r.bytes(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(r.err("not a GGUF file (bad magic)".into()));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!(
                "unsupported GGUF version {version} (supported: 2, 3)"
            )));
        }
        let n_tensors = r.u64()? as usize;
        let n_kv = r.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 20));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 8 {
                return Err(r.err(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| r.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = GgmlType(r.u32()?);
            let offset = r.u64()? as usize;
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        if alignment == 0 {
            return Err(r.err("general.alignment is 0".into()));
        }
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut index = HashMap::new();
        for (i, t) in tensors.iter_mut().enumerate() {
            t.offset += data_start;
            index.insert(t.name.clone(), i);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            metadata,
            tensors,
            index,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    fn err(&self, message: String) -> ModelError {
        ModelError::Gguf {
            path: self.path.clone(),
            message,
        }
    }

    /// Dequantizes a tensor to f32 values (torch order).
    pub fn dequantize(&self, t: &GgufTensor) -> Result<Vec<f32>> {
        let (block_elems, block_bytes) =
            t.ggml_type
                .block()
                .ok_or_else(|| ModelError::UnsupportedGgufType {
                    name: t.name.clone(),
                    path: self.path.clone(),
                    ggml_type: t.ggml_type.name(),
                })?;
        let n = t.numel();
        if !n.is_multiple_of(block_elems) {
            return Err(self.err(format!(
                "tensor `{}` has {n} elements, not a multiple of the {} block size {block_elems}",
                t.name,
                t.ggml_type.name()
            )));
        }
        let nbytes = n / block_elems * block_bytes;
        let data = self
            .mmap
            .get(t.offset..t.offset.saturating_add(nbytes))
            .ok_or_else(|| {
                self.err(format!(
                    "tensor `{}` extends past the end of the file (truncated?)",
                    t.name
                ))
            })?;
        let mut out = vec![0f32; n];
        let blocks = data
            .chunks_exact(block_bytes)
            .zip(out.chunks_exact_mut(block_elems));
        match t.ggml_type {
            GgmlType::F32 => {
                blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
            GgmlType::BF16 => {
                blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
            }
            GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
                let d = f16_at(b, 0);
                for j in 0..16 {
                    y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                    y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                }
            }),
            GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..16 {
                    y[j] = (b[4 + j] & 0x0F) as f32 * d + m;
                    y[j + 16] = (b[4 + j] >> 4) as f32 * d + m;
                }
            }),
            GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
            GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
            GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }),
            GgmlType::Q2_K => blocks.for_each(|(b, y)| dequant_q2_k(b, y)),
            GgmlType::Q3_K => blocks.for_each(|(b, y)| dequant_q3_k(b, y)),
            GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
            GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
            GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
            _ => unreachable!("block() returned a layout for an unhandled type"),
        }
        Ok(out)
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q5_0 block: d (f16), 4 bytes of high bits (u32 LE, bit j for value j), 16 bytes of low nibbles
/// (value j in the low nibble of byte j, value j + 16 in its high nibble); value = d * (q - 16).
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = (((b[6 + j] & 0x0F) | h0) as i32 - 16) as f32 * d;
        y[j + 16] = (((b[6 + j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

/// Q5_1 block: d (f16), m (f16), 4 bytes of high bits (u32 LE), 16 bytes of low nibbles (as Q5_0);
/// value = d * q + m.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for j in 0..16 {
        let h0 = (((qh >> j) & 1) << 4) as u8;
        let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
        y[j] = ((b[8 + j] & 0x0F) | h0) as f32 * d + m;
        y[j + 16] = ((b[8 + j] >> 4) | h1) as f32 * d + m;
    }
}

/// Q2_K super-block: 16 bytes of 4-bit scale (low) / min (high) pairs, one per 16 values, 64 bytes
/// of 2-bit quants (two halves of 128 values; value `32 * j + l` of a half is bits `2j..2j+2` of
/// byte `l` of its 32), d (f16), dmin (f16); value = d * scale * q - dmin * min.
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (n, half) in y.chunks_exact_mut(128).enumerate() {
        let q = &b[16 + 32 * n..16 + 32 * n + 32];
        for (i, group) in half.chunks_exact_mut(16).enumerate() {
            let sc = scales[8 * n + i];
            let dl = d * (sc & 0x0F) as f32;
            let ml = dmin * (sc >> 4) as f32;
            let (shift, q) = (2 * (i / 2), &q[16 * (i % 2)..16 * (i % 2) + 16]);
            for l in 0..16 {
                group[l] = dl * ((q[l] >> shift) & 3) as f32 - ml;
            }
        }
    }
}

/// Q3_K super-block: 32 bytes of high-bit masks (bit `e / 32` of byte `e % 32` for value `e`), 64
/// bytes of low 2-bit quants (laid out as in Q2_K), 12 bytes of packed 6-bit signed scales (one per
/// 16 values, offset by 32), d (f16); value = d * scale * (q - 4 if the high bit is clear).
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let scales = &b[96..108];
    let d = f16_at(b, 108);
    let scale = |i: usize| -> i32 {
        let low = (scales[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    };
    for (n, half) in y.chunks_exact_mut(128).enumerate() {
        let q = &b[32 + 32 * n..32 + 32 * n + 32];
        for (i, group) in half.chunks_exact_mut(16).enumerate() {
            let dl = d * scale(8 * n + i) as f32;
            let (j, base) = (i / 2, 16 * (i % 2));
            for l in 0..16 {
                let low = ((q[base + l] >> (2 * j)) & 3) as i32;
                let high = (hmask[base + l] >> (4 * n + j)) & 1;
                group[l] = dl * (low - if high == 0 { 4 } else { 0 }) as f32;
            }
        }
    }
}

/// The 6-bit (scale, min) pair `j` (0..8) of the 12 packed bytes of a Q4_K / Q5_K super-block.
fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Q4_K super-block: d (f16), dmin (f16), 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let q = &b[16..144];
    for (k, chunk) in (0..4).zip(y.chunks_exact_mut(64)) {
        let (sc1, m1) = k_scale_min(scales, 2 * k);
        let (sc2, m2) = k_scale_min(scales, 2 * k + 1);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let qs = &q[32 * k..32 * k + 32];
        for l in 0..32 {
            chunk[l] = d1 * (qs[l] & 0x0F) as f32 - m1;
            chunk[l + 32] = d2 * (qs[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K super-block: d (f16), dmin (f16), 12 bytes of packed 6-bit scales/mins (as Q4_K), 32 bytes
/// of high bits (bit `e / 32` of byte `e % 32` for value `e`), 128 bytes of low nibbles (as Q4_K).
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let q = &b[48..176];
    for (k, chunk) in (0..4).zip(y.chunks_exact_mut(64)) {
        let (sc1, m1) = k_scale_min(scales, 2 * k);
        let (sc2, m2) = k_scale_min(scales, 2 * k + 1);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let qs = &q[32 * k..32 * k + 32];
        for l in 0..32 {
            let h1 = ((qh[l] >> (2 * k)) & 1) << 4;
            let h2 = ((qh[l] >> (2 * k + 1)) & 1) << 4;
            chunk[l] = d1 * ((qs[l] & 0x0F) | h1) as f32 - m1;
            chunk[l + 32] = d2 * ((qs[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K super-block: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d (f16).
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// A GGUF model: HF config, tensors under HF names, tokenizer and chat template.
pub struct GgufModel {
    pub file: GgufFile,
    pub config: Config,
    pub generation: GenerationConfig,
    arch: String,
    /// HF name -> GGUF tensor name.
    names: HashMap<String, String>,
}

const SUPPORTED_GGUF_ARCHS: &[&str] = &["llama", "qwen2", "gemma3"];

impl GgufModel {
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let arch = file
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| file.err("missing general.architecture".into()))?
            .to_string();
        if !SUPPORTED_GGUF_ARCHS.contains(&arch.as_str()) {
            return Err(file.err(format!(
                "unsupported architecture `{arch}` (supported: {})",
                SUPPORTED_GGUF_ARCHS.join(", ")
            )));
        }
        if file.tensor("rope_freqs.weight").is_some() {
            return Err(file.err(
                "has `rope_freqs.weight` (Llama 3.1 rope scaling stored as factors), which rlrun cannot import; \
                 use the Hugging Face safetensors checkpoint"
                    .into(),
            ));
        }
        let u = |key: &str| -> Result<i64> {
            file.get(&format!("{arch}.{key}"))
                .and_then(Value::as_u64)
                .map(|v| v as i64)
                .ok_or_else(|| file.err(format!("missing metadata `{arch}.{key}`")))
        };
        let f = |key: &str| file.get(&format!("{arch}.{key}")).and_then(Value::as_f64);
        let tok_id = |key: &str| {
            file.get(&format!("tokenizer.ggml.{key}"))
                .and_then(Value::as_u64)
                .map(|v| TokenIds::One(v as i64))
        };
        let vocab_size = match file
            .get(&format!("{arch}.vocab_size"))
            .and_then(Value::as_u64)
        {
            Some(v) => v as i64,
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(Value::as_array)
                .map(|a| a.len() as i64)
                .ok_or_else(|| file.err("no vocab size and no tokenizer.ggml.tokens".into()))?,
        };
        let n_heads = u("attention.head_count")?;
        let hidden = u("embedding_length")?;
        let head_dim = file
            .get(&format!("{arch}.attention.key_length"))
            .and_then(Value::as_u64)
            .map(|v| v as i64);
        let tied = file.tensor("output.weight").is_none();
        let gemma = arch == "gemma3";
        let (model_type, attention_bias) = match arch.as_str() {
            "qwen2" => ("qwen2", None),
            "gemma3" => ("gemma3_text", None),
            _ => ("llama", Some(file.tensor("blk.0.attn_q.bias").is_some())),
        };
        let rope_scaling = match file
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(Value::as_str)
        {
            None | Some("none") => None,
            Some("linear") => Some(crate::config::RopeParameters {
                rope_type: Some("linear".into()),
                factor: f("rope.scaling.factor"),
                ..Default::default()
            }),
            Some(other) => {
                return Err(file.err(format!(
                    "rope scaling `{other}` is not supported (supported: linear)"
                )))
            }
        };
        let n_layers = u("block_count")?;
        let head_dim = head_dim.filter(|&d| gemma || d != hidden / n_heads);
        // Gemma 3 as llama.cpp reads it: global layers on `rope.freq_base` (with the file's
        // scaling), sliding layers on base 10000, every sixth layer global, scores scaled by
        // `head_dim^-0.5` (llama.cpp's rule for every size but 27B; transformers' default 256
        // equals it for 270M, 1B, 4B and 12B).
        let (rope_theta, rope_scaling, rope_parameters) = if gemma {
            let full = crate::config::RopeParameters {
                rope_type: Some(
                    rope_scaling
                        .as_ref()
                        .and_then(|r| r.rope_type.clone())
                        .unwrap_or_else(|| "default".into()),
                ),
                rope_theta: Some(f("rope.freq_base").unwrap_or(1_000_000.0)),
                factor: rope_scaling.as_ref().and_then(|r| r.factor),
                ..Default::default()
            };
            let sliding = crate::config::RopeParameters {
                rope_type: Some("default".into()),
                rope_theta: Some(10000.0),
                ..Default::default()
            };
            let per_type = [
                (crate::config::FULL_ATTENTION.to_string(), full),
                (crate::config::SLIDING_ATTENTION.to_string(), sliding),
            ];
            (
                None,
                None,
                Some(crate::config::RopeParametersField::PerLayerType(
                    per_type.into_iter().collect(),
                )),
            )
        } else {
            (
                Some(f("rope.freq_base").unwrap_or(10000.0)),
                rope_scaling,
                None,
            )
        };
        let (bos, eos, pad) = if gemma {
            gemma_special_ids(&file)
        } else {
            (
                tok_id("bos_token_id"),
                tok_id("eos_token_id"),
                tok_id("padding_token_id"),
            )
        };
        let config = Config {
            model_type: model_type.into(),
            vocab_size,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: n_layers,
            num_attention_heads: n_heads,
            num_key_value_heads: Some(
                file.get(&format!("{arch}.attention.head_count_kv"))
                    .and_then(Value::as_u64)
                    .map(|v| v as i64)
                    .unwrap_or(n_heads),
            ),
            head_dim,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_parameters,
            rope_local_base_freq: None,
            max_position_embeddings: u("context_length").unwrap_or(2048),
            tie_word_embeddings: tied,
            attention_bias,
            mlp_bias: false,
            hidden_act: if gemma { "gelu_pytorch_tanh" } else { "silu" }.into(),
            hidden_activation: gemma.then(|| "gelu_pytorch_tanh".into()),
            query_pre_attn_scalar: gemma.then(|| head_dim.unwrap_or(hidden / n_heads) as f64),
            sliding_window: if gemma {
                Some(u("attention.sliding_window").unwrap_or(4096))
            } else {
                None
            },
            layer_types: gemma.then(|| {
                (0..n_layers)
                    .map(|i| {
                        if (i + 1) % 6 == 0 {
                            crate::config::FULL_ATTENTION
                        } else {
                            crate::config::SLIDING_ATTENTION
                        }
                        .to_string()
                    })
                    .collect()
            }),
            final_logit_softcapping: None,
            attn_logit_softcapping: None,
            use_bidirectional_attention: None,
            num_experts: None,
            num_experts_per_tok: None,
            moe_intermediate_size: None,
            decoder_sparse_step: None,
            mlp_only_layers: None,
            norm_topk_prob: None,
            router_aux_loss_coef: None,
            shared_expert_intermediate_size: None,
            qkv_bias: None,
            bos_token_id: bos,
            eos_token_id: eos,
            pad_token_id: pad,
            torch_dtype: Some("float32".into()),
        };
        config.validate(path)?;
        let generation = GenerationConfig {
            bos_token_id: config.bos_token_id.clone(),
            eos_token_id: config.eos_token_id.clone(),
            pad_token_id: config.pad_token_id.clone(),
            ..Default::default()
        };
        let mut names = HashMap::new();
        names.insert(
            "model.embed_tokens.weight".to_string(),
            "token_embd.weight".to_string(),
        );
        names.insert("model.norm.weight".into(), "output_norm.weight".into());
        names.insert("lm_head.weight".into(), "output.weight".into());
        for i in 0..config.num_hidden_layers {
            let (hf, gg) = (format!("model.layers.{i}"), format!("blk.{i}"));
            // llama.cpp's `ffn_norm` is the norm before the MLP: Llama's `post_attention_layernorm`,
            // Gemma's `pre_feedforward_layernorm` (Gemma's `post_attention_layernorm` normalises the
            // attention output: llama.cpp's `post_attention_norm`).
            let norms: &[(&str, &str)] = if gemma {
                &[
                    (
                        "post_attention_layernorm.weight",
                        "post_attention_norm.weight",
                    ),
                    ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
                    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
                ]
            } else {
                &[("post_attention_layernorm.weight", "ffn_norm.weight")]
            };
            for (a, b) in norms {
                names.insert(format!("{hf}.{a}"), format!("{gg}.{b}"));
            }
            for (a, b) in [
                ("input_layernorm.weight", "attn_norm.weight"),
                ("self_attn.q_norm.weight", "attn_q_norm.weight"),
                ("self_attn.k_norm.weight", "attn_k_norm.weight"),
                ("mlp.gate_proj.weight", "ffn_gate.weight"),
                ("mlp.up_proj.weight", "ffn_up.weight"),
                ("mlp.down_proj.weight", "ffn_down.weight"),
                ("self_attn.o_proj.weight", "attn_output.weight"),
                ("self_attn.o_proj.bias", "attn_output.bias"),
            ] {
                names.insert(format!("{hf}.{a}"), format!("{gg}.{b}"));
            }
            for (p, g) in [("q", "q"), ("k", "k"), ("v", "v")] {
                for s in ["weight", "bias"] {
                    names.insert(
                        format!("{hf}.self_attn.{p}_proj.{s}"),
                        format!("{gg}.attn_{g}.{s}"),
                    );
                }
            }
        }
        Ok(GgufModel {
            file,
            config,
            generation,
            arch,
            names,
        })
    }

    /// Number of heads whose rows llama.cpp permuted in this HF tensor, if any.
    fn permuted_heads(&self, hf_name: &str) -> Option<i64> {
        if self.arch != "llama" {
            return None;
        }
        if hf_name.ends_with("self_attn.q_proj.weight")
            || hf_name.ends_with("self_attn.q_proj.bias")
        {
            Some(self.config.num_attention_heads)
        } else if hf_name.ends_with("self_attn.k_proj.weight")
            || hf_name.ends_with("self_attn.k_proj.bias")
        {
            Some(self.config.num_kv_heads())
        } else {
            None
        }
    }

    fn gguf_tensor(&self, hf_name: &str) -> Option<&GgufTensor> {
        self.names.get(hf_name).and_then(|g| self.file.tensor(g))
    }

    /// The dequantized f32 CPU tensor for an HF name, in HF layout.
    pub fn load_f32(&self, hf_name: &str) -> Result<Tensor> {
        let t = self
            .gguf_tensor(hf_name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: format!(
                    "{hf_name} (GGUF `{}`)",
                    self.names.get(hf_name).cloned().unwrap_or_default()
                ),
                path: self.file.path.clone(),
            })?;
        let values = self.dequantize(t)?;
        let shape = t.shape();
        let mut x = Tensor::f_from_slice(&values)
            .and_then(|x| x.f_view(shape.as_slice()))
            .ctx(|| format!("tensor {hf_name}"))?;
        if self.arch == "gemma3" && hf_name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's RMSNorm weights as `1 + w`; transformers' are `w`.
            x = x.f_sub_scalar(1.0).ctx(|| format!("tensor {hf_name}"))?;
        }
        if let Some(heads) = self.permuted_heads(hf_name) {
            let rows = shape[0];
            let rest: Vec<i64> = shape[1..].to_vec();
            let mut s = vec![heads, rows / heads / 2, 2];
            s.extend(&rest);
            x = x
                .f_reshape(s.as_slice())
                .and_then(|x| x.f_transpose(1, 2))
                .and_then(|x| x.f_reshape(shape.as_slice()))
                .ctx(|| format!("undoing the llama.cpp row permutation of {hf_name}"))?;
        }
        Ok(x)
    }

    fn dequantize(&self, t: &GgufTensor) -> Result<Vec<f32>> {
        self.file.dequantize(t)
    }

    /// The chat template stored in the file, if any.
    pub fn chat_template(&self) -> Option<String> {
        self.file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// `tokenizer.ggml.tokens` and their `token_type`s (1, normal, where the file has none).
    fn vocabulary(&self) -> Result<(Vec<&str>, Vec<i64>)> {
        let g = |k: &str| self.file.get(&format!("tokenizer.ggml.{k}"));
        let tokens: Vec<&str> = g("tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| self.file.err("missing tokenizer.ggml.tokens".into()))?
            .iter()
            .map(|v| v.as_str().unwrap_or(""))
            .collect();
        let types: Vec<i64> = g("token_type")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_f64().unwrap_or(1.0) as i64).collect())
            .unwrap_or_else(|| vec![1; tokens.len()]);
        Ok((tokens, types))
    }

    /// Rebuilds a Hugging Face `tokenizer.json` from `tokenizer.ggml.*`: byte-level BPE models
    /// (`gpt2`) and Gemma 3's SentencePiece vocabulary (`llama`).
    pub fn tokenizer_json(&self) -> Result<Json> {
        let g = |k: &str| self.file.get(&format!("tokenizer.ggml.{k}"));
        let model = g("model").and_then(Value::as_str).unwrap_or("");
        if model == "llama" {
            return self.sentencepiece_tokenizer_json();
        }
        if model != "gpt2" {
            return Err(self.file.err(format!(
                "tokenizer model `{model}` is not supported (supported: gpt2, i.e. byte-level BPE; \
                 llama, i.e. SentencePiece, for gemma3)"
            )));
        }
        let (tokens, types) = self.vocabulary()?;
        let merges: Vec<Json> = g("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| self.file.err("missing tokenizer.ggml.merges".into()))?
            .iter()
            .map(|v| Json::String(v.as_str().unwrap_or("").to_string()))
            .collect();
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, tok) in tokens.iter().enumerate() {
            vocab.insert(tok.to_string(), json!(i));
            // 3 = control, 4 = user-defined: added tokens (control ones are special).
            if let Some(&ty @ (3 | 4)) = types.get(i) {
                added.push(json!({
                    "id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": ty == 3,
                }));
            }
        }
        let pre = g("pre").and_then(Value::as_str).unwrap_or("default");
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
        let pre_tokenizer = match pre {
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            "default" | "gpt2" | "gpt-2" => byte_level(true),
            "qwen2" => json!({"type": "Sequence", "pretokenizers": [split(QWEN2_PATTERN), byte_level(false)]}),
            "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_PATTERN), byte_level(false)]}),
            other => {
                return Err(self.file.err(format!(
                    "tokenizer pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, qwen2, llama-bpe)"
                )))
            }
        };
        let unk = g("unknown_token_id")
            .and_then(Value::as_u64)
            .and_then(|i| tokens.get(i as usize))
            .map(|s| json!(s))
            .unwrap_or(Json::Null);
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges,
            },
        }))
    }

    /// A SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) as a `tokenizer.json`; only
    /// Gemma 3's, see [`gemma_tokenizer_json`]. Other SentencePiece models (Llama 2, Phi-3, ...)
    /// need a different normalizer / pre-tokenizer and merge order, so they are refused.
    fn sentencepiece_tokenizer_json(&self) -> Result<Json> {
        if self.arch != "gemma3" {
            return Err(self.file.err(format!(
                "SentencePiece (`llama`) tokenizers are supported only for gemma3, not for `{}`",
                self.arch
            )));
        }
        let (tokens, types) = self.vocabulary()?;
        Ok(gemma_tokenizer_json(
            &tokens,
            &types,
            self.spm_flag("add_bos_token", true),
            self.spm_flag("add_eos_token", false),
        ))
    }

    /// `tokenizer.ggml.{key}` as a bool; `default` when absent (transformers' GGUF loader assumes
    /// a SentencePiece vocabulary without the flag adds BOS, as llama.cpp does).
    fn spm_flag(&self, key: &str, default: bool) -> bool {
        self.file
            .get(&format!("tokenizer.ggml.{key}"))
            .and_then(Value::as_bool)
            .unwrap_or(default)
    }

    /// A Hugging Face `tokenizer_config.json` for the rebuilt tokenizer.
    pub fn tokenizer_config_json(&self) -> Json {
        let tokens: Vec<&str> = self
            .file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_str().unwrap_or("")).collect())
            .unwrap_or_default();
        let spm = self
            .file
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            == Some("llama");
        if spm && self.arch == "gemma3" {
            // Special tokens by their text, as `gemma_special_ids` (some converted files say
            // `bos = eos = pad = 1`); Gemma 3's chat template when the file carries none.
            let named = |t: &str| {
                if tokens.contains(&t) {
                    json!(t)
                } else {
                    Json::Null
                }
            };
            return json!({
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": named("<bos>"),
                "eos_token": named("<eos>"),
                "unk_token": named("<unk>"),
                "pad_token": named("<pad>"),
                "mask_token": named("<mask>"),
                "add_bos_token": self.spm_flag("add_bos_token", true),
                "add_eos_token": self.spm_flag("add_eos_token", false),
                "clean_up_tokenization_spaces": false,
                "model_max_length": self.config.max_position_embeddings,
                "chat_template": self
                    .chat_template()
                    .unwrap_or_else(|| GEMMA3_CHAT_TEMPLATE.to_string()),
            });
        }
        let tok = |key: &str| {
            self.file
                .get(&format!("tokenizer.ggml.{key}"))
                .and_then(Value::as_u64)
                .and_then(|i| tokens.get(i as usize))
                .map(|s| json!(s))
                .unwrap_or(Json::Null)
        };
        let flag = |key: &str| {
            self.file
                .get(&format!("tokenizer.ggml.{key}"))
                .and_then(Value::as_bool)
                .unwrap_or(false)
        };
        let mut cfg = json!({
            // Not GPT2Tokenizer: transformers 5 rebuilds that class's pre-tokenizer and would drop the
            // digit splitting; PreTrainedTokenizerFast uses tokenizer.json as written.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok("bos_token_id"),
            "eos_token": tok("eos_token_id"),
            "unk_token": tok("unknown_token_id"),
            "pad_token": tok("padding_token_id"),
            "add_bos_token": flag("add_bos_token"),
            "add_eos_token": flag("add_eos_token"),
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": false,
            "model_max_length": self.config.max_position_embeddings,
        });
        if let Some(t) = self.chat_template() {
            cfg["chat_template"] = json!(t);
        }
        cfg
    }
}

/// Gemma 3's SentencePiece vocabulary as a byte-fallback BPE `tokenizer.json`, the way
/// transformers converts a Gemma GGUF (`gemma_tokenizer` in `integrations/gguf/
/// gguf_tokenizer_mapping.py`, built into a `GemmaTokenizer`):
///
/// - tokens of two or more spaces, stored with real spaces, are respelled with `▁` (the normalizer
///   turns every space into `▁` before lookup);
/// - the file has no merges: every split of a token into two vocabulary tokens is a merge, ordered
///   by the token's position in the file (Gemma's scores do not follow its merge order), then by
///   longer left part first (transformers' `generate_merges` with scores `-position`);
/// - normalizer `" " -> "▁"`, pre-tokenizer split after each space, byte fallback, decoder `▁ -> " "`
///   + byte fallback + fuse;
/// - control tokens (type 3) and `<bos>`, `<eos>`, `<unk>`, `<pad>`, `<mask>` are special added
///   tokens, user-defined ones (type 4, like `\n\n` or `<start_of_image>`) plain added tokens; all
///   matched whole in the raw text;
/// - a `TemplateProcessing` post-processor adds `<bos>` / `<eos>` as `add_bos` / `add_eos` say.
fn gemma_tokenizer_json(tokens: &[&str], types: &[i64], add_bos: bool, add_eos: bool) -> Json {
    use std::borrow::Cow;
    let spelled: Vec<Cow<str>> = tokens
        .iter()
        .map(|&t| {
            if t.contains(' ') && t.chars().all(py_is_space) {
                Cow::Owned(SPM_SPACE.repeat(t.chars().count()))
            } else {
                Cow::Borrowed(t)
            }
        })
        .collect();
    // As a Python dict: a repeated token keeps its last id (and is merged by that position).
    let ids: HashMap<&str, usize> = spelled
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_ref(), i))
        .collect();
    let mut merges = Vec::new();
    for (i, tok) in spelled.iter().enumerate() {
        let tok = tok.as_ref();
        if ids[tok] != i {
            continue;
        }
        // Split points right to left: longer left part first.
        for (at, _) in tok.char_indices().rev().filter(|&(at, _)| at > 0) {
            let (left, right) = tok.split_at(at);
            if ids.contains_key(left) && ids.contains_key(right) {
                merges.push(Json::Array(vec![left.into(), right.into()]));
            }
        }
    }
    let mut vocab = serde_json::Map::with_capacity(spelled.len());
    for (i, tok) in spelled.iter().enumerate() {
        vocab.insert(tok.to_string(), json!(i));
    }

    // Added tokens, by the text the file gives (transformers adds them so; the respelled space
    // tokens are then not in the vocabulary and are left out). A control token missing from the
    // vocabulary would get a new id there; here it is left out too (no Gemma file has one).
    let named = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"];
    let control = named.iter().copied().chain(
        tokens
            .iter()
            .zip(types)
            .filter(|&(_, &ty)| ty == 3)
            .map(|(&t, _)| t),
    );
    let user = tokens
        .iter()
        .zip(types)
        .filter(|&(_, &ty)| ty == 4)
        .map(|(&t, _)| t);
    let mut added: BTreeMap<usize, Json> = BTreeMap::new();
    let mut add = |tok: &str, special: bool| {
        if let Some(&id) = ids.get(tok) {
            added.entry(id).or_insert_with(|| {
                json!({
                    "id": id, "content": tok, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                })
            });
        }
    };
    control.for_each(|t| add(t, true));
    user.for_each(|t| add(t, false));

    // transformers' `update_post_processor`: `[<bos>] $A [<eos>]`, and the same around `$B`.
    let mut specials = serde_json::Map::new();
    let mut use_special = |tok: &str, wanted: bool| match ids.get(tok) {
        Some(&id) if wanted => {
            specials.insert(tok.into(), json!({"id": tok, "ids": [id], "tokens": [tok]}));
            true
        }
        _ => false,
    };
    let (bos, eos) = (use_special("<bos>", add_bos), use_special("<eos>", add_eos));
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let special = |tok: &str| json!({"SpecialToken": {"id": tok, "type_id": type_id}});
        let mut part = Vec::new();
        if bos {
            part.push(special("<bos>"));
        }
        part.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
        if eos {
            part.push(special("<eos>"));
        }
        if seq == "A" {
            single = part.clone();
        }
        pair.extend(part);
    }

    let mut out = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": null,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": ids.contains_key("<unk>").then_some("<unk>"),
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": null, "merges": null,
        },
    });
    // Moved in, not through `json!`, which would copy them by serializing.
    out["added_tokens"] = Json::Array(added.into_values().collect());
    out["model"]["vocab"] = Json::Object(vocab);
    out["model"]["merges"] = Json::Array(merges);
    out
}

/// SentencePiece's word-boundary mark, `▁` (U+2581).
const SPM_SPACE: &str = "\u{2581}";

/// Python's `str.isspace` for one character: Unicode White_Space (Rust's `is_whitespace`) plus the
/// ASCII separators U+001C..U+001F.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Gemma 3's chat template (the one of google/gemma-3-*-it's `tokenizer_config.json`), used when a
/// Gemma 3 file carries none: `<bos>`, an optional system message prepended to the first user turn,
/// turns `<start_of_turn>{user|model}\n{content | trim}<end_of_turn>\n`, and `<start_of_turn>model\n`
/// as the generation prompt. Verbatim; `chat.rs` (minijinja) renders all of it.
pub const GEMMA3_CHAT_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '

' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '

' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '
' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>
' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model
'}}
{%- endif -%}
"#;

/// Gemma's special token ids, found by their tokens (`<bos>`, `<eos>`, `<pad>`) rather than trusted
/// from the metadata; generation also stops at `<end_of_turn>`, as Gemma's
/// `generation_config.json` says (`eos_token_id: [1, 106]`).
fn gemma_special_ids(file: &GgufFile) -> (Option<TokenIds>, Option<TokenIds>, Option<TokenIds>) {
    let tokens: Vec<&str> = file
        .get("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(|v| v.as_str().unwrap_or("")).collect())
        .unwrap_or_default();
    let id = |tok: &str| tokens.iter().position(|t| *t == tok).map(|i| i as i64);
    let eos: Vec<i64> = ["<eos>", "<end_of_turn>"]
        .iter()
        .filter_map(|t| id(t))
        .collect();
    (
        id("<bos>").map(TokenIds::One),
        (!eos.is_empty()).then_some(TokenIds::Many(eos)),
        id("<pad>").map(TokenIds::One),
    )
}

/// Qwen2's pre-tokenizer split pattern (from its tokenizer.json).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl TensorSource for GgufModel {
    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }
    fn file_of(&self, _name: &str) -> PathBuf {
        self.file.path.clone()
    }
    fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.gguf_tensor(name).map(GgufTensor::shape)
    }
    fn load_into(&self, name: &str, dst: &mut Tensor) -> Result<()> {
        let x = self.load_f32(name)?;
        dst.f_copy_(&x)
            .ctx(|| format!("copying `{name}` from {}", self.file.path.display()))
    }

    fn release_pages(&self) {
        crate::loader::release_mapped_pages(&self.file.mmap);
    }
}

/// Kind used when dequantized GGUF weights are materialized on the host.
pub const GGUF_KIND: Kind = Kind::Float;

#[cfg(test)]
mod gemma_tokenizer_tests {
    use super::*;

    #[test]
    fn merges_follow_file_order_and_spaces_are_respelled() {
        let tokens = [
            "<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "▁", "▁a", "  ", "ba", "aba",
            "<0x41>",
        ];
        let types = [3, 3, 3, 2, 1, 1, 1, 1, 1, 4, 1, 4, 6];
        let j = gemma_tokenizer_json(&tokens, &types, true, false);
        assert_eq!(
            j["model"]["merges"],
            json!([
                ["a", "b"],
                ["▁", "a"],
                ["▁", "▁"],
                ["b", "a"],
                ["ab", "a"],
                ["a", "ba"]
            ])
        );
        assert_eq!(j["model"]["vocab"]["▁▁"], json!(9));
        // `<unk>` is special by name; `  ` (type 4) is respelled, so not an added token.
        let added: Vec<(u64, bool)> = j["added_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["id"].as_u64().unwrap(), t["special"].as_bool().unwrap()))
            .collect();
        assert_eq!(
            added,
            [(0, true), (1, true), (2, true), (3, true), (11, false)]
        );
        let tok = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&j).unwrap()).unwrap();
        let ids = |s: &str| tok.encode(s, true).unwrap().get_ids().to_vec();
        assert_eq!(ids("ab  a"), [2, 6, 7, 8]);
        assert_eq!(ids("abaA"), [2, 11, 12]);
        assert_eq!(tok.decode(&[2, 6, 7, 8, 12], true).unwrap(), "ab  aA");
    }

    #[test]
    fn python_whitespace() {
        assert!(" \t\n\u{1c}\u{1f}\u{a0}\u{3000}".chars().all(py_is_space));
        assert!(!"a\u{200b}".chars().any(py_is_space));
    }
}
