//! Chat formatting from a model folder's chat template (`chat_template.jinja`, or the
//! `chat_template` of tokenizer_config.json), rendered as HF's `apply_chat_template` does.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;
use vh_hub::HubError;

/// Instructions a chat template may execute: real templates need a few hundred per message.
pub const TEMPLATE_FUEL: u64 = 10_000_000;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

fn template_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Hub(HubError::Json {
        path: path.to_path_buf(),
        message: message.to_string(),
    })
}

/// A special token's text from tokenizer_config.json (a string or `{"content": ...}`).
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Renders `messages` with the folder's chat template; `add_generation_prompt` appends the
/// assistant turn's opening, as HF does. The result is tokenized without adding special tokens.
pub fn apply_chat_template(dir: impl AsRef<Path>, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
    let dir = dir.as_ref();
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.exists() {
        vh_hub::folder::read_json(&config_path)?
    } else {
        Value::Null
    };
    let jinja_path = dir.join("chat_template.jinja");
    let template = if jinja_path.exists() {
        vh_hub::files::read_text_capped(&jinja_path, vh_hub::files::MAX_TEMPLATE_BYTES)?
    } else {
        match config.get("chat_template") {
            Some(Value::String(t)) => t.clone(),
            // A list of named templates: HF uses the one named "default".
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string)
                .ok_or_else(|| template_error(&config_path, "no chat template named `default`"))?,
            _ => return Err(template_error(&jinja_path, "the model folder has no chat template")),
        }
    };
    let mut env = minijinja::Environment::new();
    // Templates come with downloaded models: a loop that never ends must end in an error.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template("chat", &template)
        .map_err(|e| template_error(&jinja_path, e))?;
    let context = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => special_token(&config, "bos_token").unwrap_or_default(),
        eos_token => special_token(&config, "eos_token").unwrap_or_default(),
    };
    env.get_template("chat")
        .and_then(|t| t.render(context))
        .map_err(|e| template_error(&jinja_path, e))
}
