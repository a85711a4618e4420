//! `luo-qemu-tool json`: the values at a path of a JSON document, for the
//! busybox scenarios' shell (which has no JSON tool) reading `luoctl --json`.

use serde_json::Value;
use std::io::Read;

/// The values of `doc` at `path` (keys and array indexes joined by `.`,
/// `*` for every element of an array or every value of an object).
pub fn select<'a>(doc: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut cur = vec![doc];
    for step in path.split('.').filter(|s| !s.is_empty()) {
        cur = cur
            .into_iter()
            .flat_map(|v| -> Vec<&Value> {
                match (step, v) {
                    ("*", Value::Array(a)) => a.iter().collect(),
                    ("*", Value::Object(o)) => o.values().collect(),
                    (key, Value::Object(o)) => o.get(key).into_iter().collect(),
                    (idx, Value::Array(a)) => idx.parse::<usize>().ok().and_then(|i| a.get(i)).into_iter().collect(),
                    _ => Vec::new(),
                }
            })
            .collect();
    }
    cur
}

/// A value as the shell wants it: a string bare, anything else as JSON.
pub fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Reads the document from stdin and prints the values at the path (or
/// their number, with `count`). Fails when stdin is not JSON or nothing is
/// at the path (unless counting).
pub fn cmd(words: &[String], count: bool) -> crate::Result<()> {
    let [path] = words else {
        return Err("json needs exactly one PATH, e.g. `state` or `sessions.*.files.*.token`".into());
    };
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| format!("reading stdin: {e}"))?;
    let doc: Value = serde_json::from_str(&text).map_err(|e| format!("stdin is not JSON: {e}"))?;
    let found = select(&doc, path);
    if count {
        println!("{}", found.len());
        return Ok(());
    }
    if found.is_empty() {
        return Err(format!("nothing at {path:?}"));
    }
    for v in found {
        println!("{}", render(v));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_pick_keys_indexes_and_every_element() {
        let doc = json!({"state": "updated", "sessions": [
            {"name": "a", "files": [{"token": 1}, {"token": 2}]},
            {"name": "b", "files": [{"token": 3}]}]});
        let vals = |p| select(&doc, p).into_iter().map(render).collect::<Vec<_>>();
        assert_eq!(vals("state"), ["updated"]);
        assert_eq!(vals("sessions.1.name"), ["b"]);
        assert_eq!(vals("sessions.*.files.*.token"), ["1", "2", "3"]);
        assert_eq!(vals("sessions.*.files.*").len(), 3);
        assert!(vals("sessions.7.name").is_empty());
        assert!(vals("state.x").is_empty());
    }
}
