//! The model's own chat template and stop tokens, as Hugging Face tokenizers and
//! onnxruntime-genai define them: `chat_template` (Jinja) in `tokenizer_config.json`,
//! `eos_token_id` in `genai_config.json`.

use anyhow::{anyhow, bail, Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};
use serde_json::Value;
use std::path::Path;

/// A model's chat template with the special tokens it refers to.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// `tokenizer_config.json` of a model folder (bounded, inside the folder), if it has one.
fn tokenizer_config(model: &Path) -> Result<Option<Value>> {
    let (folder, _) = qins::onnx::resolve_model_path(model)?;
    let Some(text) = folder.read_optional("tokenizer_config.json", qins::files::MAX_CONFIG_BYTES)? else {
        return Ok(None);
    };
    serde_json::from_slice(&text).map(Some).context("tokenizer_config.json")
}

/// A special token as the config writes it: a string, or `{"content": "..."}`.
fn token_text(v: &Value) -> Option<String> {
    v.as_str().or_else(|| v["content"].as_str()).map(str::to_owned)
}

impl ChatTemplate {
    /// The template of the model folder (or of the folder of a `.onnx` file). A config may hold
    /// one template, or a list of named ones (the one named `default` is used).
    pub fn load(model: &Path) -> Result<ChatTemplate> {
        let cfg = tokenizer_config(model)?.ok_or_else(|| {
            anyhow!("--chat: the model folder has no tokenizer_config.json (where the chat template is); drop --chat")
        })?;
        let source = match &cfg["chat_template"] {
            Value::String(s) => s.clone(),
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .ok_or_else(|| anyhow!("tokenizer_config.json: chat_template lists no template named 'default'"))?
                .to_owned(),
            Value::Null => bail!("--chat: tokenizer_config.json has no chat_template; drop --chat"),
            _ => bail!("tokenizer_config.json: chat_template is neither a string nor a list of templates"),
        };
        let special = |k: &str| token_text(&cfg[k]).unwrap_or_default();
        Ok(ChatTemplate { source, bos_token: special("bos_token"), eos_token: special("eos_token") })
    }

    /// The text of one user turn (after an optional system turn), ending where the
    /// assistant's answer begins.
    pub fn render(&self, user: &str, system: Option<&str>) -> Result<String> {
        let mut env = Environment::new();
        // Templates call Python string methods (`.strip()`, `.startswith()`) and
        // `raise_exception` (to refuse message orders they do not support).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source).map_err(|e| anyhow!("the model's chat template does not parse: {e}"))?;
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(context! { role => "system", content => s });
        }
        messages.push(context! { role => "user", content => user });
        let tmpl = env.get_template("chat").expect("added above");
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| anyhow!("the model's chat template failed: {e:#}"))
    }
}

/// The tokens that end a generation: `eos_token_id` of `genai_config.json` (a number or a
/// list) and the `eos_token` of `tokenizer_config.json`; where a model has neither, the end
/// tokens of the common templates that its vocabulary holds.
pub fn stop_tokens(model: &Path, tok: &tokenizers::Tokenizer) -> Result<Vec<i64>> {
    let (folder, _) = qins::onnx::resolve_model_path(model)?;
    let mut stop = Vec::new();
    if let Some(text) = folder.read_optional("genai_config.json", qins::files::MAX_CONFIG_BYTES)? {
        let v: Value = serde_json::from_slice(&text).context("genai_config.json")?;
        match &v["model"]["eos_token_id"] {
            Value::Number(n) => stop.extend(n.as_i64()),
            Value::Array(a) => stop.extend(a.iter().filter_map(Value::as_i64)),
            _ => {}
        }
    }
    if let Some(cfg) = tokenizer_config(model)? {
        if let Some(id) = token_text(&cfg["eos_token"]).and_then(|t| tok.token_to_id(&t)) {
            stop.push(id as i64);
        }
    }
    if stop.is_empty() {
        stop = ["<|im_end|>", "<|endoftext|>", "</s>", "<|end|>", "<|eot_id|>"]
            .iter()
            .filter_map(|t| tok.token_to_id(t).map(|i| i as i64))
            .collect();
    }
    stop.sort_unstable();
    stop.dedup();
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate { source: source.into(), bos_token: "<s>".into(), eos_token: "</s>".into() }
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = template(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        );
        let got = t.render(" Hi ", Some("Be brief.")).unwrap();
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_special_tokens() {
        let t = template(
            "{{ bos_token }}{% for m in messages %}[{{ m.content.strip().upper() }}]{% endfor %}{{ eos_token }}",
        );
        assert_eq!(t.render("  hello ", None).unwrap(), "<s>[HELLO]</s>");
    }

    #[test]
    fn a_template_that_raises_is_an_error() {
        let t = template("{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}");
        let e = t.render("x", None).unwrap_err().to_string();
        assert!(e.contains("system first"), "{e}");
        assert!(template("{% for %}").render("x", None).is_err());
    }
}
