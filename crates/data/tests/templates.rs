//! Chat templates of several real-world styles (ChatML, Zephyr, Llama-3, Mistral with
//! raise_exception and tools, a `{% generation %}` template) render exactly what transformers
//! renders: golden data from scripts/golden_templates.py.

use data::template::ChatTemplate;

#[test]
fn templates_render_like_transformers() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("golden/templates.json")).expect("golden JSON");
    let cases = golden["cases"].as_array().expect("cases");
    assert!(cases.len() >= 60);
    let mut checked = 0;
    for case in cases {
        let name = case["template"].as_str().expect("name");
        let source = golden["templates"][name].as_str().expect("template");
        let label = format!(
            "{name}/{}/gen={}/tools={}",
            case["conversation"],
            case["context"]["add_generation_prompt"],
            case["context"].get("tools").is_some()
        );
        let t = ChatTemplate::new(source).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(t.has_generation(), name == "generation", "{label}");
        let got = t.render(&case["context"]);
        match case.get("error").and_then(|e| e.as_str()) {
            Some(msg) => {
                let e = got.expect_err(&label).to_string();
                assert!(e.contains(msg), "{label}: transformers raised `{msg}`, nibble: {e}");
            }
            None => {
                let r = got.unwrap_or_else(|e| panic!("{label}: {e}"));
                let want = case["rendered"].as_str().expect("rendered");
                assert_eq!(r.text, want, "{label}");
                // transformers gives character offsets; compare the text they cover.
                let chars: Vec<char> = want.chars().collect();
                let want_spans: Vec<String> = case["generation"]
                    .as_array()
                    .expect("spans")
                    .iter()
                    .map(|p| {
                        let (a, b) = (p[0].as_u64().expect("a") as usize, p[1].as_u64().expect("b") as usize);
                        chars[a..b].iter().collect()
                    })
                    .collect();
                let got_spans: Vec<String> =
                    r.assistant_spans.iter().map(|s| r.text[s.clone()].to_owned()).collect();
                assert_eq!(got_spans, want_spans, "{label}");
            }
        }
        checked += 1;
    }
    assert_eq!(checked, cases.len());
}
