//! Our `X-Twilio-Signature` check against Twilio's own helper library (PyPI
//! `twilio`, `RequestValidator`), run from a test-only virtualenv created by
//! `scripts/twilio-venv.sh`, for random URLs and parameters (unicode included).

use std::io::Write;
use std::process::{Command, Stdio};

use callmeback_tests::twilio_sim::twilio_helper_python;
use rand::Rng;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};
use voice_pod::twilio::signature::{Algorithm, compute_signature, validate};

/// Asks Twilio's library to sign each case and to validate each (possibly
/// tampered) signature.
const PY: &str = r#"
import json, sys
from twilio.request_validator import RequestValidator

class Multi(dict):
    def getall(self, k):
        return self[k]

out = []
for case in json.load(sys.stdin):
    v = RequestValidator(case["token"])
    def multi(pairs):
        m = Multi()
        for k, val in pairs:
            m.setdefault(k, []).append(val)
        return m
    alg = case.get("algorithm")
    sig = v.compute_signature(case["url"], multi(case["params"]), alg)
    ok = v.validate(case["check_url"], multi(case["check_params"]), case["check_sig"], alg)
    out.append({"signature": sig, "valid": ok})
json.dump(out, sys.stdout)
"#;

fn random_text(rng: &mut impl Rng, max: usize) -> String {
    let alphabet: Vec<char> = "abcXYZ019 +-_.&=?/%#:;,'\"<>éüßøñ日本語🙂😀€\u{2028}"
        .chars()
        .collect();
    let n = rng.random_range(0..=max);
    (0..n).map(|_| *alphabet.choose(rng).unwrap()).collect()
}

fn random_url(rng: &mut impl Rng) -> String {
    let scheme = ["https", "http"].choose(rng).unwrap();
    let host = [
        "pod.example.com",
        "voice.callmeback.dev",
        "xn--bcher-kva.example",
        "127.0.0.1",
    ]
    .choose(rng)
    .unwrap();
    let port = [None, Some(443), Some(8443), Some(80)].choose(rng).unwrap();
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let path: String = ["/twilio/voice", "/twilio/status", "/a/b%20c", "/ünï/路径"]
        .choose(rng)
        .unwrap()
        .to_string();
    let query = if rng.random_bool(0.5) {
        format!(
            "?persona=date-rescuer&call_id={}&sig=abc_-{}",
            rng.random::<u32>(),
            rng.random::<u16>()
        )
    } else {
        String::new()
    };
    format!("{scheme}://{host}{port}{path}{query}")
}

fn tamper(rng: &mut impl Rng, case: &mut Value) {
    match rng.random_range(0..3) {
        0 => {
            let url = case["check_url"].as_str().unwrap().to_string() + "x";
            case["check_url"] = json!(url);
        }
        1 => {
            let sig = case["check_sig"].as_str().unwrap();
            let mut chars: Vec<char> = sig.chars().collect();
            chars[3] = if chars[3] == 'A' { 'B' } else { 'A' };
            case["check_sig"] = json!(chars.into_iter().collect::<String>());
        }
        _ => {
            let params = case["check_params"].as_array_mut().unwrap();
            params.push(json!(["Injected", "1"]));
        }
    }
}

#[test]
fn signatures_agree_with_twilios_helper_library_for_random_requests() {
    // Proves compute + validate agree with twilio-python on 300 random requests, valid and tampered.
    let python = twilio_helper_python();
    let mut rng = rand::rng();
    let mut cases = Vec::new();
    for i in 0..300 {
        let url = random_url(&mut rng);
        let n = rng.random_range(0..8);
        let mut params: Vec<(String, String)> = (0..n)
            .map(|_| {
                (
                    ["CallSid", "From", "To", "Digits", "Body", "ÜnicodeKey", "k"]
                        .choose(&mut rng)
                        .unwrap()
                        .to_string(),
                    random_text(&mut rng, 40),
                )
            })
            .collect();
        if rng.random_bool(0.2) {
            // A repeated name with two values.
            params.push(("StatusCallbackEvent".into(), "ringing".into()));
            params.push(("StatusCallbackEvent".into(), "answered".into()));
        }
        let token = format!("token-{}", random_text(&mut rng, 12));
        let algorithm = if i % 5 == 0 {
            Algorithm::HmacSha256
        } else {
            Algorithm::HmacSha1
        };
        let ours = compute_signature(token.as_bytes(), &url, &params, algorithm);
        let mut case = json!({
            "token": token,
            "url": url,
            "params": params,
            "check_params": params,
            "algorithm": if algorithm == Algorithm::HmacSha256 { "HMAC_SHA256" } else { "HMAC_SHA1" },
            "check_url": url,
            "check_sig": ours,
            "ours": ours,
            "tampered": false,
        });
        if i % 2 == 1 {
            tamper(&mut rng, &mut case);
            case["tampered"] = json!(true);
        }
        cases.push(case);
    }
    let mut child = Command::new(&python)
        .arg("-c")
        .arg(PY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the twilio venv python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&cases).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python failed");
    let theirs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), cases.len());
    let (mut valid, mut invalid) = (0, 0);
    for (case, t) in cases.iter().zip(&theirs) {
        assert_eq!(case["ours"], t["signature"], "signature differs for {case}");
        let params: Vec<(String, String)> =
            serde_json::from_value(case["check_params"].clone()).unwrap();
        let alg = if case["algorithm"] == "HMAC_SHA256" {
            Algorithm::HmacSha256
        } else {
            Algorithm::HmacSha1
        };
        let ours_valid = validate(
            case["token"].as_str().unwrap().as_bytes(),
            case["check_url"].as_str().unwrap(),
            &params,
            case["check_sig"].as_str().unwrap(),
            alg,
        );
        assert_eq!(
            ours_valid,
            t["valid"].as_bool().unwrap(),
            "validation differs for {case}"
        );
        assert_eq!(ours_valid, !case["tampered"].as_bool().unwrap(), "{case}");
        if ours_valid { valid += 1 } else { invalid += 1 }
    }
    assert!(
        valid >= 100 && invalid >= 100,
        "valid {valid}, invalid {invalid}"
    );
}

#[test]
fn published_example_vectors_match() {
    // Proves the documented example (docs and twilio-python's own test suite) verifies.
    let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
    let docs = [
        ("CallSid", "CA1234567890ABCDE"),
        ("Caller", "+12349013030"),
        ("Digits", "1234"),
        ("From", "+12349013030"),
        ("To", "+18005551212"),
    ];
    let params: Vec<(String, String)> = docs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        compute_signature(b"12345", url, &params, Algorithm::HmacSha1),
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    );
    assert!(validate(
        b"12345",
        url,
        &params,
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ=",
        Algorithm::HmacSha1
    ));
    assert!(!validate(
        b"12346",
        url,
        &params,
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ=",
        Algorithm::HmacSha1
    ));
}
