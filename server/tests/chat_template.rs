//! The checkpoint's chat template rendered by our minijinja setup equals
//! what transformers' `apply_chat_template` rendered
//! (scripts/make_chat_expected.py), system-turn default, whitespace
//! control, `.strip()` and `chat_template_kwargs` included.

use candle_moe_server::chat_template::{ChatMessage, ChatTemplate};
use serde_json::Value;
use std::path::PathBuf;

#[test]
fn renders_like_transformers() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-qwen3-moe-chat");
    let t = ChatTemplate::load(&dir).unwrap();
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected_chat.json")).unwrap())
            .unwrap();
    let cases = exp["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for c in cases {
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect();
        let kwargs = c
            .get("kwargs")
            .and_then(|k| k.as_object())
            .cloned()
            .unwrap_or_default();
        let got = t
            .render(
                &msgs,
                c["add_generation_prompt"].as_bool().unwrap(),
                &kwargs,
            )
            .unwrap();
        assert_eq!(got, c["rendered"].as_str().unwrap());
    }
    // a template that does not compile names the file
    let bad = std::env::temp_dir().join(format!("candle-moe-bad-template-{}", std::process::id()));
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        bad.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for %}"}"#,
    )
    .unwrap();
    let e = ChatTemplate::load(&bad).err().unwrap();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat_template"),
        "{e}"
    );
    std::fs::remove_dir_all(&bad).unwrap();
}
