//! The MMDS data store: one JSON document the host fills (`PUT /mmds`) and merges into
//! (`PATCH /mmds`, RFC 7396 JSON Merge Patch), limited in size, read by the guest a path at
//! a time as JSON or as IMDS text.

use serde_json::{Map, Value};

/// Firecracker's default limit on the store, when `--mmds-size-limit` is not given: the API's
/// default payload limit.
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Firecracker's words.
    #[error("The MMDS patch request doesn't fit.")]
    TooLarge,
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    #[error("The MMDS resource does not exist.")]
    NotFound,
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// How a value is rendered for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    /// EC2 IMDS text: an object lists its keys (a `/` after those holding objects), a string is
    /// itself; other values cannot be rendered.
    Imds,
}

#[derive(Debug, Clone)]
pub struct DataStore {
    data: Value,
    /// Set by the first PUT: a PATCH before it is refused, as Firecracker does.
    initialized: bool,
    limit: usize,
}

impl Default for DataStore {
    fn default() -> Self {
        Self::new(DEFAULT_SIZE_LIMIT)
    }
}

impl DataStore {
    /// An empty store holding at most `limit` bytes of serialized JSON.
    pub fn new(limit: usize) -> Self {
        Self {
            data: Value::Object(Map::new()),
            initialized: false,
            limit,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The whole document (`GET /mmds`).
    pub fn data(&self) -> &Value {
        &self.data
    }

    fn fits(&self, value: &Value) -> bool {
        // Serializing a Value cannot fail (its keys are strings); a failure counts as too big.
        serde_json::to_vec(value).is_ok_and(|bytes| bytes.len() <= self.limit)
    }

    /// Replaces the document (`PUT /mmds`).
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        if !self.fits(&data) {
            return Err(StoreError::TooLarge);
        }
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Merges `patch` into the document (`PATCH /mmds`); the document is unchanged if the
    /// result would not fit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut merged = self.data.clone();
        merge_patch(&mut merged, patch);
        if !self.fits(&merged) {
            return Err(StoreError::TooLarge);
        }
        self.data = merged;
        Ok(())
    }

    /// The value at `path` (`/a/b/0`, a trailing `/` allowed; `/` is the whole document),
    /// rendered as `format` asks.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, StoreError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(StoreError::NotFound)?;
        match format {
            OutputFormat::Json => Ok(value.to_string()),
            OutputFormat::Imds => imds_text(value),
        }
    }
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, value) in patch {
            if value.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

/// EC2 IMDS's text form of a value.
fn imds_text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(key, value)| {
                if value.is_object() {
                    format!("{key}/")
                } else {
                    key.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(text) => Ok(text.clone()),
        _ => Err(StoreError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        // The RFC's own example.
        let mut doc = json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["example", "sample"], "content": "This will be unchanged"});
        merge_patch(
            &mut doc,
            &json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": null}, "tags": ["example"]}),
        );
        assert_eq!(
            doc,
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"], "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
        let mut scalar = json!("x");
        merge_patch(&mut scalar, &json!({"a": {"b": null, "c": 1}}));
        assert_eq!(scalar, json!({"a": {"c": 1}}));
        merge_patch(&mut scalar, &json!([1]));
        assert_eq!(scalar, json!([1]));
    }

    #[test]
    fn put_and_patch_respect_the_size_limit() {
        let mut store = DataStore::new(20);
        assert_eq!(store.patch(&json!({})), Err(StoreError::NotInitialized));
        store.put(json!({"a": "0123456"})).unwrap(); // 15 bytes
        assert_eq!(
            store.put(json!({"a": "0123456789abcdef"})),
            Err(StoreError::TooLarge)
        );
        assert_eq!(
            store.patch(&json!({"b": "0123456"})),
            Err(StoreError::TooLarge)
        );
        // A refused patch changes nothing.
        assert_eq!(store.data(), &json!({"a": "0123456"}));
        store.patch(&json!({"a": null, "b": 1})).unwrap();
        assert_eq!(store.data(), &json!({"b": 1}));
    }

    #[test]
    fn paths_reach_into_objects_and_arrays() {
        let mut store = DataStore::default();
        store
            .put(json!({"latest": {"meta-data": {"id": "i-1", "n": 3}}, "list": ["x", "y"]}))
            .unwrap();
        let get = |path| store.get(path, OutputFormat::Json);
        assert_eq!(get("/latest/meta-data/id").unwrap(), "\"i-1\"");
        assert_eq!(get("/latest/meta-data/").unwrap(), r#"{"id":"i-1","n":3}"#);
        assert_eq!(get("/list/1").unwrap(), "\"y\"");
        assert_eq!(get("/nothing"), Err(StoreError::NotFound));
        assert_eq!(get("/list/7"), Err(StoreError::NotFound));
        assert!(get("/").unwrap().starts_with("{\"latest\""));
    }

    #[test]
    fn imds_text_lists_keys_and_gives_strings() {
        let mut store = DataStore::default();
        store
            .put(json!({"latest": {"meta-data": {"id": "i-1", "n": 3, "tags": {"a": "b"}}}}))
            .unwrap();
        let imds = |path| store.get(path, OutputFormat::Imds);
        assert_eq!(imds("/").unwrap(), "latest/");
        assert_eq!(imds("/latest/meta-data").unwrap(), "id\nn\ntags/");
        assert_eq!(imds("/latest/meta-data/id").unwrap(), "i-1");
        assert_eq!(
            imds("/latest/meta-data/n"),
            Err(StoreError::UnsupportedValueType)
        );
    }
}
