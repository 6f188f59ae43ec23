//! What the V-row format does to real V rows: SmolLM2's V cache after a Wikipedia passage,
//! every row of every layer encoded with QINS q8 and q4 (the cache's scale search, and the
//! absmax scale alone for comparison) and with a uniform int8 row at the same bytes
//! (absmax / 127, an f32 scale). Prints a table and writes JSON.
//!
//!     cargo run --release -p qins-graph-rewrite --example kv_rows -- MODEL_DIR TEXT.json OUT.json [TOKENS]
//!
//! The text is the last articles of the summaries file (not the ones `qins parity` scores).

use anyhow::{Context, Result};
use qins::codec::kv::{decode_v_row, encode_v_row, encode_v_row_at, uniform_int8_row, v_row_bytes};
use qins::codec::Format;
use qins_graph_rewrite::engine::{load_tokenizer, CausalLm, EngineOptions};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() >= 4, "usage: kv_rows MODEL_DIR TEXT.json OUT.json [TOKENS]");
    let (model, text, out) = (std::path::Path::new(&args[1]), &args[2], &args[3]);
    let tokens: usize = args.get(4).map(|t| t.parse()).transpose()?.unwrap_or(1024);
    let text = qins_graph_rewrite::parity::read_text(text.as_ref())?;
    // The last ~tokens*8 characters: text the evaluation does not score.
    let start = text.char_indices().rev().nth(tokens * 8).map_or(0, |(i, _)| i);
    let tok = load_tokenizer(model)?;
    let enc = tok.encode(&text[start..], false).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids: Vec<i64> = enc.get_ids().iter().take(tokens).map(|&i| i as i64).collect();
    ensure_len(&ids, tokens)?;
    let opts = EngineOptions { threads: 2, ..Default::default() };
    let mut lm = CausalLm::open(model, &opts).context("open the model")?;
    let mut cache = lm.empty_cache()?;
    lm.extend(&mut cache, &ids, false)?;

    // Per method: sum of squared errors, of squared values, and per-row nMSE values.
    let methods =
        ["qins q8 (search)", "qins q8 (absmax)", "int8 row (absmax/127)", "qins q4 (search)", "qins q4 (absmax)"];
    let mut err = vec![0f64; methods.len()];
    let mut rows_better = 0usize;
    let (mut energy, mut rows) = (0f64, 0usize);
    for l in 0..lm.layers {
        let (shape, v) = cache.float_value(2 * l + 1)?;
        let hd = *shape.last().unwrap() as usize;
        let mut y = vec![0f32; hd];
        for x in v.chunks_exact(hd) {
            energy += x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            rows += 1;
            let absmax = x.iter().fold(0f32, |m, a| m.max(a.abs()));
            let mut row_errs = [0f64; 5];
            for (m, (format, search)) in
                [(Format::Q8, true), (Format::Q8, false), (Format::Q8, true), (Format::Q4, true), (Format::Q4, false)]
                    .into_iter()
                    .enumerate()
            {
                if m == 2 {
                    uniform_int8_row(x, &mut y);
                } else {
                    let mut row = vec![0u8; v_row_bytes(format, hd).unwrap()];
                    if search || absmax == 0.0 {
                        encode_v_row(format, x, &mut row);
                    } else {
                        encode_v_row_at(format, x, absmax, &mut row);
                    }
                    decode_v_row(format, &row, &mut y);
                }
                let e: f64 = x.iter().zip(&y).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                row_errs[m] = e;
                err[m] += e;
            }
            if row_errs[0] < row_errs[2] {
                rows_better += 1;
            }
        }
    }
    println!("{rows} V rows of {} layers after {} tokens", lm.layers, ids.len());
    println!("{:<24} {:>12} {:>10}", "method", "nMSE", "SNR dB");
    let mut json = serde_json::Map::new();
    for (m, name) in methods.iter().enumerate() {
        let nmse = err[m] / energy;
        println!("{:<24} {:>12.3e} {:>10.2}", name, nmse, -10.0 * nmse.log10());
        json.insert(name.to_string(), serde_json::json!({ "nmse": nmse }));
    }
    let frac = rows_better as f64 / rows as f64;
    println!("rows where qins q8 beats the int8 row: {:.1}%", 100.0 * frac);
    json.insert("rows".into(), rows.into());
    json.insert("tokens".into(), ids.len().into());
    json.insert("qins_q8_beats_int8_rows".into(), frac.into());
    std::fs::write(out, serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

fn ensure_len(ids: &[i64], want: usize) -> Result<()> {
    anyhow::ensure!(ids.len() == want, "only {} tokens of text, {want} asked", ids.len());
    Ok(())
}
