//! Every refusal of `sgpt serve`, on both routes: the status, the JSON shape of the route's
//! convention (TEI `{"error", "error_type"}`, OpenAI `{"error": {"message", "type", "param",
//! "code"}}`), and a server that keeps answering afterwards.

mod server_support;

use serde_json::{json, Value};
use server_support::*;

const KEY: &str = "s3cret-key";

/// Checks status and shape; returns the message.
fn expect(r: &Resp, status: u16, openai: bool, needle: &str) -> String {
    assert_eq!(r.status, status, "body: {}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let msg = if openai {
        let e = &v["error"];
        assert!(e["type"].is_string() && e["code"].is_string(), "{v}");
        assert!(e.get("param").is_some(), "{v}");
        e["message"].as_str().expect("message").to_string()
    } else {
        assert!(v["error_type"].is_string(), "{v}");
        v["error"].as_str().expect("error").to_string()
    };
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    msg
}

fn both(
    s: &ServerProcess,
    tei: Value,
    openai: Value,
    key: Option<&str>,
    status: u16,
    needle: &str,
) {
    expect(&post(s.addr, "/embed", &tei, key), status, false, needle);
    expect(
        &post(s.addr, "/v1/embeddings", &openai, key),
        status,
        true,
        needle,
    );
}

#[test]
fn every_limit_answers_with_its_status() {
    let s = ServerProcess::start(&[
        "--api-key",
        KEY,
        "--max-client-batch-size",
        "4",
        "--payload-limit",
        "4096",
    ]);
    let k = Some(KEY);

    // 401: no key, a wrong key, another scheme; the probes stay open.
    both(
        &s,
        json!({"inputs": "a"}),
        json!({"input": "a"}),
        None,
        401,
        "API key",
    );
    both(
        &s,
        json!({"inputs": "a"}),
        json!({"input": "a"}),
        Some("nope"),
        401,
        "wrong API key",
    );
    let r = request(
        s.addr,
        "POST",
        "/embed",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Basic {KEY}")),
        ],
        br#"{"inputs": "a"}"#,
    )
    .unwrap();
    expect(&r, 401, false, "API key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(get(s.addr, "/health").status, 200);
    assert_eq!(get(s.addr, "/info").json()["api_key_required"], true);
    assert_eq!(
        post(s.addr, "/embed", &json!({"inputs": "a"}), k).status,
        200
    );

    // 400: not JSON, cut-off JSON, trailing garbage; no text at all, or an empty text.
    for (path, openai) in [("/embed", false), ("/v1/embeddings", true)] {
        for body in [
            &b"{\"inputs\": "[..],
            b"not json",
            b"{\"inputs\": \"a\", \"input\": \"a\"} x",
        ] {
            let r = request(
                s.addr,
                "POST",
                path,
                &[
                    ("Content-Type", "application/json"),
                    ("Authorization", &format!("Bearer {KEY}")),
                ],
                body,
            )
            .unwrap();
            expect(&r, 400, openai, "not valid JSON");
        }
    }
    both(
        &s,
        json!({"inputs": []}),
        json!({"input": []}),
        k,
        400,
        "empty list",
    );
    both(
        &s,
        json!({"inputs": ""}),
        json!({"input": ""}),
        k,
        400,
        "empty or only whitespace",
    );
    both(
        &s,
        json!({"inputs": ["a", " \t\n"]}),
        json!({"input": ["a", " \n"]}),
        k,
        400,
        "[1]",
    );

    // 413: more texts than --max-client-batch-size; a body over --payload-limit.
    let five = vec!["t"; 5];
    both(
        &s,
        json!({"inputs": five}),
        json!({"input": five}),
        k,
        413,
        "at most 4",
    );
    let big = "x".repeat(5000);
    both(
        &s,
        json!({"inputs": big}),
        json!({"input": big}),
        k,
        413,
        "larger than 4096 bytes",
    );

    // 415: a body not declared as JSON (curl -d without -H).
    for (path, openai) in [("/embed", false), ("/v1/embeddings", true)] {
        let r = request(
            s.addr,
            "POST",
            path,
            &[("Authorization", &format!("Bearer {KEY}"))],
            br#"{"inputs": "a", "input": "a"}"#,
        )
        .unwrap();
        expect(&r, 415, openai, "Content-Type: application/json");
    }

    // 422: JSON of the wrong shape or values the server cannot use.
    both(
        &s,
        json!({"inputs": 5}),
        json!({"input": 5}),
        k,
        422,
        "string or a list of strings",
    );
    both(&s, json!({}), json!({}), k, 422, "missing field");
    both(
        &s,
        json!({"inputs": [[1, 2]]}),
        json!({"input": [[1, 2]]}),
        k,
        422,
        "token-id inputs",
    );
    both(
        &s,
        json!({"inputs": [1, 2]}),
        json!({"input": [1, 2]}),
        k,
        422,
        "token-id inputs",
    );
    both(
        &s,
        json!({"inputs": ["a", null]}),
        json!({"input": ["a", {}]}),
        k,
        422,
        "[1]",
    );
    for d in [0, -3, 65] {
        both(
            &s,
            json!({"inputs": "a", "dimensions": d}),
            json!({"input": "a", "dimensions": d}),
            k,
            422,
            "between 1 and 64",
        );
    }
    both(
        &s,
        json!({"inputs": "a", "input_type": "passage"}),
        json!({"input": "a", "input_type": "passage"}),
        k,
        422,
        "unknown variant",
    );
    let r = post(
        s.addr,
        "/v1/embeddings",
        &json!({"input": "a", "encoding_format": "f16"}),
        k,
    );
    let msg = expect(&r, 422, true, "unknown variant");
    assert!(msg.contains("float") && msg.contains("base64"), "{msg}");
    assert_eq!(r.json()["error"]["param"], "encoding_format");
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": "a", "normalize": "yes"}),
        k,
    );
    expect(&r, 422, false, "normalize");
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": "a", "truncation_direction": "Left"}),
        k,
    );
    expect(&r, 422, false, "cuts long texts on the right");

    // Over-long text: cut by default (usage counts the kept tokens), 422 when asked not to.
    let long = "lorem ipsum dolor sit amet ".repeat(80);
    let r = post(s.addr, "/v1/embeddings", &json!({"input": long}), k);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 299);
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": long, "truncate": false}),
        k,
    );
    expect(&r, 422, false, "at most 297");

    // 404 and 405 as JSON too.
    let r = request(s.addr, "GET", "/v1/models/x", &[], b"").unwrap();
    expect(&r, 404, true, "no route");
    let r = request(s.addr, "GET", "/embed", &[], b"").unwrap();
    expect(&r, 405, false, "GET is not allowed");

    // Still serving, and every refusal was counted.
    assert_eq!(
        post(s.addr, "/embed", &json!({"inputs": "still here"}), k).status,
        200
    );
    for (route, status) in [
        ("/embed", 401),
        ("/v1/embeddings", 400),
        ("/embed", 413),
        ("/embed", 422),
    ] {
        let sample = format!("sgpt_requests_total{{route=\"{route}\",status=\"{status}\"}}");
        assert!(metric(s.addr, &sample) >= 1.0, "{sample} not counted");
    }
    assert!(!s.stderr().contains("panicked"), "{}", s.stderr());
}

#[test]
fn no_auto_truncate_refuses_long_texts() {
    let s = ServerProcess::start(&["--no-auto-truncate", "--default-input-type", "document"]);
    let long = "lorem ipsum dolor sit amet ".repeat(80);
    both(
        &s,
        json!({"inputs": long}),
        json!({"input": long}),
        None,
        422,
        "at most 297",
    );
    let r = post(
        s.addr,
        "/v1/embeddings",
        &json!({"input": ["short", long]}),
        None,
    );
    let v = r.json();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("text 1 has"),
        "{v}"
    );
    // /embed can still ask for the cut per request.
    let r = post(
        s.addr,
        "/embed",
        &json!({"inputs": long, "truncate": true}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let info = get(s.addr, "/info").json();
    assert_eq!(info["auto_truncate"], false);
    assert_eq!(info["default_input_type"], "document");
}

#[test]
fn bad_flags_are_refused_before_starting() {
    for (args, needle) in [
        (
            vec!["--max-client-batch-size", "0"],
            "--max-client-batch-size must be positive",
        ),
        (
            vec!["--max-concurrent-requests", "0"],
            "--max-concurrent-requests must be",
        ),
        (
            vec!["--payload-limit", "0"],
            "--payload-limit must be positive",
        ),
        (vec!["--api-key", " "], "API key must not be empty"),
        (vec!["--host", "not-an-ip"], "invalid value"),
        (
            vec!["--header-timeout-secs", "0"],
            "--header-timeout-secs must be positive",
        ),
        (
            vec!["--shutdown-timeout-secs", "0"],
            "--shutdown-timeout-secs must be positive",
        ),
        (vec!["--max-connections", "0"], "--max-connections must be"),
        (
            vec!["--max-body-bytes-in-flight", "1000"],
            "--max-body-bytes-in-flight must be between --payload-limit",
        ),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_sgpt"))
            .args(["serve", "--model"])
            .arg(root().join("models/sgpt-tiny"))
            .args(["--port", "0"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} started");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sgpt"))
        .args(["serve", "--model", "/nonexistent/model", "--port", "0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("model directory not found"));
}

/// Issue 11: a `Content-Length` of 99999999999 with a tiny body got no answer (the server
/// waited for the rest). Over --payload-limit it is 413 at once, the body unread.
#[test]
fn an_absurd_content_length_is_413_at_once() {
    let s = ServerProcess::start(&["--body-timeout-secs", "60"]);
    for (path, openai) in [("/embed", false), ("/v1/embeddings", true)] {
        let mut c = partial_post(s.addr, path, 99_999_999_999, br#"{"input": "a"}"#);
        let (raw, after) = read_until_closed(&mut c, std::time::Duration::from_secs(10))
            .expect("no answer to an absurd Content-Length");
        let r = parse_response(&raw).expect("an HTTP response");
        expect(&r, 413, openai, "larger than 2000000 bytes");
        assert!(after.as_secs() < 5, "answered after {after:?}");
    }
}

/// Issue 11: a client closing the connection mid-body was counted as a 400. It is counted in
/// sgpt_aborted_requests_total, not among the answered requests.
#[test]
fn aborted_uploads_are_counted_as_aborted() {
    let s = ServerProcess::start(&[]);
    for path in ["/embed", "/v1/embeddings", "/embed"] {
        let c = partial_post(s.addr, path, 100, br#"{"inputs": "cut"#);
        std::thread::sleep(std::time::Duration::from_millis(100));
        c.shutdown(std::net::Shutdown::Both).unwrap();
    }
    assert_eq!(wait_metric(s.addr, "sgpt_aborted_requests_total", 3.0), 3.0);
    let m = get(s.addr, "/metrics").text();
    for route in ["/embed", "/v1/embeddings"] {
        let sample = format!("sgpt_requests_total{{route=\"{route}\",status=\"400\"}}");
        assert_eq!(
            sample_of(&m, &sample),
            0.0,
            "{sample} counted an aborted upload"
        );
    }
    assert_eq!(
        post(s.addr, "/embed", &json!({"inputs": "still here"}), None).status,
        200
    );
}

/// OpenAI clients discover the model with GET /v1/models (was 404); `--host localhost` is
/// accepted (was refused while the docs' examples used it).
#[test]
fn models_route_and_localhost() {
    // --kind: embed's spelling of --default-input-type.
    let s = ServerProcess::start(&[
        "--host",
        "localhost",
        "--served-model-name",
        "sgpt-tiny-test",
        "--kind",
        "document",
    ]);
    let r = request(s.addr, "GET", "/v1/models", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "sgpt-tiny-test");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(s.addr.ip().is_loopback());
    let info = request(s.addr, "GET", "/info", &[], b"").unwrap().json();
    assert_eq!(info["default_input_type"], "document");
}
