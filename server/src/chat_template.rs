//! Chat messages to a prompt: the checkpoint's Jinja chat template from
//! `tokenizer_config.json` (rendered with minijinja and Python string
//! methods, as transformers does), or ChatML when it has none.

use minijinja::{Environment, Error, ErrorKind, Value};
use std::path::Path;

pub struct ChatTemplate {
    env: Option<Environment<'static>>,
    bos: String,
    eos: String,
}

/// `{"role", "content"}` with the content as text.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

const NAME: &str = "chat";

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// A special token field of tokenizer_config.json: a string or
/// `{"content": …}`.
fn token_field(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    /// ChatML.
    pub fn chatml() -> Self {
        Self {
            env: None,
            bos: String::new(),
            eos: "<|im_end|>".into(),
        }
    }

    /// The template of `dir/tokenizer_config.json`, else ChatML. An
    /// unreadable or uncompilable template is an error naming the file.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(Self::chatml());
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let template = match cfg.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(Self::chatml()),
            Some(serde_json::Value::String(s)) => s.clone(),
            // a list of named templates: the default one
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| {
                    format!("{}: chat_template: no template in the list", path.display())
                })?
                .to_string(),
            Some(_) => return Err(format!("{}: chat_template: not a string", path.display())),
        };
        Self::from_source(
            template,
            token_field(cfg.get("bos_token")),
            token_field(cfg.get("eos_token")),
        )
        .map_err(|e| format!("{}: chat_template: {e}", path.display()))
    }

    pub fn from_source(template: String, bos: String, eos: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(NAME, template)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            env: Some(env),
            bos,
            eos,
        })
    }

    /// The prompt for `messages`; `extra`: the request's
    /// `chat_template_kwargs`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let Some(env) = &self.env else {
            let mut p = String::new();
            for m in messages {
                p.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            }
            if add_generation_prompt {
                p.push_str("<|im_start|>assistant\n");
            }
            return Ok(p);
        };
        let mut ctx = serde_json::Map::new();
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).map_err(|e| e.to_string())?,
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        ctx.insert("bos_token".into(), self.bos.clone().into());
        ctx.insert("eos_token".into(), self.eos.clone().into());
        let t = env.get_template(NAME).map_err(|e| e.to_string())?;
        t.render(Value::from_serialize(&ctx))
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen1.5-MoE-A2.7B-Chat's template (tokenizer_config.json).
    const QWEN15: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msgs(v: &[(&str, &str)]) -> Vec<ChatMessage> {
        v.iter()
            .map(|(r, c)| ChatMessage {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn qwen_template_and_chatml_fallback() {
        let t =
            ChatTemplate::from_source(QWEN15.into(), String::new(), "<|im_end|>".into()).unwrap();
        let none = serde_json::Map::new();
        let p = t.render(&msgs(&[("user", "Hi")]), true, &none).unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let m = msgs(&[("system", "S"), ("user", "Hi")]);
        let c = ChatTemplate::chatml().render(&m, true, &none).unwrap();
        assert_eq!(c, t.render(&m, true, &none).unwrap());
        // python string methods and raise_exception work
        let py = "{% if messages[0].content.startswith('x') %}{{ raise_exception('no x') }}{% endif %}{{ messages[0].content.strip() }}";
        let t = ChatTemplate::from_source(py.into(), String::new(), String::new()).unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", " a ")]), false, &none).unwrap(),
            "a"
        );
        let e = t
            .render(&msgs(&[("user", "xa")]), false, &none)
            .unwrap_err();
        assert!(e.contains("no x"), "{e}");
        // chat_template_kwargs reach the template
        let kw = "{% if enable_thinking is defined and not enable_thinking %}off{% endif %}";
        let t = ChatTemplate::from_source(kw.into(), String::new(), String::new()).unwrap();
        let mut extra = serde_json::Map::new();
        extra.insert("enable_thinking".into(), false.into());
        assert_eq!(t.render(&[], false, &extra).unwrap(), "off");
    }
}
