//! Property tests over arbitrary bytes (issue 11): the safetensors header reader, config.json
//! and the server's request-body parsing answer every input with a value or an error, never a
//! panic. Bounded cases so CI stays fast; no regression files are written.

use std::path::Path;

use memmap2::MmapMut;
use proptest::prelude::*;
use sgpt::model::config::BloomConfig;
use sgpt::model::weights::MappedFile;
use sgpt::server::api::{self, OpenAiRequest, TeiRequest};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn mapped(bytes: &[u8]) -> memmap2::Mmap {
    let mut m = MmapMut::map_anon(bytes.len().max(1)).unwrap();
    m[..bytes.len()].copy_from_slice(bytes);
    m.make_read_only().unwrap()
}

/// A header-length prefix followed by text that is often JSON-shaped, so the reader gets past
/// the length check and into the header's fields and offsets.
fn safetensors_like() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        any::<String>(),
        "\\{\"[a-z_.]{1,12}\": \\{\"dtype\": \"(F32|F16|BF16|I8|X)\", \"shape\": \\[[0-9, ]{0,12}\\], \"data_offsets\": \\[[0-9, ]{0,14}\\]\\}\\}",
    ];
    (
        header,
        prop::collection::vec(any::<u8>(), 0..256),
        any::<bool>(),
    )
        .prop_map(|(h, data, honest)| {
            let len = if honest {
                h.len() as u64
            } else {
                h.len() as u64 * 7 + 3
            };
            let mut v = len.to_le_bytes().to_vec();
            v.extend_from_slice(h.as_bytes());
            v.extend_from_slice(&data);
            v
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn safetensors_reader_never_panics_on_raw_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = MappedFile::from_mmap(Path::new("fuzz.safetensors"), mapped(&bytes));
    }

    #[test]
    fn safetensors_reader_never_panics_on_header_like_bytes(bytes in safetensors_like()) {
        if let Ok(f) = MappedFile::from_mmap(Path::new("fuzz.safetensors"), mapped(&bytes)) {
            // A file that opens has every tensor inside its data section.
            let ckpt = sgpt::model::weights::Checkpoint::from_file(Path::new("fuzz"), f);
            for n in ckpt.names() {
                if let Ok(t) = ckpt.get(n) {
                    let _ = t.count_non_finite();
                    let _ = t.to_f32();
                }
            }
        }
    }

    #[test]
    fn config_json_never_panics(text in any::<String>()) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let _ = BloomConfig::from_json(&v, Path::new("config.json"));
        }
    }

    #[test]
    fn config_json_with_bloom_keys_never_panics(
        h in prop::option::of(any::<i64>()), l in prop::option::of(any::<i64>()),
        n in prop::option::of(any::<i64>()), v in prop::option::of(any::<i64>()),
        eps in prop::option::of(any::<f64>()), post in any::<bool>(),
    ) {
        let j = serde_json::json!({
            "hidden_size": h, "n_layer": l, "n_head": n, "vocab_size": v,
            "layer_norm_epsilon": eps, "apply_residual_connection_post_layernorm": post,
        });
        if let Ok(c) = BloomConfig::from_json(&j, Path::new("config.json")) {
            prop_assert!(c.hidden % c.heads == 0 && c.layers > 0 && c.vocab > 0);
            prop_assert!(!post);
        }
    }

    #[test]
    fn request_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = api::parse_body::<OpenAiRequest>(&bytes);
        let _ = api::parse_body::<TeiRequest>(&bytes);
    }

    #[test]
    fn json_request_bodies_never_panic(
        input in prop_oneof![
            any::<String>().prop_map(serde_json::Value::from),
            prop::collection::vec(any::<String>(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::vec(any::<i64>(), 0..4).prop_map(serde_json::Value::from),
            Just(serde_json::Value::Null),
        ],
        dims in prop::option::of(any::<i64>()),
    ) {
        let body = serde_json::json!({"input": input, "inputs": input, "dimensions": dims}).to_string();
        if let Ok(r) = api::parse_body::<serde_json::Value>(body.as_bytes()) {
            let _ = api::texts(r["input"].clone(), "input", 32);
        }
        let _ = api::parse_body::<OpenAiRequest>(body.as_bytes());
        let _ = api::parse_body::<TeiRequest>(body.as_bytes());
        let _ = api::dimensions(dims, 64);
    }
}
