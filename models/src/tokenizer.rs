//! A Hugging Face `tokenizer.json` (and `tokenizer_config.json`) rebuilt from a GGUF
//! file's `tokenizer.ggml.*` metadata, for GPT-2 style byte-level BPE vocabularies.
//!
//! The pre-tokenizer must reproduce the one the model was trained with. GGUF names it in
//! `tokenizer.ggml.pre`; llama.cpp's `llama-vocab.cpp` maps each name to regexes, and the
//! ones accepted here have an exact Hugging Face equivalent:
//! - `gpt2`: the GPT-2 regex, i.e. `ByteLevel(use_regex = true)`;
//! - `smollm` (SmolLM/SmolLM2): llama.cpp splits every `\p{N}` first, then applies the
//!   GPT-2 regex; SmolLM2's original tokenizer.json says the same as
//!   `Sequence[Digits(individual_digits = true), ByteLevel(add_prefix_space = false, use_regex = true)]`.

use crate::gguf::Gguf;
use anyhow::{anyhow, bail, ensure, Result};
use serde_json::{json, Value};
use std::collections::HashMap;

/// llama.cpp token types.
const TOKEN_UNKNOWN: i64 = 2;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// What the GGUF says about its tokenizer, beyond the vocabulary itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TokenizerInfo {
    pub pre: String,
    pub vocab_size: usize,
    pub merges: usize,
    pub special_tokens: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// Ids whose text repeats an earlier token's; the BPE table keeps the first.
    pub duplicate_tokens: usize,
}

/// The built files: `tokenizer.json`, `tokenizer_config.json`, and what they hold.
pub struct BuiltTokenizer {
    pub tokenizer_json: Value,
    pub tokenizer_config: Value,
    pub info: TokenizerInfo,
    tokens: Vec<String>,
}

impl BuiltTokenizer {
    pub fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize)).map(String::as_str)
    }
}

fn pre_tokenizer(pre: &str) -> Result<Value> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    Ok(match pre {
        "gpt2" => byte_level,
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        other => bail!(
            "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported; this importer knows 'gpt2' and 'smollm'"
        ),
    })
}

fn optional_id(g: &Gguf, key: &str, n: usize) -> Result<Option<u32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let id = v.as_i64().ok_or_else(|| anyhow!("metadata '{key}' is not an integer"))?;
            ensure!(id >= 0 && (id as usize) < n, "metadata '{key}' is {id}, outside the vocabulary of {n}");
            Ok(Some(id as u32))
        }
    }
}

/// Builds the tokenizer from the GGUF metadata; fails on vocabularies it cannot represent.
pub fn build(g: &Gguf) -> Result<BuiltTokenizer> {
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        bail!("tokenizer model '{model}' (tokenizer.ggml.model) is not supported; only byte-level BPE ('gpt2') is");
    }
    // llama.cpp treats a missing name as its default, which is not GPT-2's regex; refuse
    // rather than guess.
    let pre = g.get_str("tokenizer.ggml.pre")?.to_string();
    let pre_tok = pre_tokenizer(&pre)?;
    let tokens: Vec<String> = g.get_str_array("tokenizer.ggml.tokens")?.into_iter().map(str::to_string).collect();
    let n = tokens.len();
    ensure!(n > 0, "tokenizer.ggml.tokens is empty");
    let types = match g.get("tokenizer.ggml.token_type") {
        Some(_) => g.get_int_array("tokenizer.ggml.token_type")?,
        None => vec![1; n],
    };
    ensure!(types.len() == n, "tokenizer.ggml.token_type has {} entries for {n} tokens", types.len());
    let merges = g.get_str_array("tokenizer.ggml.merges")?;

    let mut vocab = serde_json::Map::new();
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(n);
    let mut duplicates = 0;
    for (id, t) in tokens.iter().enumerate() {
        // A repeated text can only map to one id; keep the first.
        if seen.contains_key(t.as_str()) {
            duplicates += 1;
            continue;
        }
        seen.insert(t, id);
        vocab.insert(t.clone(), json!(id));
    }
    let mut merge_list = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let mut parts = m.split(' ');
        let (a, b) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => (a, b),
            _ => bail!("merge {i} ('{m}') is not two symbols separated by one space"),
        };
        for s in [a, b] {
            ensure!(seen.contains_key(s), "merge {i} ('{m}') uses '{s}', which is not in the vocabulary");
        }
        merge_list.push(Value::String(m.to_string()));
    }

    let mut added = Vec::new();
    for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        let special = match ty {
            TOKEN_CONTROL | TOKEN_UNKNOWN => true,
            TOKEN_USER_DEFINED => false,
            _ => continue,
        };
        added.push(json!({
            "id": id,
            "content": t,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": special,
        }));
    }

    let bos = optional_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos = optional_id(g, "tokenizer.ggml.eos_token_id", n)?;
    let pad = optional_id(g, "tokenizer.ggml.padding_token_id", n)?;
    let unk = optional_id(g, "tokenizer.ggml.unknown_token_id", n)?;
    // Hugging Face's byte-level tokenizers add nothing unless told to; so does this.
    let flag = |k: &str| g.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let add_bos = flag("tokenizer.ggml.add_bos_token");
    let add_eos = flag("tokenizer.ggml.add_eos_token");

    let post_processor = if add_bos || add_eos {
        let mut single = Vec::new();
        let mut specials = serde_json::Map::new();
        let mut special = |id: Option<u32>, what: &str| -> Result<Value> {
            let id = id.ok_or_else(|| anyhow!("the GGUF asks to add a {what} token but names none"))?;
            let t = &tokens[id as usize];
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
            Ok(json!({"SpecialToken": {"id": t, "type_id": 0}}))
        };
        if add_bos {
            single.push(special(bos, "BOS")?);
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        if add_eos {
            single.push(special(eos, "EOS")?);
        }
        let mut pair = single.clone();
        pair.extend(single.iter().map(|p| {
            let mut p = p.clone();
            if let Some(o) = p.as_object_mut().and_then(|o| o.values_mut().next()) {
                o["type_id"] = json!(1);
                if o["id"] == "A" {
                    o["id"] = json!("B");
                }
            }
            p
        }));
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };

    let tokenizer_json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tok,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merge_list,
        },
    });

    let name = |id: Option<u32>| id.map(|i| Value::String(tokens[i as usize].clone())).unwrap_or(Value::Null);
    let context = g
        .get("general.architecture")
        .and_then(|a| a.as_str())
        .and_then(|a| g.get(&format!("{a}.context_length")))
        .and_then(|v| v.as_i64());
    let mut config = json!({
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": false,
        "backend": "tokenizers",
        "bos_token": name(bos),
        "clean_up_tokenization_spaces": false,
        "eos_token": name(eos),
        "model_max_length": context,
        "pad_token": name(pad),
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": name(unk),
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        config["chat_template"] = json!(t);
    }

    let info = TokenizerInfo {
        pre,
        vocab_size: n,
        merges: merge_list_len(&tokenizer_json),
        special_tokens: added.len(),
        bos_token_id: bos,
        eos_token_id: eos,
        pad_token_id: pad,
        unk_token_id: unk,
        add_bos,
        add_eos,
        duplicate_tokens: duplicates,
    };
    Ok(BuiltTokenizer { tokenizer_json, tokenizer_config: config, info, tokens })
}

fn merge_list_len(t: &Value) -> usize {
    t["model"]["merges"].as_array().map_or(0, Vec::len)
}
