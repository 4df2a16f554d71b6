//! Keeps `resources/openapi.yaml` in step with the code: every operation in the document is
//! routed and every route is in the document; each request schema accepts and refuses what the
//! server's JSON parser does (field names, required fields, types, null, enums, unknown
//! fields); and what a real `mote --api-sock` answers, before and after a probe boot, fits the
//! response schemas.

mod common;

use std::collections::BTreeSet;

use common::api::ApiMote;
use common::{probe_kernel, require_kvm};
use mote::api::routes::route;
use serde_json::{json, Map, Value};

const DOCUMENT: &str = include_str!("../resources/openapi.yaml");

/// Every operation src/api/routes.rs serves, as the document names it. A route added to the
/// code goes here and into the document.
const SERVED: [(&str, &str); 32] = [
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/vm/config"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
    ("PUT", "/cpu-config"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PATCH", "/balloon/hinting/start"),
    ("PATCH", "/balloon/hinting/stop"),
    ("GET", "/balloon/hinting/status"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("GET", "/mmds"),
    ("PUT", "/mmds"),
    ("PATCH", "/mmds"),
    ("PUT", "/mmds/config"),
];

/// Firecracker's other paths: mote must refuse them until they are implemented (and then
/// documented, and moved to SERVED).
const NOT_SERVED: [&str; 4] = [
    "/hotplug/memory",
    "/pmem/pm0",
    "/serial",
    "/vm/config/extra",
];

const METHODS: [&str; 5] = ["GET", "PUT", "PATCH", "POST", "DELETE"];

/// The ids the tests put in paths: the `example` of the body's id in the document.
const DRIVE_ID: &str = "rootfs";
const IFACE_ID: &str = "eth0";

fn document() -> Value {
    serde_norway::from_str(DOCUMENT).expect("resources/openapi.yaml is not valid YAML")
}

/// Follows a `$ref` (local ones only: the document has no others).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {reference}"));
            resolve(
                doc,
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("dangling $ref {reference}")),
            )
        }
        None => schema,
    }
}

/// An operation of the document: method (upper case), path template, and its object.
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let paths = doc["paths"].as_object().expect("no paths");
    let mut out = Vec::new();
    for (path, item) in paths {
        for (key, operation) in item.as_object().expect("a path item is a map") {
            if key != "parameters" {
                out.push((key.to_uppercase(), path.clone(), operation));
            }
        }
    }
    out
}

fn concrete(path: &str) -> String {
    path.replace("{drive_id}", DRIVE_ID)
        .replace("{iface_id}", IFACE_ID)
}

fn request_schema<'a>(doc: &'a Value, operation: &'a Value) -> Option<&'a Value> {
    let body = operation.get("requestBody")?;
    assert!(
        body["required"].is_boolean(),
        "a request body says whether it is required"
    );
    Some(resolve(doc, &body["content"]["application/json"]["schema"]))
}

/// A value the schema accepts: its `example` (which every string with a pattern has), or one
/// made up from its type. `full` fills in every property of an object, not only the required
/// ones.
fn example(doc: &Value, schema: &Value, full: bool) -> Value {
    let schema = resolve(doc, schema);
    if let Some(example) = schema.get("example") {
        return example.clone();
    }
    assert!(
        schema.get("pattern").is_none(),
        "a string with a pattern needs an example: {schema}"
    );
    if let Some(all_of) = schema.get("allOf") {
        return example(doc, &all_of[0], full);
    }
    if let Some(values) = schema.get("enum") {
        return values[0].clone();
    }
    match schema["type"].as_str() {
        Some("object") => {
            let required = required(schema);
            let at_least = schema
                .get("minProperties")
                .and_then(Value::as_u64)
                .unwrap_or(0) as usize;
            let mut object = Map::new();
            for (name, property) in properties(schema) {
                if full || required.contains(name) || object.len() < at_least {
                    object.insert(name.clone(), example(doc, property, full));
                }
            }
            Value::Object(object)
        }
        Some("array") => json!([example(doc, &schema["items"], full)]),
        Some("string") => json!("/tmp/x"),
        Some("integer") => schema.get("minimum").cloned().unwrap_or(json!(1)),
        Some("boolean") => json!(true),
        other => panic!("no example for type {other:?} in {schema}"),
    }
}

fn properties(schema: &Value) -> &Map<String, Value> {
    schema["properties"]
        .as_object()
        .expect("an object schema lists its properties")
}

fn required(schema: &Value) -> BTreeSet<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|names| {
            names
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A value of the wrong JSON type for `schema`.
fn wrong_type(doc: &Value, schema: &Value) -> Value {
    let schema = resolve(doc, schema);
    if let Some(all_of) = schema.get("allOf") {
        return wrong_type(doc, &all_of[0]);
    }
    match schema["type"].as_str() {
        Some("string") => json!(7),
        Some("integer") => json!("7"),
        Some("boolean") => json!("yes"),
        Some("object" | "array") => json!(7),
        other => panic!("no wrong value for type {other:?}"),
    }
}

fn route_body(method: &str, path: &str, body: &Value) -> Result<(), String> {
    route(method, &concrete(path), body.to_string().as_bytes()).map(drop)
}

#[test]
fn the_document_lists_exactly_the_served_operations() {
    let doc = document();
    assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.0."));
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(method, path, _)| (method, path))
        .collect();
    let served: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "the document and SERVED disagree");

    for (method, path, operation) in operations(&doc) {
        let body = request_schema(&doc, operation)
            .map(|schema| example(&doc, schema, false).to_string())
            .unwrap_or_default();
        if let Err(err) = route(&method, &concrete(&path), body.as_bytes()) {
            panic!("{method} {path} {body}: refused by the router: {err}");
        }
        // A body the document calls optional may be left out; a required one may not.
        if let Some(request) = operation.get("requestBody") {
            let empty = route(&method, &concrete(&path), b"");
            assert_eq!(
                empty.is_ok(),
                request["required"] == false,
                "{method} {path} without a body: {empty:?}"
            );
        }
        let responses = operation["responses"].as_object().unwrap();
        let codes: BTreeSet<&str> = responses.keys().map(String::as_str).collect();
        let success = if method == "GET" { "200" } else { "204" };
        assert_eq!(
            codes,
            BTreeSet::from([success, "400", "503"]),
            "{method} {path}: mote answers {success}, a 400, or a 503 when all connections \
             are busy, nothing else"
        );
    }

    // The document's paths serve no other method, and Firecracker's other paths none at all.
    let paths: BTreeSet<&str> = SERVED.iter().map(|(_, path)| *path).collect();
    for path in paths.iter().copied().chain(NOT_SERVED) {
        for method in METHODS {
            if SERVED.contains(&(method, path)) {
                continue;
            }
            if let Ok(what) = route(method, &concrete(path), b"{}") {
                panic!("{method} {path} is served ({what:?}) but not in the document");
            }
        }
    }
}

#[test]
fn request_schemas_accept_and_refuse_what_the_parser_does() {
    let doc = document();
    for (method, path, operation) in operations(&doc) {
        let Some(schema) = request_schema(&doc, operation) else {
            continue;
        };
        let what = format!("{method} {path}");
        if schema["additionalProperties"] == true {
            // A free-form document (the MMDS data store): any object goes, nothing to refuse.
            route_body(&method, &path, &json!({"any": {"thing": [1, "x"]}}))
                .unwrap_or_else(|err| panic!("{what}: refused: {err}"));
            continue;
        }
        assert_eq!(schema["type"], "object", "{what}");
        assert_eq!(
            schema["additionalProperties"], false,
            "{what}: the server refuses unknown fields"
        );
        for full in [false, true] {
            let body = example(&doc, schema, full);
            route_body(&method, &path, &body)
                .unwrap_or_else(|err| panic!("{what} {body}: refused: {err}"));
        }
        let full = example(&doc, schema, true);
        let required = required(schema);

        let mut bogus = full.clone();
        bogus["bogus"] = json!(1);
        let err = route_body(&method, &path, &bogus).unwrap_err();
        assert!(err.contains("unknown field `bogus`"), "{what}: {err}");

        for (name, property) in properties(schema) {
            let mut without = full.clone();
            without.as_object_mut().unwrap().remove(name);
            match route_body(&method, &path, &without) {
                Ok(()) => assert!(
                    !required.contains(name),
                    "{what}: `{name}` is required in the document but optional in the code"
                ),
                Err(err) => {
                    assert!(
                        required.contains(name),
                        "{what}: `{name}` is optional in the document but the code needs it: \
                         {err}"
                    );
                    assert!(err.contains(&format!("missing field `{name}`")), "{err}");
                }
            }

            let mut wrong = full.clone();
            wrong[name] = wrong_type(&doc, property);
            let err = route_body(&method, &path, &wrong)
                .expect_err(&format!("{what}: `{name}` of the wrong type was accepted"));
            assert!(err.contains(&format!("field `{name}`")), "{what}: {err}");

            let mut null = full.clone();
            null[name] = Value::Null;
            let nullable = property["nullable"] == true;
            assert_eq!(
                route_body(&method, &path, &null).is_ok(),
                nullable,
                "{what}: `{name}` is {}nullable in the document but not in the code",
                if nullable { "" } else { "not " }
            );

            if let Some(values) = property.get("enum").and_then(Value::as_array) {
                for value in values {
                    let mut each = full.clone();
                    each[name] = value.clone();
                    route_body(&method, &path, &each)
                        .unwrap_or_else(|err| panic!("{what}: `{name}`={value}: {err}"));
                }
                let mut other = full.clone();
                other[name] = json!("Bogus");
                let err = route_body(&method, &path, &other).unwrap_err();
                assert!(err.contains("unknown variant `Bogus`"), "{what}: {err}");
            }
        }
    }
}

/// Checks `value` against `schema`: types, required and unknown properties, enums, bounds,
/// null. Enough of JSON Schema for this document; anything else in it is a test failure.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if value.is_null() {
        return if schema["nullable"] == true {
            Ok(())
        } else {
            Err(format!("{at}: null where the document does not allow it"))
        };
    }
    if let Some(all_of) = schema.get("allOf").and_then(Value::as_array) {
        return all_of.iter().try_for_each(|s| check(doc, s, value, at));
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        if !values.contains(value) {
            return Err(format!("{at}: {value} is not one of {values:?}"));
        }
    }
    let fits = match schema["type"].as_str() {
        Some("object") => {
            let object = value
                .as_object()
                .ok_or_else(|| format!("{at}: not an object: {value}"))?;
            for name in required(schema) {
                if !object.contains_key(&name) {
                    return Err(format!("{at}: `{name}` is missing"));
                }
            }
            if schema["additionalProperties"] == true {
                return Ok(());
            }
            let known = properties(schema);
            for (name, field) in object {
                let property = known
                    .get(name)
                    .ok_or_else(|| format!("{at}: `{name}` is not in the document"))?;
                check(doc, property, field, &format!("{at}.{name}"))?;
            }
            true
        }
        Some("array") => {
            let items = value
                .as_array()
                .ok_or_else(|| format!("{at}: not an array: {value}"))?;
            for (index, item) in items.iter().enumerate() {
                check(doc, &schema["items"], item, &format!("{at}[{index}]"))?;
            }
            true
        }
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => value.as_u64().is_some_and(|n| {
            schema["minimum"].as_u64().is_none_or(|min| n >= min)
                && schema["maximum"].as_u64().is_none_or(|max| n <= max)
        }),
        other => return Err(format!("{at}: the test does not know type {other:?}")),
    };
    if fits {
        Ok(())
    } else {
        Err(format!("{at}: {value} does not fit {schema}"))
    }
}

/// Requests `method path` from `mote` and checks the answer against the document.
fn answer_fits(doc: &Value, mote: &ApiMote, method: &str, path: &str, body: &str) -> Value {
    let answer = mote.request(method, path, body);
    let operation = &doc["paths"][path][method.to_lowercase()];
    let response = resolve(doc, &operation["responses"][answer.status.to_string()]);
    assert!(
        response.is_object(),
        "{method} {path}: status {} is not in the document: {answer:?}",
        answer.status
    );
    let Some(schema) = response.pointer("/content/application~1json/schema") else {
        assert!(answer.body.is_empty(), "{method} {path}: {answer:?}");
        return Value::Null;
    };
    let value = answer.json();
    if let Err(err) = check(doc, schema, &value, "body") {
        panic!("{method} {path}: the answer does not fit the document: {err}\n{value}");
    }
    value
}

#[test]
fn what_the_server_answers_fits_the_response_schemas() {
    if !require_kvm() {
        return;
    }
    let doc = document();
    let mote = ApiMote::spawn("openapi", &[]);
    for path in ["/", "/version", "/vm/config", "/machine-config"] {
        answer_fits(&doc, &mote, "GET", path, "");
    }
    // Refusals of every kind have the Error shape.
    let fault = answer_fits(
        &doc,
        &mote,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 0}"#,
    );
    assert!(fault["fault_message"].is_string());
    answer_fits(&doc, &mote, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    answer_fits(
        &doc,
        &mote,
        "PUT",
        "/actions",
        r#"{"action_type": "FlushMetrics"}"#,
    );

    // Every optional field set, so that all of them show in GET /vm/config.
    let disk = mote.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let requests = [
        (
            "/boot-source",
            json!({
                "kernel_image_path": probe_kernel(),
                "initrd_path": null,
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off probe.run=boot,spin",
            }),
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 64, "smt": true,
                   "track_dirty_pages": true, "huge_pages": "None"}),
        ),
        (
            "/drives/{drive_id}",
            json!({"drive_id": DRIVE_ID, "path_on_host": disk, "is_root_device": true,
                   "is_read_only": true, "partuuid": "0eaa91a0-01", "cache_type": "Writeback",
                   "io_engine": "Sync"}),
        ),
        (
            "/logger",
            json!({"log_path": mote.dir.join("log"), "level": "Info", "show_level": true,
                   "show_log_origin": true, "module": "mote"}),
        ),
        (
            "/metrics",
            json!({"metrics_path": mote.dir.join("metrics")}),
        ),
        (
            "/vsock",
            json!({"vsock_id": "vsock0", "guest_cid": 3, "uds_path": mote.dir.join("v.sock")}),
        ),
    ];
    for (path, body) in &requests {
        mote.ok("PUT", &concrete(path), &body.to_string());
    }
    let config = answer_fits(&doc, &mote, "GET", "/vm/config", "");
    for name in [
        "boot-source",
        "machine-config",
        "drives",
        "logger",
        "metrics",
        "vsock",
    ] {
        assert!(!config[name].is_null(), "{name} is missing: {config}");
    }
    assert_eq!(config["drives"][0]["partuuid"], "0eaa91a0-01");

    mote.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let info = answer_fits(&doc, &mote, "GET", "/", "");
    assert_eq!(info["state"], "Running");
    answer_fits(&doc, &mote, "GET", "/vm/config", "");
    mote.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let info = answer_fits(&doc, &mote, "GET", "/", "");
    assert_eq!(info["state"], "Paused");
    answer_fits(
        &doc,
        &mote,
        "PUT",
        "/boot-source",
        &requests[0].1.to_string(),
    );
}

/// A network interface shows in GET /vm/config (before boot: the TAP does not exist here).
#[test]
fn a_network_interface_in_the_configuration_fits_the_document() {
    let doc = document();
    let mote = ApiMote::spawn("openapi-net", &[]);
    let iface = json!({"iface_id": IFACE_ID, "host_dev_name": "tap0",
                       "guest_mac": "06:00:AC:10:00:02"});
    mote.ok(
        "PUT",
        &concrete("/network-interfaces/{iface_id}"),
        &iface.to_string(),
    );
    mote.ok(
        "PUT",
        "/mmds/config",
        r#"{"version": "V2", "network_interfaces": ["eth0"], "imds_compat": true}"#,
    );
    answer_fits(
        &doc,
        &mote,
        "PUT",
        "/mmds",
        r#"{"latest": {"meta-data": {"id": "i-1"}}}"#,
    );
    answer_fits(&doc, &mote, "PATCH", "/mmds", r#"{"user-data": "x"}"#);
    let data = answer_fits(&doc, &mote, "GET", "/mmds", "");
    assert_eq!(data["user-data"], "x");
    let config = answer_fits(&doc, &mote, "GET", "/vm/config", "");
    assert_eq!(
        config["network-interfaces"][0]["guest_mac"],
        "06:00:ac:10:00:02"
    );
    assert_eq!(config["mmds-config"]["ipv4_address"], "169.254.169.254");
}
