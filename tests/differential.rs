//! The differential API test: the request sequences of `tests/sdk/firecracker-answers.json`, each
//! sent to a fresh mote, and every answer checked against Firecracker 1.17's documented one
//! (status, `fault_message` or an empty body, Content-Type, headers, and the fault's text where
//! Firecracker's is fixed). A case where mote knowingly answers otherwise says why and what mote
//! answers instead; both are checked, so the table stays a true list of the differences.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::api::{read_answer, Answer, ApiMote};
use serde_json::Value;

const TABLE: &str = include_str!("sdk/firecracker-answers.json");

/// Replaces the table's placeholders in every string of `value`.
fn fill(value: &Value, places: &[(&str, String)]) -> Value {
    match value {
        Value::String(text) => {
            let mut text = text.clone();
            for (name, with) in places {
                text = text.replace(name, with);
            }
            Value::String(text)
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, places)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill(v, places)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// A body as sent: a JSON string is sent as it is (raw), anything else serialised.
fn body_text(body: &Value) -> String {
    match body {
        Value::String(raw) => raw.clone(),
        other => other.to_string(),
    }
}

/// Sends one request; no body means no Content-Length either.
fn send(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut stream = UnixStream::connect(socket).expect("connecting to the API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("setting a read timeout");
    let mut raw =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if let Some(body) = body {
        raw.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        raw.push_str("\r\n");
    }
    stream
        .write_all(raw.as_bytes())
        .expect("sending the request");
    read_answer(&mut stream)
}

fn header<'a>(answer: &'a Answer, name: &str) -> Option<&'a str> {
    answer.head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then_some(value.trim())
    })
}

/// True when every field of `want` is in `got` with the same value (objects compared by part).
fn json_contains(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Object(got), Value::Object(want)) => want
            .iter()
            .all(|(k, v)| got.get(k).is_some_and(|g| json_contains(g, v))),
        _ => got == want,
    }
}

/// Every way `answer` differs from `expected`, as lines.
fn differences(answer: &Answer, expected: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let status = expected["status"]
        .as_u64()
        .expect("a case without a status");
    if u64::from(answer.status) != status {
        out.push(format!("status {} instead of {status}", answer.status));
    }
    let json: Option<Value> = serde_json::from_str(&answer.body).ok();
    let fault = json
        .as_ref()
        .and_then(|j| j.get("fault_message"))
        .and_then(Value::as_str);
    match expected.get("fault").and_then(Value::as_bool) {
        Some(true) if fault.is_none() => out.push("no string fault_message".to_string()),
        Some(false) if fault.is_some() => out.push(format!("a fault_message: {fault:?}")),
        _ => {}
    }
    if let Some(text) = expected.get("fault_is").and_then(Value::as_str) {
        if fault != Some(text) {
            out.push(format!("fault_message {fault:?} instead of {text:?}"));
        }
    }
    if let Some(part) = expected.get("fault_has").and_then(Value::as_str) {
        if !fault.is_some_and(|f| f.contains(part)) {
            out.push(format!("fault_message {fault:?} lacks {part:?}"));
        }
    }
    if expected.get("empty").and_then(Value::as_bool) == Some(true) && !answer.body.is_empty() {
        out.push(format!("a body where none was expected: {:?}", answer.body));
    }
    if status == 200 && json.is_none() {
        out.push(format!("a 200 without a JSON body: {:?}", answer.body));
    }
    // micro_http writes it on every answer.
    if header(answer, "Connection") != Some("keep-alive") {
        out.push("no Connection: keep-alive".to_string());
    }
    if let Some(want) = expected.get("content_type") {
        let got = header(answer, "Content-Type");
        if got != want.as_str() {
            out.push(format!("Content-Type {got:?} instead of {want}"));
        }
    }
    if let Some(headers) = expected.get("headers").and_then(Value::as_object) {
        for (name, value) in headers {
            let got = header(answer, name);
            if got != value.as_str() {
                out.push(format!("header {name}: {got:?} instead of {value}"));
            }
        }
    }
    for name in expected
        .get("absent")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if let Some(got) = header(answer, name) {
            out.push(format!(
                "a {name} header ({got:?}) where Firecracker sends none"
            ));
        }
    }
    for key in expected
        .get("json_has")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if json.as_ref().and_then(|j| j.get(key)).is_none() {
            out.push(format!("no {key:?} in the body {:?}", answer.body));
        }
    }
    if let Some(want) = expected.get("json_is") {
        if !json.as_ref().is_some_and(|j| json_contains(j, want)) {
            out.push(format!("body {:?} does not hold {want}", answer.body));
        }
    }
    out
}

fn ok(mote: &ApiMote, method: &str, path: &str, body: &Value, context: &str) {
    let answer = send(&mote.socket, method, path, Some(&body_text(body)));
    assert!(
        (200..300).contains(&answer.status),
        "{context}: {method} {path} {body}: {answer:?}\nstderr:\n{}",
        mote.stderr()
    );
}

/// Brings a fresh monitor into the case's starting state.
fn prepare(mote: &ApiMote, state: &str, places: &[(&str, String)], name: &str) {
    if state == "fresh" {
        return;
    }
    // With a balloon, the probe drives it (its only device then, in slot 0): Firecracker
    // refuses to change an inactive balloon.
    let steps = if state == "booted_balloon" {
        "hello,balloon-init,spin"
    } else {
        "hello,spin"
    };
    let boot_source = serde_json::json!({
        "kernel_image_path": "{kernel}",
        "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off probe.run={steps}"),
    });
    ok(
        mote,
        "PUT",
        "/boot-source",
        &fill(&boot_source, places),
        name,
    );
    let machine = serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128});
    ok(mote, "PUT", "/machine-config", &machine, name);
    if state == "configured" {
        return;
    }
    assert!(
        state == "booted" || state == "booted_balloon",
        "{name}: unknown state {state:?}"
    );
    if state == "booted_balloon" {
        let balloon = serde_json::json!({
            "amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1,
        });
        ok(mote, "PUT", "/balloon", &balloon, name);
    } else {
        let drive = serde_json::json!({
            "drive_id": "rootfs", "path_on_host": "{disk}", "is_root_device": true,
            "is_read_only": false,
        });
        ok(mote, "PUT", "/drives/rootfs", &fill(&drive, places), name);
    }
    let start = serde_json::json!({"action_type": "InstanceStart"});
    ok(mote, "PUT", "/actions", &start, name);
    let ready = if state == "booted_balloon" {
        "probe: balloon-init"
    } else {
        "probe: hello"
    };
    mote.wait_for_stdout(ready, Duration::from_secs(20));
}

#[test]
fn every_endpoint_answers_as_firecracker_documents() {
    if !common::require_kvm() {
        return;
    }
    let table: Value = serde_json::from_str(TABLE).expect("tests/sdk/firecracker-answers.json");
    let cases = table["cases"].as_array().expect("a list of cases");
    let kernel = common::probe_kernel();
    let mut failures = Vec::new();
    let mut differing = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().expect("a case without a name");
        // A short name: the sockets in its directory must fit a Unix socket address.
        let mote = ApiMote::spawn(&format!("d{index}"), &[]);
        let disk = mote.dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("writing the scratch disk");
        let places = [
            ("{kernel}", kernel.display().to_string()),
            ("{disk}", disk.display().to_string()),
            ("{dir}", mote.dir.display().to_string()),
        ];
        prepare(
            &mote,
            case["state"].as_str().unwrap_or("fresh"),
            &places,
            name,
        );
        for step in case
            .get("setup")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let method = step[0].as_str().expect("a setup method");
            let path = step[1].as_str().expect("a setup path");
            ok(&mote, method, path, &fill(&step[2], &places), name);
        }
        let request = fill(&case["request"], &places);
        let method = request["method"].as_str().expect("a request method");
        let path = request["path"].as_str().expect("a request path");
        let body = request.get("body").map(body_text);
        let answer = send(&mote.socket, method, path, body.as_deref());
        let (expected, whose) = match case.get("mote") {
            Some(mote_answer) => {
                differing.push(format!(
                    "{name}: {}",
                    case["mote_differs"].as_str().unwrap_or("(no reason given)")
                ));
                (mote_answer, "mote's recorded difference")
            }
            None => (&case["firecracker"], "Firecracker"),
        };
        let found = differences(&answer, expected);
        if !found.is_empty() {
            failures.push(format!(
                "{name} ({method} {path}): not as {whose} answers: {}\n  answer: {}\n  {}",
                found.join("; "),
                answer.head.replace("\r\n", " | "),
                answer.body
            ));
        }
    }
    println!(
        "{} cases, {} known differences from Firecracker:\n  {}",
        cases.len(),
        differing.len(),
        differing.join("\n  ")
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
