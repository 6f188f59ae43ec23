//! The CPU kernel against a plain f64 reference written from the contract (rotary, grouped
//! heads, causal and local-window masks, softcap, V decoded from the codec's rows), for every
//! kind of run: first prompts with padding, continued prompts, token steps over separate and
//! shared buffers; and a prompt against the same tokens run one at a time.

use super::*;
use crate::cpu::parallel::{Rayon, Sequential};
use crate::ops::qins_attention::{Dims, Infos};
use crate::ort_api::{elem, TensorInfo};
use qins::codec::kv::v_row_bytes;
use qins::codec::Format;
use qins::rng::SplitMix64;

#[derive(Clone, Copy)]
struct Cfg {
    heads: usize,
    kv: usize,
    hd: usize,
    rotary: Option<Rotary>,
    rotary_dim: usize,
    window: Option<usize>,
    softcap: f32,
    v: Format,
    packed: bool,
}

const SMOL: Cfg = Cfg {
    heads: 9,
    kv: 3,
    hd: 64,
    rotary: Some(Rotary::Halves),
    rotary_dim: 64,
    window: None,
    softcap: 0.0,
    v: Format::Q8,
    packed: true,
};

fn node(c: Cfg, act: Act) -> Node {
    Node {
        name: "t".into(),
        act,
        heads: c.heads,
        kv_heads: c.kv,
        scale: 0.0,
        softcap: c.softcap,
        rotary: c.rotary,
        window: c.window,
        v_format: c.v,
    }
}

/// Random raw (pre-rotary) Q, K, V of `len` tokens of `batch` sequences, `[b][pos][head][d]`.
struct Tokens {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
}

fn tokens(c: Cfg, batch: usize, len: usize, seed: u64) -> Tokens {
    let mut r = SplitMix64::seeded(seed);
    let mut gen = |n: usize, scale: f64| (0..n).map(|_| (r.gauss() * scale) as f32).collect::<Vec<f32>>();
    Tokens {
        q: gen(batch * len * c.heads * c.hd, 1.0),
        k: gen(batch * len * c.kv * c.hd, 1.0),
        v: gen(batch * len * c.kv * c.hd, 0.5),
        len,
    }
}

fn rope_tables(c: Cfg, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = c.rotary_dim / 2;
    let (mut cos, mut sin) = (vec![], vec![]);
    for p in 0..positions {
        for i in 0..half {
            let f = p as f64 / 10000f64.powf(2.0 * i as f64 / c.rotary_dim as f64);
            cos.push(f.cos() as f32);
            sin.push(f.sin() as f32);
        }
    }
    (cos, sin)
}

/// The contract in f64: output `[b][s][head][d]` for queries `from..to` of each sequence,
/// given `lens[b]` real tokens (queries past it see the real ones only).
fn reference(c: Cfg, t: &Tokens, lens: &[usize], from: usize, to: usize) -> Vec<f64> {
    let (cos, sin) = rope_tables(c, t.len + 1);
    let half = c.rotary_dim / 2;
    let rot = |x: &[f32], pos: usize| -> Vec<f64> {
        let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        if let Some(kind) = c.rotary {
            for i in 0..half {
                let (a, b) = if kind == Rotary::Halves { (i, i + half) } else { (2 * i, 2 * i + 1) };
                let (cv, sv) = (cos[pos * half + i] as f64, sin[pos * half + i] as f64);
                let (xa, xb) = (y[a], y[b]);
                y[a] = xa * cv - xb * sv;
                y[b] = xb * cv + xa * sv;
            }
        }
        // The model's type (f32) holds the rotated rows, as the kernel stores them.
        y.iter().map(|&v| v as f32 as f64).collect()
    };
    let rb = v_row_bytes(c.v, c.hd).unwrap();
    let mut out = vec![0f64; lens.len() * (to - from) * c.heads * c.hd];
    let alpha = 1.0 / (c.hd as f64).sqrt();
    for (b, &len) in lens.iter().enumerate() {
        for kvh in 0..c.kv {
            let row = |src: &[f32], width: usize, pos: usize, head: usize| {
                src[((b * t.len + pos) * width + head) * c.hd..][..c.hd].to_vec()
            };
            let keys: Vec<Vec<f64>> = (0..len).map(|p| rot(&row(&t.k, c.kv, p, kvh), p)).collect();
            let values: Vec<Vec<f64>> = (0..len)
                .map(|p| {
                    let mut enc = vec![0u8; rb];
                    qins::codec::kv::encode_v_row(c.v, &row(&t.v, c.kv, p, kvh), &mut enc);
                    let mut d = vec![0f32; c.hd];
                    qins::codec::kv::decode_v_row(c.v, &enc, &mut d);
                    d.iter().map(|&x| x as f64).collect()
                })
                .collect();
            for j in 0..c.heads / c.kv {
                let head = kvh * (c.heads / c.kv) + j;
                for s in from..to {
                    let q = rot(&row(&t.q, c.heads, s, head), s);
                    let end = (s + 1).min(len);
                    let start = c.window.filter(|&w| end > w + 1).map_or(0, |w| end - w - 1);
                    let mut p: Vec<f64> = (start..end)
                        .map(|k| {
                            let x = alpha * q.iter().zip(&keys[k]).map(|(a, b)| a * b).sum::<f64>();
                            if c.softcap > 0.0 {
                                c.softcap as f64 * (x / c.softcap as f64).tanh()
                            } else {
                                x
                            }
                        })
                        .collect();
                    let m = p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    p.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let z: f64 = p.iter().sum();
                    let o = &mut out[((b * (to - from) + s - from) * c.heads + head) * c.hd..][..c.hd];
                    for (k, pk) in (start..end).zip(&p) {
                        for d in 0..c.hd {
                            o[d] += pk / z * values[k][d];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Runs the kernel on tokens `from..to` of every sequence after `from` cached ones held in
/// `cache` (present_key, present_value of `cap` positions, shared as past and present when
/// `shared`, else given as a separate past of `from` positions). Returns the output.
#[allow(clippy::too_many_arguments)]
fn run(
    c: Cfg,
    t: &Tokens,
    lens: &[usize],
    from: usize,
    to: usize,
    cache: &mut (Vec<f32>, Vec<u8>),
    cap: usize,
    shared: bool,
    pool: &dyn ParallelFor,
) -> Result<Vec<f32>> {
    let batch = lens.len();
    let seq = to - from;
    let (hd, rb) = (c.hd, v_row_bytes(c.v, c.hd).unwrap());
    let width = if c.packed { (c.heads + 2 * c.kv) * hd } else { c.heads * hd };
    let (mut q, mut k, mut v) = (vec![0f32; batch * seq * width], vec![], vec![]);
    if !c.packed {
        k = vec![0f32; batch * seq * c.kv * hd];
        v = k.clone();
    }
    for b in 0..batch {
        for s in 0..seq {
            let src =
                |x: &[f32], heads: usize, hh: usize| x[((b * t.len + from + s) * heads + hh) * hd..][..hd].to_vec();
            for hh in 0..c.heads {
                q[(b * seq + s) * width + hh * hd..][..hd].copy_from_slice(&src(&t.q, c.heads, hh));
            }
            for hh in 0..c.kv {
                let (kr, vr) = (src(&t.k, c.kv, hh), src(&t.v, c.kv, hh));
                if c.packed {
                    q[(b * seq + s) * width + (c.heads + hh) * hd..][..hd].copy_from_slice(&kr);
                    q[(b * seq + s) * width + (c.heads + c.kv + hh) * hd..][..hd].copy_from_slice(&vr);
                } else {
                    k[((b * seq + s) * c.kv + hh) * hd..][..hd].copy_from_slice(&kr);
                    v[((b * seq + s) * c.kv + hh) * hd..][..hd].copy_from_slice(&vr);
                }
            }
        }
    }
    let total = if from == 0 { seq } else { lens.iter().copied().max().unwrap().max(to) };
    let past = if shared { cap } else { from };
    let n = node(c, Act::F32);
    let (cos, sin) = rope_tables(c, t.len + 1);
    let ti = |e, s: &[usize]| TensorInfo { elem: e, shape: s.iter().map(|&d| d as i64).collect() };
    let f = elem::FLOAT;
    let (qi, ki) = (ti(f, &[batch, seq, width]), ti(f, &[batch, seq, c.kv * hd]));
    let (pki, pvi) = (ti(f, &[batch, c.kv, past, hd]), ti(elem::UINT8, &[batch, c.kv, past, rb]));
    let (ski, toti) = (ti(elem::INT32, &[batch]), ti(elem::INT32, &[1]));
    let ci = ti(f, &[t.len + 1, c.rotary_dim / 2]);
    let infos = Infos {
        query: &qi,
        key: (!c.packed).then_some(&ki),
        value: (!c.packed).then_some(&ki),
        past_key: Some(&pki),
        past_value: Some(&pvi),
        seqlens_k: &ski,
        total: &toti,
        cos: c.rotary.map(|_| &ci),
        sin: c.rotary.map(|_| &ci),
    };
    let dims: Dims = n.check(&infos, total as i32)?;
    let seqlens: Vec<i32> = lens.iter().map(|&l| (if from == 0 { l } else { to.min(l) }) as i32 - 1).collect();
    let mut out = vec![0f32; batch * seq * c.heads * hd];
    let (mut pk, mut pv) = (vec![0f32; batch * c.kv * dims.present * hd], vec![0u8; batch * c.kv * dims.present * rb]);
    let (old_k, old_v);
    let (past_key, past_value) = if shared {
        (None, None)
    } else {
        // A separate past: the first `from` rows of the running cache, as its own tensor.
        let old_p = cache.0.len() / (batch * c.kv * hd);
        old_k = (0..batch * c.kv).flat_map(|g| cache.0[g * old_p * hd..][..from * hd].to_vec()).collect::<Vec<_>>();
        old_v = (0..batch * c.kv).flat_map(|g| cache.1[g * old_p * rb..][..from * rb].to_vec()).collect::<Vec<_>>();
        (Some(&old_k[..]), Some(&old_v[..]))
    };
    let (present_key, present_value) = if shared { (&mut cache.0, &mut cache.1) } else { (&mut pk, &mut pv) };
    attention(
        &n,
        &dims,
        Buffers {
            query: &q,
            key: (!c.packed).then_some(&k[..]),
            value: (!c.packed).then_some(&v[..]),
            past_key,
            past_value,
            seqlens_k: &seqlens,
            cos: if c.rotary.is_some() { &cos } else { &[] },
            sin: if c.rotary.is_some() { &sin } else { &[] },
            output: &mut out,
            present_key,
            present_value,
        },
        pool,
    )?;
    if !shared {
        *cache = (pk, pv);
    }
    Ok(out)
}

fn nmse(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let e: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let s: f64 = want.iter().map(|b| b * b).sum();
    e / s.max(1e-300)
}

fn variants() -> Vec<(&'static str, Cfg)> {
    vec![
        ("smollm2", SMOL),
        ("phi3.5 plain heads", Cfg { heads: 4, kv: 4, hd: 96, ..SMOL }),
        ("q4", Cfg { v: Format::Q4, ..SMOL }),
        ("unpacked", Cfg { packed: false, ..SMOL }),
        ("interleaved, partial rotary", Cfg { rotary: Some(Rotary::Interleaved), rotary_dim: 32, ..SMOL }),
        ("no rotary", Cfg { rotary: None, ..SMOL }),
        ("window", Cfg { window: Some(5), ..SMOL }),
        ("softcap", Cfg { softcap: 2.0, ..SMOL }),
    ]
}

#[test]
fn prompt_then_tokens_match_the_reference() {
    for (name, c) in variants() {
        let t = tokens(c, 2, 48, 11);
        let lens = [48, 37];
        let mut cache = (vec![], vec![]);
        // A first prompt of 40 tokens (the second sequence padded after 37, as genai batches).
        let lens_prompt = [40, 37];
        let out = run(c, &t, &lens_prompt, 0, 40, &mut cache, 0, false, &Rayon).unwrap();
        let want = reference(c, &t, &lens_prompt, 0, 40);
        // Padded rows (second sequence, 37..40) are not compared: no model reads them.
        let row = c.heads * c.hd;
        let keep = |x: &[f32]| -> Vec<f32> {
            x.chunks(40 * row).enumerate().flat_map(|(b, s)| s[..lens_prompt[b] * row].to_vec()).collect()
        };
        let keep64 = |x: &[f64]| -> Vec<f64> {
            x.chunks(40 * row).enumerate().flat_map(|(b, s)| s[..lens_prompt[b] * row].to_vec()).collect()
        };
        let e = nmse(&keep(&out), &keep64(&want));
        assert!(e < 1e-10, "{name}: prompt nMSE {e}");
        // Then token steps for the first sequence only (batch 1 continues), separate buffers.
        let t1 = Tokens {
            q: t.q[..48 * c.heads * c.hd].to_vec(),
            k: t.k[..48 * c.kv * c.hd].to_vec(),
            v: t.v[..48 * c.kv * c.hd].to_vec(),
            len: 48,
        };
        let mut c1 =
            (cache.0[..c.kv * 40 * c.hd].to_vec(), cache.1[..c.kv * 40 * v_row_bytes(c.v, c.hd).unwrap()].to_vec());
        for pos in 40..lens[0] {
            let out = run(c, &t1, &[pos + 1], pos, pos + 1, &mut c1, 0, false, &Sequential).unwrap();
            let want = reference(c, &t1, &[pos + 1], pos, pos + 1);
            let e = nmse(&out, &want);
            assert!(e < 1e-10, "{name}: token {pos} nMSE {e}");
        }
    }
}

#[test]
fn shared_buffer_steps_and_continued_prompts() {
    let c = SMOL;
    let t = tokens(c, 1, 30, 5);
    let cap = 64;
    let rb = v_row_bytes(c.v, c.hd).unwrap();
    let mut cache = (vec![0f32; c.kv * cap * c.hd], vec![0u8; c.kv * cap * rb]);
    // A prompt of 10 in the shared buffer, a continued prompt of 7, then single tokens.
    let mut at = 0;
    for next in [10, 17, 18, 19, 25, 30] {
        let out = run(c, &t, &[next], at, next, &mut cache, cap, true, &Rayon).unwrap();
        let want = reference(c, &t, &[next], at, next);
        let e = nmse(&out, &want);
        assert!(e < 1e-10, "{at}..{next}: nMSE {e}");
        at = next;
    }
    // Rows past the written ones were never touched.
    for g in 0..c.kv {
        assert!(cache.1[g * cap * rb + 30 * rb..(g + 1) * cap * rb].iter().all(|&b| b == 0), "group {g}");
    }
}

#[test]
fn a_prompt_equals_its_tokens_one_at_a_time() {
    let c = SMOL;
    let t = tokens(c, 1, 24, 9);
    let mut cache = (vec![], vec![]);
    let whole = run(c, &t, &[24], 0, 24, &mut cache, 0, false, &Rayon).unwrap();
    let mut cache1 = (vec![], vec![]);
    let mut steps = vec![];
    for pos in 0..24 {
        steps.extend(run(c, &t, &[pos + 1], pos, pos + 1, &mut cache1, 0, false, &Sequential).unwrap());
    }
    // Same cache bytes (the rows are encoded the same way whichever run wrote them)...
    assert_eq!(cache.1, cache1.1);
    assert_eq!(cache.0, cache1.0);
    // ...and the same outputs up to f32 summation order.
    let w: Vec<f64> = whole.iter().map(|&x| x as f64).collect();
    let e = nmse(&steps, &w);
    assert!(e < 1e-12, "nMSE {e}");
}

#[test]
fn threads_give_the_same_bits() {
    let c = SMOL;
    let t = tokens(c, 2, 70, 3);
    let (mut a, mut b) = ((vec![], vec![]), (vec![], vec![]));
    let x = run(c, &t, &[70, 70], 0, 70, &mut a, 0, false, &Sequential).unwrap();
    let y = run(c, &t, &[70, 70], 0, 70, &mut b, 0, false, &Rayon).unwrap();
    assert_eq!(x, y);
    assert_eq!(a, b);
}

#[test]
fn bad_lengths_are_errors() {
    let c = SMOL;
    let t = tokens(c, 1, 8, 1);
    let mut cache = (vec![], vec![]);
    run(c, &t, &[8], 0, 8, &mut cache, 0, false, &Sequential).unwrap();
    // seqlens_k past what the buffers hold: an error, not a panic or a stray write.
    let e = run(c, &t, &[9], 7, 8, &mut cache, 0, false, &Sequential);
    assert!(e.is_ok(), "{e:?}");
    let n = node(c, Act::F32);
    let ti = |e, s: &[i64]| TensorInfo { elem: e, shape: s.to_vec() };
    let (q, pk, pv) = (ti(elem::FLOAT, &[1, 1, 960]), ti(elem::FLOAT, &[1, 3, 4, 64]), ti(elem::UINT8, &[1, 3, 4, 68]));
    let (sk, tot, cs) = (ti(elem::INT32, &[1]), ti(elem::INT32, &[1]), ti(elem::FLOAT, &[16, 32]));
    let infos = Infos {
        query: &q,
        key: None,
        value: None,
        past_key: Some(&pk),
        past_value: Some(&pv),
        seqlens_k: &sk,
        total: &tot,
        cos: Some(&cs),
        sin: Some(&cs),
    };
    let dims = n.check(&infos, 5).unwrap();
    for bad in [5, 9, -7, i32::MAX, i32::MIN] {
        assert!(dims.lengths(0, bad).is_err(), "seqlens_k {bad}");
    }
    // A position past the rotary caches.
    let (cos, sin) = (vec![0f32; 4 * 32], vec![0f32; 4 * 32]);
    let (mut out, mut k, mut v) = (vec![0f32; 576], vec![0f32; 3 * 5 * 64], vec![0u8; 3 * 5 * 68]);
    let (q, pkd, pvd) = (vec![0f32; 960], vec![0f32; 3 * 4 * 64], vec![0u8; 3 * 4 * 68]);
    let cs4 = ti(elem::FLOAT, &[4, 32]);
    let dims = n.check(&Infos { cos: Some(&cs4), sin: Some(&cs4), ..infos }, 5).unwrap();
    let e = attention(
        &n,
        &dims,
        Buffers {
            query: &q,
            key: None,
            value: None,
            past_key: Some(&pkd),
            past_value: Some(&pvd),
            seqlens_k: &[4],
            cos: &cos,
            sin: &sin,
            output: &mut out,
            present_key: &mut k,
            present_value: &mut v,
        },
        &Sequential,
    )
    .unwrap_err();
    assert!(e.msg.contains("rotary"), "{e}");
}
