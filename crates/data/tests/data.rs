//! Reading training rows: every TRL format recognised, and rows that fit none named by file and
//! row.

use std::path::{Path, PathBuf};

use data::{Error, Example, read_rows};

fn scratch(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nibble-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p
}

#[test]
fn the_tiny_chat_data_is_conversational() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tiny-chat.jsonl");
    let rows = read_rows(&p, "text").expect("rows");
    assert_eq!(rows.len(), 240);
    assert!(rows.iter().all(|r| matches!(r, Example::Conversation { messages, .. } if messages.len() >= 2)));
}

#[test]
fn every_format_is_recognised() {
    let p = scratch(
        "formats.jsonl",
        r#"{"text": "plain"}
{"body": "custom text field"}
{"prompt": "2+2=", "completion": "4"}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "extra": 1}], "tools": [{"type": "function"}], "chat_template_kwargs": {"enable_thinking": false}}
{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}

"#,
    );
    let e = read_rows(&p, "text").expect_err("row 2 has no text field");
    assert!(e.to_string().contains("formats.jsonl: row 2: fits no dataset format"), "{e}");
    let only_custom = scratch("custom.jsonl", "{\"body\": \"custom\"}\n");
    assert_eq!(read_rows(&only_custom, "body").expect("custom")[0], Example::Text("custom".into()));
    let text = std::fs::read_to_string(&p).expect("read");
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"body\"")).collect();
    let p = scratch("formats2.jsonl", &kept.join("\n"));
    let rows = read_rows(&p, "text").expect("rows");
    assert_eq!(rows[0], Example::Text("plain".into()));
    assert_eq!(rows[1], Example::PromptCompletion { prompt: "2+2=".into(), completion: "4".into() });
    let Example::Conversation { messages, tools, kwargs } = &rows[2] else { panic!("{:?}", rows[2]) };
    assert_eq!(messages[1].extra.get("extra"), Some(&serde_json::json!(1)));
    assert!(tools.is_some() && kwargs.as_ref().is_some_and(|k| k.contains_key("enable_thinking")));
    assert!(matches!(rows[3], Example::ConversationalPromptCompletion { .. }));
}

#[test]
fn bad_rows_name_file_and_row() {
    let cases = [
        ("a.jsonl", "{\"text\": \"ok\"}\n{not json}\n", "a.jsonl: row 2: not valid JSON"),
        ("b.jsonl", "{\"prompt\": \"p\"}\n", "b.jsonl: row 1: `prompt` and `completion` come together"),
        ("c.jsonl", "{\"messages\": [{\"content\": \"no role\"}]}\n", "c.jsonl: row 1: `messages[0]`"),
        ("d.jsonl", "[1, 2]\n", "d.jsonl: row 1: a row must be a JSON object"),
        (
            "n.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"2+2\"}, {\"role\": \"assistant\", \"content\": 4}]}\n",
            "n.jsonl: row 1: `messages[1].content` must be a string or a list of content parts, found a number (4)",
        ),
        ("e.json", "{\"rows\": []}", "e.json: row 1: a .json data file must hold a list"),
        (
            "f.jsonl",
            "{\"prompt\": \"p\", \"completion\": [{\"role\": \"assistant\", \"content\": \"a\"}]}\n",
            "must both be strings",
        ),
    ];
    for (name, content, want) in cases {
        let e = read_rows(&scratch(name, content), "text").expect_err(name).to_string();
        assert!(e.contains(want), "{name}: {e}");
    }
    assert!(matches!(read_rows(&scratch("g.csv", "a,b"), "text"), Err(Error::UnsupportedFile { .. })));
    assert!(matches!(read_rows(Path::new("/nonexistent/x.jsonl"), "text"), Err(Error::Io { .. })));
}
