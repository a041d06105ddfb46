//! Tokenizer, chat template, incremental detokenizer and stop strings on the
//! default model's real tokenizer (from its GGUF), and Gemma 3's
//! SentencePiece-style one. The models must be present (`heterospec
//! fetch-model`, `heterospec fetch-model gemma3-270m`).

use std::path::PathBuf;
use std::sync::OnceLock;

use heterospec_router::{ChatMessage, FinishReason, IncrementalDecoder, OutputStream, StopCriteria, TextTokenizer};
use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tokenizer() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::env::var_os("HETEROSPEC_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(
            path.exists(),
            "{} is missing: run `heterospec fetch-model` first",
            path.display()
        );
        TextTokenizer::from_gguf_file(&path).expect("tokenizer loads")
    })
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/golden/smollm2_llamacpp.json")).unwrap())
        .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenization_matches_llama_cpp() {
    let g = golden();
    for case in g["tokenizations"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer().encode(text).unwrap(),
            ids(&case["token_ids"]),
            "text {text:?}"
        );
    }
    for case in g["cases"].as_array().unwrap() {
        let text = case["prompt"].as_str().unwrap();
        assert_eq!(
            tokenizer().encode(text).unwrap(),
            ids(&case["prompt_token_ids"]),
            "prompt {text:?}"
        );
    }
}

fn gemma() -> &'static TextTokenizer {
    static TOK: OnceLock<TextTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = repo_root().join("models/gemma-3-270m-q4_k_m.gguf");
        assert!(
            path.exists(),
            "{} is missing: run `heterospec fetch-model gemma3-270m` first",
            path.display()
        );
        TextTokenizer::from_gguf_file(&path).expect("tokenizer loads")
    })
}

#[test]
fn gemmas_tokenizer_and_family_template_match_llama_cpp() {
    let g: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_root().join("tests/golden/gemma3_llamacpp.json")).unwrap())
            .unwrap();
    let tok = gemma();
    for case in g["tokenizations"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // llama.cpp was asked without BOS; ours adds the file's BOS first.
        let ours = tok.encode(text).unwrap();
        assert_eq!(ours[0], 2, "BOS first");
        assert_eq!(&ours[1..], ids(&case["token_ids"]), "text {text:?}");
        let decoded = tok.decode(&ours).unwrap();
        if !text.contains("<start_of_turn>") {
            assert_eq!(decoded, text, "decoding {text:?}");
        }
    }
    for case in g["cases"].as_array().unwrap() {
        let text = case["prompt"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["prompt_token_ids"]),
            "prompt {text:?}"
        );
    }
    // The GGUF has no template: Gemma's turns, as the golden prompts write them.
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")])
        .unwrap();
    assert_eq!(text, g["cases"][0]["prompt"].as_str().unwrap());
    // System messages before and between turns, as llama.cpp's built-in
    // Gemma template renders them.
    let chat: Vec<ChatMessage> = g["chat"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tok.apply_chat_template(&chat).unwrap(),
        g["chat"]["text"].as_str().unwrap()
    );
    let end_of_turn = tok.inner().token_to_id("<end_of_turn>").unwrap();
    assert!(tok.eos_token_ids().contains(&end_of_turn) && tok.eos_token_ids().contains(&1));
    // Pieces stream whole characters; `▁` reads as a space.
    let ids = tok.encode("naïve café 東京").unwrap();
    let mut dec = IncrementalDecoder::new();
    let mut streamed: String = ids.iter().map(|&id| dec.push(tok, id).unwrap()).collect();
    streamed.push_str(&dec.flush(tok).unwrap());
    assert_eq!(streamed, "naïve café 東京");
}

#[test]
fn chat_template_renders_the_model_format() {
    let text = tokenizer()
        .apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")])
        .unwrap();
    // The first golden prompt was written out by hand in this format.
    assert_eq!(text, golden()["cases"][0]["prompt"].as_str().unwrap());
    let with_system = tokenizer()
        .apply_chat_template(&[ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "hi")])
        .unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn im_end_and_endoftext_end_generation() {
    // As llama.cpp's end-of-generation tokens for this vocabulary.
    for name in ["<|im_end|>", "<|endoftext|>"] {
        let id = tokenizer().inner().token_to_id(name).unwrap();
        assert!(tokenizer().eos_token_ids().contains(&id), "{name}");
    }
}

/// Streams `ids` through the incremental decoder one at a time.
fn stream(ids: &[u32]) -> Vec<String> {
    let mut dec = IncrementalDecoder::new();
    let mut out: Vec<String> = ids.iter().map(|&id| dec.push(tokenizer(), id).unwrap()).collect();
    out.push(dec.flush(tokenizer()).unwrap());
    out
}

#[test]
fn incremental_detokenizer_never_splits_characters_and_matches_full_decode() {
    for text in [
        "héllo wörld — naïve café",
        "日本語のテキストと中文",
        "emoji: 🎉🚀👍🏽 done",
        "plain ascii text, with punctuation!",
    ] {
        let ids = tokenizer().encode(text).unwrap();
        let deltas = stream(&ids);
        for d in &deltas {
            assert!(
                !d.contains('\u{FFFD}'),
                "{text:?}: delta {d:?} holds a broken character"
            );
        }
        assert_eq!(deltas.concat(), tokenizer().decode(&ids).unwrap());
        assert_eq!(deltas.concat(), text);
    }
    // A multi-byte character split over byte tokens really is held back.
    let ids = tokenizer().encode("🎉").unwrap();
    assert!(ids.len() > 1, "the emoji is several byte-level tokens");
    let deltas = stream(&ids);
    assert!(deltas[0].is_empty());
    assert_eq!(deltas.concat(), "🎉");
}

fn run_output(text_ids: &[u32], criteria: StopCriteria) -> (String, FinishReason, usize) {
    let mut out = OutputStream::new(criteria);
    let mut text = String::new();
    let mut used = 0;
    for &id in text_ids {
        used += 1;
        let d = out.push(tokenizer(), id).unwrap();
        text.push_str(&d.text);
        if let Some(reason) = d.finish_reason {
            return (text, reason, used);
        }
    }
    let d = out.finish(tokenizer(), FinishReason::Cancelled).unwrap();
    text.push_str(&d.text);
    (text, d.finish_reason.unwrap(), used)
}

#[test]
fn stop_strings_cut_exactly_even_across_tokens() {
    let ids = tokenizer().encode("The answer is 42. Next question: why?").unwrap();
    // "answer is" spans several tokens; the output ends right before it.
    let criteria = StopCriteria {
        max_new_tokens: 100,
        stop: vec!["swer is".into()],
        ignore_eos: false,
    };
    let (text, reason, _) = run_output(&ids, criteria);
    assert_eq!((text.as_str(), reason), ("The an", FinishReason::Stop));

    let criteria = StopCriteria {
        max_new_tokens: 100,
        stop: vec!["Next".into(), "42".into()],
        ignore_eos: false,
    };
    let (text, reason, used) = run_output(&ids, criteria);
    assert_eq!((text.as_str(), reason), ("The answer is ", FinishReason::Stop));
    assert!(used < ids.len());

    // Text that only starts like a stop string is released at the end.
    let criteria = StopCriteria {
        max_new_tokens: 100,
        stop: vec!["why?!".into()],
        ignore_eos: false,
    };
    let (text, reason, _) = run_output(&ids, criteria);
    assert_eq!(
        (text.as_str(), reason),
        ("The answer is 42. Next question: why?", FinishReason::Cancelled)
    );
}

#[test]
fn length_and_eos_finish_the_stream() {
    let ids = tokenizer().encode("one two three four five").unwrap();
    let criteria = StopCriteria {
        max_new_tokens: 2,
        stop: vec![],
        ignore_eos: false,
    };
    let (text, reason, used) = run_output(&ids, criteria);
    assert_eq!((reason, used), (FinishReason::Length, 2));
    assert_eq!(text, tokenizer().decode(&ids[..2]).unwrap());

    let eos = tokenizer().eos_token_ids()[0];
    let with_eos = [ids[0], eos, ids[1]];
    let criteria = StopCriteria {
        max_new_tokens: 10,
        stop: vec![],
        ignore_eos: false,
    };
    let (text, reason, used) = run_output(&with_eos, criteria.clone());
    assert_eq!((text.as_str(), reason, used), ("one", FinishReason::Eos, 2));
    let (_, reason, used) = run_output(
        &with_eos,
        StopCriteria {
            ignore_eos: true,
            ..criteria
        },
    );
    assert_eq!((reason, used), (FinishReason::Cancelled, 3));
}

#[test]
fn token_bytes_concatenate_to_the_text_even_inside_a_character() {
    let tok = tokenizer();
    for text in ["Hello, world! 123", "naïve café — 東京 🚀", "  two  spaces\n\ttab"] {
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), tok.decode(&ids).unwrap(), "{text:?}");
    }
    // A token that is part of a character holds the raw bytes, not U+FFFD.
    let ids = tok.encode("🚀").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    assert!(ids.iter().all(|&id| !tok.token_bytes(id).is_empty()));
    assert_ne!(tok.token_bytes(ids[0]), "\u{fffd}".as_bytes());
    // A special token reads as its text.
    let eos = tok.eos_token_ids()[0];
    assert!(String::from_utf8(tok.token_bytes(eos)).unwrap().starts_with("<|"));
}
