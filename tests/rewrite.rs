//! The rewrite on the builder's reference graphs, without running them: which nodes change,
//! what is kept byte for byte, what the written codes decode to, and how bad input fails.

mod common;

use common::{fixture, scratch};
use qins::codec::{Elem, Encoded, Format, Layout, WeightSource};
use qins::onnx::proto::{ModelProto, NodeProto};
use qins::onnx::{dtype, Model};
use qins_graph_rewrite::plan::{self, PlanOptions, Preset, Role};
use qins_graph_rewrite::rewrite::{self, NoProgress, RewriteOptions};
use std::collections::HashMap;

fn count_ops(m: &ModelProto) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for n in &m.graph.as_ref().unwrap().node {
        *c.entry(n.op_type().to_string()).or_default() += 1;
    }
    c
}

fn opts(format: Format, group: usize) -> RewriteOptions {
    RewriteOptions { format, group, force: true, fsync: false, kv_v: None, library: None }
}

#[test]
fn phi3_policy_takes_v_o_gate_up_down_and_keeps_the_rest() {
    for (name, layers) in [("phi35-tiny-fp32-cpu", 2), ("llama-gqa-tiny-fp32-cpu", 2), ("phi35-tiny-fp16-cuda", 2)] {
        let m = Model::load(&fixture(name)).unwrap();
        let unfused = plan::plan(&m, &PlanOptions { fuse_mlp: false, ..Default::default() }).unwrap();
        assert_eq!(unfused.targets.len(), 5 * layers, "{name}");
        assert!(unfused.targets.iter().all(|t| t.swiglu.is_none()));
        // By default each layer's gate takes in its up projection and SiLU: 4 ops a layer.
        let p = plan::plan(&m, &PlanOptions::default()).unwrap();
        assert_eq!(p.targets.len(), 4 * layers, "{name}");
        for t in p.targets.iter().filter(|t| t.role == Role::Gate) {
            let s = t.swiglu.as_ref().unwrap_or_else(|| panic!("{name}: {} not fused", t.name));
            assert!(s.up_name.contains("up_proj"), "{}", s.up_name);
            assert_eq!(t.n(), 2 * t.cols.len());
        }
        assert!(!p.targets.iter().any(|t| t.role == Role::Up));
        let roles: Vec<Role> = p.targets.iter().map(|t| t.role).collect();
        assert!(!roles.contains(&Role::LmHead) && !roles.contains(&Role::Q) && !roles.contains(&Role::K));
        // The packed qkv gives up only its V columns: q + k + v = 3 equal parts for phi35
        // (2 heads, 2 KV heads), 4 + 2 + 2 heads for the GQA llama.
        for t in p.targets.iter().filter(|t| t.role == Role::Qkv) {
            let (q_k, v) = if name.starts_with("llama") { (96, 32) } else { (64, 32) };
            assert_eq!(t.cols, q_k..q_k + v, "{name} {}", t.name);
            assert!(t.is_split());
        }

        let out = scratch(&format!("policy-{name}"));
        let report = rewrite::rewrite(&m, &p, &opts(Format::Q8, 32), &out, &mut NoProgress).unwrap();
        assert_eq!(report.layers.len(), 4 * layers);
        let before = count_ops(&m.proto);
        let after_model = Model::load(&out).unwrap();
        let after = count_ops(&after_model.proto);
        assert_eq!(after["QinsMatMul"], 4 * layers);
        let swiglu = |n: &&NodeProto| n.attribute.iter().any(|a| a.name() == "swiglu" && a.i() == 1);
        assert_eq!(after_model.graph().node.iter().filter(swiglu).count(), layers);
        assert_eq!(after.get("Sigmoid").copied().unwrap_or(0) + layers, before["Sigmoid"], "{name}");
        assert_eq!(after.get("Mul").copied().unwrap_or(0) + 2 * layers, before["Mul"], "{name}");
        // Only lm_head stays a MatMul: each split qkv is one QinsMatMul with its float Q/K
        // columns as input 3, stored transposed.
        assert_eq!(after["MatMul"], 1);
        assert_eq!(after.get("Concat"), before.get("Concat"), "{name}");
        for t in p.targets.iter().filter(|t| t.role == Role::Qkv) {
            assert!(t.mixed);
            let n = after_model.graph().node.iter().find(|n| n.name() == format!("{}_QINS", t.name)).unwrap();
            assert_eq!(n.input.len(), 4, "{name} {}", t.name);
            let wf = after_model.initializer(&n.input[3]).unwrap();
            assert_eq!(wf.dims, vec![t.cols.start as i64, t.k as i64]);
            let (orig, got) =
                (m.tensor_bytes(m.initializer(&t.weight).unwrap()).unwrap(), after_model.tensor_bytes(wf).unwrap());
            let eb = t.elem.bytes();
            for (kk, j) in [(0, 0), (1, 5), (t.k - 1, t.cols.start - 1), (t.k / 2, t.cols.start / 3)] {
                let src = (kk * t.n_total + j) * eb;
                let dst = (j * t.k + kk) * eb;
                assert_eq!(orig[src..src + eb], got[dst..dst + eb], "{name} {} at k={kk} n={j}", t.name);
            }
        }
        // Unmixed: a float MatMul and a Concat beside each split qkv's QinsMatMul.
        let split = plan::plan(&m, &PlanOptions { fuse_qkv: false, ..Default::default() }).unwrap();
        assert!(split.targets.iter().all(|t| !t.mixed));
        let out2 = scratch(&format!("policy-split-{name}"));
        rewrite::rewrite(&m, &split, &opts(Format::Q8, 32), &out2, &mut NoProgress).unwrap();
        let after2 = count_ops(&Model::load(&out2).unwrap().proto);
        assert_eq!(after2["MatMul"], 1 + layers);
        assert_eq!(after2["QinsMatMul"], 4 * layers);
        assert_eq!(after2.get("Concat").copied().unwrap_or(0), before.get("Concat").copied().unwrap_or(0) + layers);
        for op in ["GroupQueryAttention", "SkipSimplifiedLayerNormalization", "If", "Gather"] {
            assert_eq!(after.get(op), before.get(op), "{name}: {op} count changed");
        }
        assert!(after_model.proto.opset_import.iter().any(|o| o.domain() == "com.qins" && o.version() == 1));
        for o in &m.proto.opset_import {
            assert!(after_model.proto.opset_import.contains(o), "{name}: lost opset {o:?}");
        }
        // Graph I/O unchanged.
        let (g0, g1) = (m.graph(), after_model.graph());
        assert_eq!(g0.input, g1.input);
        assert_eq!(g0.output, g1.output);
        // Everything travels with the model.
        assert!(out.join("genai_config.json").exists());
        assert!(out.join("qins_report.json").exists());
    }
}

#[test]
fn untouched_tensors_and_subgraphs_are_kept_byte_for_byte() {
    let src = fixture("phi35-tiny-fp32-cpu");
    let m = Model::load(&src).unwrap();
    // Unfused, so that every node but the MatMuls stays (the fused case drops the SiLU).
    let p = plan::plan(&m, &PlanOptions { fuse_mlp: false, ..Default::default() }).unwrap();
    let out = scratch("keep-bytes");
    rewrite::rewrite(&m, &p, &opts(Format::Q4, 32), &out, &mut NoProgress).unwrap();
    let r = Model::load(&out).unwrap();
    let replaced: Vec<&str> = p.targets.iter().map(|t| t.weight.as_str()).collect();
    for t in &m.graph().initializer {
        match r.initializer(t.name()) {
            Some(t2) => {
                assert_eq!(m.tensor_bytes(t).unwrap(), r.tensor_bytes(t2).unwrap(), "{} changed", t.name());
                assert_eq!(t.dims, t2.dims);
            }
            None => assert!(replaced.contains(&t.name()), "{} vanished", t.name()),
        }
    }
    // The LongRoPE If node keeps both branches with their cos/sin caches.
    let find_if = |m: &Model| -> NodeProto { m.graph().node.iter().find(|n| n.op_type() == "If").unwrap().clone() };
    assert_eq!(find_if(&m), find_if(&r));
    // Nodes that were not rewritten are unchanged and keep their order.
    let keep = |m: &Model| -> Vec<NodeProto> {
        m.graph()
            .node
            .iter()
            .filter(|n| n.op_type() != "MatMul" && n.op_type() != "QinsMatMul" && n.op_type() != "Concat")
            .cloned()
            .collect()
    };
    assert_eq!(keep(&m), keep(&r));
    assert_eq!(m.proto.metadata_props, r.proto.metadata_props);
    assert_eq!(m.proto.ir_version, r.proto.ir_version);
}

#[test]
fn written_codes_decode_to_what_the_codec_encodes() {
    let src = fixture("llama-gqa-tiny-fp32-cpu");
    let m = Model::load(&src).unwrap();
    let p = plan::plan(&m, &PlanOptions::default()).unwrap();
    for (format, group) in [(Format::Q8, 0), (Format::Q6, 32), (Format::Q4, 48), (Format::F32, 0)] {
        let out = scratch(&format!("decode-{format}"));
        let report = rewrite::rewrite(&m, &p, &opts(format, group), &out, &mut NoProgress).unwrap();
        let r = Model::load(&out).unwrap();
        let mut scr = qins::codec::Scratch::new();
        for (t, layer) in p.targets.iter().zip(&report.layers) {
            let base = rewrite::encoded_base(t);
            let codes = r.initializer(&format!("{base}.qins_codes")).unwrap();
            let scales = r.initializer(&format!("{base}.qins_scales")).unwrap();
            let layout = Layout::new(format, t.k, t.n(), group);
            assert_eq!(codes.dims, layout.codes_shape().to_vec());
            assert_eq!(scales.dims, layout.scales_shape().to_vec());
            assert_eq!(scales.data_type(), if format == Format::F32 { dtype::FLOAT } else { dtype::FLOAT16 });
            let sb = r.tensor_bytes(scales).unwrap();
            let scales: Vec<f32> = if format == Format::F32 {
                sb.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            } else {
                sb.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            };
            let enc = Encoded { layout, codes: r.tensor_bytes(codes).unwrap().into_owned(), scales };
            let decoded = enc.decode_kn();
            let w = m.tensor_bytes(m.initializer(&t.weight).unwrap()).unwrap();
            let orig = match &t.swiglu {
                // The fused weight: check the staging against the two originals here too.
                Some(s) => {
                    let staged = rewrite::staged_source(&m, t, &mut scr).unwrap().to_dense_bytes();
                    let uw = m.tensor_bytes(m.initializer(&s.up_weight).unwrap()).unwrap();
                    let f = |b: &[u8], i: usize| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
                    let i = t.cols.len();
                    for kk in [0, t.k - 1] {
                        for j in [0, 9, i - 1] {
                            assert_eq!(f(&staged, kk * 2 * i + qins::codec::swiglu_row(j, false)), f(&w, kk * i + j));
                            assert_eq!(f(&staged, kk * 2 * i + qins::codec::swiglu_row(j, true)), f(&uw, kk * i + j));
                        }
                    }
                    staged
                }
                None => {
                    WeightSource::new(&w, Elem::F32, t.k, t.n_total).unwrap().columns(t.cols.clone()).to_dense_bytes()
                }
            };
            let orig: Vec<f32> = orig.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let see: f64 = decoded.iter().zip(&orig).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let sxx: f64 = orig.iter().map(|a| (*a as f64).powi(2)).sum();
            let rel = (see / sxx).sqrt();
            // The report measured exactly what the file holds.
            assert!(
                (rel - layer.stats.rel_fro).abs() <= 1e-6 * rel.max(1e-9),
                "{format} {}: {rel} vs {}",
                t.name,
                layer.stats.rel_fro
            );
            let bound = match format {
                Format::F32 => 1e-6,
                Format::Q8 => 0.01,
                Format::Q6 => 0.04,
                Format::Q4 => 0.15,
            };
            assert!(rel < bound, "{format} {}: relative error {rel}", t.name);
        }
    }
}

#[test]
fn refuses_bad_requests_with_clear_messages_and_writes_nothing() {
    let src = fixture("phi35-tiny-fp32-cpu");
    let m = Model::load(&src).unwrap();
    // Nothing matches.
    let none = PlanOptions { preset: Preset::None, ..Default::default() };
    let e = plan::plan(&m, &none).unwrap_err().to_string();
    assert!(e.contains("no MatMul node matched"), "{e}");
    // An empty plan allowed (a V-cache-only rewrite) without --kv-v leaves nothing to do: an
    // error that writes nothing.
    let p = plan::plan(&m, &PlanOptions { allow_empty: true, ..none }).unwrap();
    assert!(p.targets.is_empty());
    let out = scratch("refuse-nothing").join("o");
    let e = rewrite::rewrite(&m, &p, &opts(Format::Q8, 0), &out, &mut NoProgress).unwrap_err().to_string();
    assert!(e.contains("nothing to rewrite"), "{e}");
    assert!(!out.exists());
    // An already quantized model.
    let base = scratch("refuse");
    let q = base.join("q8");
    let p = plan::plan(&m, &PlanOptions::default()).unwrap();
    rewrite::rewrite(&m, &p, &opts(Format::Q8, 0), &q, &mut NoProgress).unwrap();
    let e = plan::plan(&Model::load(&q).unwrap(), &PlanOptions::default()).unwrap_err().to_string();
    assert!(e.contains("QinsMatMul"), "{e}");
    // Never over the input: neither its folder nor a parent of it.
    for bad in [src.clone(), src.parent().unwrap().to_path_buf()] {
        let e = rewrite::rewrite(&m, &p, &opts(Format::Q8, 0), &bad, &mut NoProgress).unwrap_err().to_string();
        assert!(e.contains("the input") && e.contains("write elsewhere"), "{e}");
    }
    // A non-empty output folder needs force.
    let e = rewrite::rewrite(&m, &p, &RewriteOptions { force: false, ..opts(Format::Q8, 0) }, &q, &mut NoProgress)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not empty"), "{e}");
    // A weight that cannot be encoded fails the whole rewrite and leaves no output behind.
    let poisoned = base.join("poisoned");
    std::fs::create_dir_all(&poisoned).unwrap();
    for f in ["model.onnx", "model.onnx.data", "genai_config.json"] {
        std::fs::copy(src.join(f), poisoned.join(f)).unwrap();
    }
    let pm = Model::load(&poisoned).unwrap();
    let w = pm.initializer("model.layers.1.mlp.down_proj.MatMul.weight").unwrap();
    let r = qins::onnx::external_ref(w).unwrap().unwrap();
    drop(pm);
    let mut data = std::fs::read(poisoned.join("model.onnx.data")).unwrap();
    data[r.offset as usize + 8..r.offset as usize + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(poisoned.join("model.onnx.data"), data).unwrap();
    let pm = Model::load(&poisoned).unwrap();
    let pp = plan::plan(&pm, &PlanOptions::default()).unwrap();
    let dest = base.join("never");
    let e = rewrite::rewrite(&pm, &pp, &opts(Format::Q8, 0), &dest, &mut NoProgress).unwrap_err();
    assert!(format!("{e:#}").contains("not finite"), "{e:#}");
    assert!(!dest.exists(), "a failed rewrite left its output");
    let leftovers: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left: {leftovers:?}");
}

#[test]
fn include_exclude_and_qkv_split_options() {
    let m = Model::load(&fixture("phi35-tiny-fp32-cpu")).unwrap();
    let excl = PlanOptions { exclude: vec![regex::Regex::new("mlp").unwrap()], ..Default::default() };
    let p = plan::plan(&m, &excl).unwrap();
    assert_eq!(p.targets.len(), 4, "only qkv (V) and o_proj of 2 layers remain");
    // Without its up projection a gate stays a plain QinsMatMul.
    let no_up = PlanOptions { exclude: vec![regex::Regex::new("up_proj").unwrap()], ..Default::default() };
    let p = plan::plan(&m, &no_up).unwrap();
    assert_eq!(p.targets.len(), 8);
    assert!(p.targets.iter().all(|t| t.swiglu.is_none()));
    let incl = PlanOptions {
        preset: Preset::None,
        include: vec![regex::Regex::new("lm_head").unwrap()],
        ..Default::default()
    };
    let p = plan::plan(&m, &incl).unwrap();
    assert_eq!(p.targets.len(), 1);
    assert_eq!(p.targets[0].n(), 512);
    let bad = PlanOptions { qkv_split: Some([10, 10, 10]), ..Default::default() };
    let e = plan::plan(&m, &bad).unwrap_err().to_string();
    assert!(e.contains("adds up to 30"), "{e}");
    let ok = PlanOptions { qkv_split: Some([32, 32, 32]), ..Default::default() };
    assert!(plan::plan(&m, &ok).unwrap().targets.iter().any(|t| t.cols == (64..96)));
}
