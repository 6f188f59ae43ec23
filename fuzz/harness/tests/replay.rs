//! The fuzz targets on stable, in every `cargo test`: each seed, then a seeded mutation of
//! the seeds (bit flips, interesting integers, cut and splice), a fixed number of times per
//! target. A panic fails the test naming the target, the seed and the case; an allocation
//! past [`LIMIT`] aborts the run (a metadata-driven allocation that was not bounded). The
//! long coverage-guided runs are `scripts/fuzz.sh` (docs/RELIABILITY.md).

use qins_fuzz::Reached;
use std::alloc::{GlobalAlloc, Layout, System};

/// No input of these sizes may make a target ask for more at once.
const LIMIT: usize = 1 << 30;

struct Bounded;

// SAFETY: forwards to the system allocator, refusing only oversized requests (a null
// return, which the caller reports as an allocation failure).
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > LIMIT {
            eprintln!("fuzz replay: an allocation of {} bytes", l.size());
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as the caller made it.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded as the caller made it.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > LIMIT {
            eprintln!("fuzz replay: a reallocation to {new} bytes");
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded as the caller made it.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Bounded = Bounded;

/// The workspace's generator, seeded per target so that a failure replays.
struct Rng(qins::rng::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 62, u64::MAX];

fn mutate(rng: &mut Rng, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len().max(1));
        match rng.below(6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = rng.next() as u8,
            2 => {
                let x = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in x.iter().take(w).enumerate() {
                    if let Some(d) = v.get_mut(at + i) {
                        *d = *b;
                    }
                }
            }
            3 => v.truncate(at),
            4 if !other.is_empty() => {
                let from = rng.below(other.len());
                let n = rng.below(other.len() - from).min(256);
                let chunk = other[from..from + n].to_vec();
                v.splice(at.min(v.len())..at.min(v.len()), chunk);
            }
            _ => {
                let n = rng.below(16).min(v.len() - at.min(v.len()));
                v.drain(at.min(v.len())..at.min(v.len()) + n);
            }
        }
    }
    v
}

/// Runs the seeds and `cases` mutations; returns how many inputs reached each depth.
fn replay(name: &str, target: fn(&[u8]) -> Reached, cases: usize) -> [usize; 3] {
    let seeds = qins_fuzz::seeds::of(name);
    let mut rng = Rng(qins::rng::SplitMix64::new(0x51_4E_53 ^ name.len() as u64 ^ (name.as_bytes()[0] as u64) << 32));
    let mut depth = [0usize; 3];
    let mut run = |what: &str, input: &[u8]| match std::panic::catch_unwind(|| target(input)) {
        Ok(r) => depth[r as usize] += 1,
        Err(_) => {
            let path = std::env::temp_dir().join(format!("qins-fuzz-crash-{name}.bin"));
            std::fs::write(&path, input).ok();
            panic!("{name}: {what} panicked; the input is in {}", path.display());
        }
    };
    for (i, s) in seeds.iter().enumerate() {
        run(&format!("seed {i}"), s);
    }
    // Inputs that once crashed a target (libFuzzer's artifacts, kept as regressions).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions").join(name);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let input = std::fs::read(e.path()).expect("a regression input");
        run(&format!("regression {}", e.file_name().to_string_lossy()), &input);
    }
    for case in 0..cases {
        let s = &seeds[rng.below(seeds.len())];
        let o = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, s, o);
        run(&format!("case {case}"), &input);
    }
    eprintln!("{name}: {cases} mutations + {} seeds; reached nothing / parsed / the end: {depth:?}", seeds.len());
    depth
}

/// A replay that never gets past the first check tests nothing: at least `min_end`
/// percent of the inputs must reach the end.
fn assert_deep(name: &str, depth: [usize; 3], min_end: usize) {
    let total: usize = depth.iter().sum();
    assert!(depth[2] * 100 >= total * min_end, "{name}: only {}/{total} inputs reached the end", depth[2]);
}

#[test]
fn onnx_model() {
    assert_deep("onnx_model", replay("onnx_model", qins_fuzz::onnx_model, 3000), 5);
}

#[test]
fn gguf() {
    assert_deep("gguf", replay("gguf", qins_fuzz::gguf, 3000), 5);
}

#[test]
fn rewrite_plan() {
    assert_deep("rewrite_plan", replay("rewrite_plan", qins_fuzz::rewrite_plan, 1500), 5);
}

#[test]
fn attention_inputs() {
    assert_deep("attention_inputs", replay("attention_inputs", qins_fuzz::attention_inputs, 20000), 5);
}

#[test]
fn op_inputs() {
    assert_deep("op_inputs", replay("op_inputs", qins_fuzz::op_inputs, 20000), 5);
}

/// The seeds reach deep: a model that loads and plans, a GGUF that imports.
#[test]
fn seeds_are_valid() {
    for s in &qins_fuzz::seeds::of("onnx_model") {
        let n = u32::from_le_bytes(s[..4].try_into().unwrap()) as usize;
        let dir = tempdir("seed-onnx");
        std::fs::write(dir.join("model.onnx"), &s[4..4 + n]).unwrap();
        std::fs::write(dir.join("model.onnx.data"), &s[4 + n..]).unwrap();
        let m = qins::onnx::Model::load(&dir).unwrap();
        let p = qins_graph_rewrite::plan::plan(&m, &Default::default()).unwrap();
        assert_eq!(p.targets.len(), 4, "qkv (V), o, gate+up, down");
    }
    for s in &qins_fuzz::seeds::of("gguf") {
        let g = qins_models::Gguf::from_bytes("seed.gguf".as_ref(), s.to_vec()).unwrap();
        let cfg = qins_models::LlamaConfig::from_gguf(&g).unwrap();
        qins_models::tokenizer::build(&g).unwrap();
        for src in qins_models::llama::build(&cfg).sources.values() {
            qins_models::llama::materialize(&g, &cfg, src).unwrap();
        }
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("qins-fuzz-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
