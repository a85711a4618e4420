//! Printing, shared by every command: JSON objects on stdout, the one-line
//! error on stderr, and the small formatters (sizes, durations, timestamps,
//! tables) of the human output.
//!
//! JSON shapes (documented in `CLI.md`): success is one object with
//! `"ok": true` and the command's fields; failure is
//! `{"ok": false, "error": {...}}`, see [`ErrorJson`].

use crate::error::Failure;
use liveupdate::protocol::CheckItem;
use liveupdate::record::UnixNanos;
use liveupdate::subsystem::{StepError, SubsystemError};
use serde::Serialize;
#[cfg(test)]
use serde_json::Value;
use std::io::Write;

/// Human or JSON output, chosen by the global `--json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Text for people.
    Human,
    /// One JSON object on stdout.
    Json,
}

/// A successful command's JSON: `{"ok": true, ...body}`.
#[derive(Debug, Serialize)]
pub struct Success<T: Serialize> {
    /// Always `true`.
    pub ok: bool,
    /// The command's fields, flattened into the top level.
    #[serde(flatten)]
    pub body: T,
}

/// Prints `{"ok": true, ...body}` on stdout.
pub fn json_success<T: Serialize>(body: T) {
    print_json(&Success { ok: true, body });
}

/// Prints one JSON value and a newline on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => print(&(s + "\n")),
        // The types printed here serialize infallibly (no maps with
        // non-string keys); say so rather than print nothing.
        Err(e) => eprintln!("luoctl: cannot encode the result as JSON: {e}"),
    }
}

/// Writes `text` to stdout. A closed pipe (`luoctl status | head -1`) is not
/// an error worth a panic.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// The `error` member of a failure's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorJson {
    /// Class of failure: luod's [`ErrorKind`](liveupdate::protocol::ErrorKind)
    /// name, or one of luoctl's own (`usage`, `unreachable`, ...).
    pub kind: &'static str,
    /// The exit code luoctl exits with.
    pub code: u8,
    /// What failed: the operation.
    pub what: String,
    /// Why (luod's message verbatim when luod refused).
    pub message: String,
    /// What to do about it, or `null`.
    pub hint: Option<String>,
    /// The subsystem step that failed, or `null`.
    pub step: Option<StepJson>,
}

/// A subsystem's failed step, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepJson {
    /// `prepare`, `freeze`, `cancel`, `unfreeze`, `restore` or `finish`.
    pub step: String,
    /// The subsystem that failed.
    pub subsystem: String,
    /// True when the subsystem vetoed (`prepare` only).
    pub veto: bool,
    /// The subsystem's reason.
    pub reason: String,
    /// Undo steps that failed while rolling back (normally empty).
    pub undo_failures: Vec<UndoJson>,
}

/// An undo step that failed, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UndoJson {
    /// The subsystem.
    pub subsystem: String,
    /// The undo step.
    pub step: String,
    /// Why it failed.
    pub error: String,
}

fn reason(e: &SubsystemError) -> String {
    match e {
        SubsystemError::Veto(r) | SubsystemError::Failed(r) => r.clone(),
    }
}

impl From<&StepError> for StepJson {
    fn from(s: &StepError) -> StepJson {
        StepJson {
            step: s.step.to_string(),
            subsystem: s.subsystem.clone(),
            veto: s.is_veto(),
            reason: reason(&s.error),
            undo_failures: s
                .undo_failures
                .iter()
                .map(|u| UndoJson {
                    subsystem: u.subsystem.clone(),
                    step: u.step.to_string(),
                    error: u.error.to_string(),
                })
                .collect(),
        }
    }
}

impl From<&Failure> for ErrorJson {
    fn from(f: &Failure) -> ErrorJson {
        ErrorJson {
            kind: f.code.kind(),
            code: f.code.code(),
            what: f.what.clone(),
            message: f.message.clone(),
            hint: f.hint.clone(),
            step: f.step.as_deref().map(StepJson::from),
        }
    }
}

/// What a failed command still reports beside its error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Details {
    /// The items of a failed `check`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<CheckItem>>,
    /// `check`: the target is the running kernel already.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub already_on_target: Option<bool>,
}

/// A failure's JSON: `{"ok": false, ...details, "error": {...}}`, in that order.
#[derive(Debug, Serialize)]
struct FailureJson<'a> {
    ok: bool,
    #[serde(flatten)]
    details: &'a Details,
    error: ErrorJson,
}

/// The whole JSON object of a failure.
fn failure_object<'a>(f: &Failure, details: &'a Details) -> FailureJson<'a> {
    FailureJson {
        ok: false,
        details,
        error: ErrorJson::from(f),
    }
}

/// [`failure_object`] as a JSON value.
#[cfg(test)]
pub fn failure_json(f: &Failure, details: &Details) -> Value {
    serde_json::to_value(failure_object(f, details)).unwrap_or(Value::Null)
}

/// Reports a failure: as JSON on stdout, or as one line on stderr.
pub fn report_failure(mode: Mode, f: &Failure, details: &Details) {
    match mode {
        Mode::Json => print_json(&failure_object(f, details)),
        Mode::Human => {
            let _ = writeln!(std::io::stderr().lock(), "{}", f.line());
        }
    }
}

/// Lines of human output, printed at once.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    /// An empty text.
    pub fn new() -> Text {
        Text::default()
    }

    /// Appends one line.
    pub fn line(&mut self, s: impl AsRef<str>) {
        self.0.push_str(s.as_ref());
        self.0.push('\n');
    }

    /// Appends a table: a header row and rows, columns left-aligned and
    /// separated by two spaces, every line indented by `indent`.
    pub fn table(&mut self, indent: &str, header: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(rows) {
            let mut line = indent.to_string();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths.get(i).copied().unwrap_or(0);
                    line.push_str(&format!("{cell:<pad$}  "));
                }
            }
            self.line(line.trim_end());
        }
    }

    /// Prints the text on stdout.
    pub fn print(&self) {
        print(&self.0);
    }

    /// The text so far.
    #[cfg(test)]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `6 B`, `1.5 KiB`, `12.0 MiB`, `2.00 GiB` (powers of 1024).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let u = UNITS[unit];
    if v < 10.0 {
        format!("{v:.2} {u}")
    } else if v < 100.0 {
        format!("{v:.1} {u}")
    } else {
        format!("{v:.0} {u}")
    }
}

/// A duration in nanoseconds: `0.042 ms`, `12.3 ms`, `2.41 s`, `3m 05s`.
pub fn duration(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms < 1.0 {
        format!("{ms:.3} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        let s = ns / 1_000_000_000;
        format!("{}m {:02}s", s / 60, s % 60)
    }
}

/// Nanoseconds since the epoch, now.
pub fn now() -> UnixNanos {
    liveupdate::engine::now()
}

/// RFC 3339 in UTC with milliseconds: `2025-06-01T12:34:56.789Z`.
pub fn timestamp(ns: UnixNanos) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    humantime::format_rfc3339_millis(at).to_string()
}

/// How long ago `then` was, seen from `now`: `12s ago`, `5m ago`, `3h ago`,
/// `2d ago` (`in 3s` for a clock that went back).
pub fn ago(then: UnixNanos, now: UnixNanos) -> String {
    let (secs, future) = if now >= then {
        ((now - then) / 1_000_000_000, false)
    } else {
        ((then - now) / 1_000_000_000, true)
    };
    let span = match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if future {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `1 file`, `2 files`.
pub fn count(n: impl Into<u64>, what: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitCode;
    use liveupdate::protocol::client::ClientError;
    use liveupdate::protocol::{ErrorKind, ErrorReply};
    use liveupdate::subsystem::{Step, UndoFailure};
    use serde_json::json;

    #[test]
    fn a_refusal_has_the_documented_json_shape() {
        let reply = ErrorReply {
            kind: ErrorKind::WrongState,
            message: "cannot freeze in state normal: freeze is allowed only in prepared".into(),
            hint: "run `luoctl prepare` first".into(),
            step: None,
        };
        let f = Failure::client("freeze", ClientError::Server(Box::new(reply)));
        assert_eq!(
            failure_json(&f, &Details::default()),
            json!({
                "ok": false,
                "error": {
                    "kind": "wrong-state",
                    "code": 11,
                    "what": "freeze",
                    "message": "cannot freeze in state normal: freeze is allowed only in prepared",
                    "hint": "run `luoctl prepare` first",
                    "step": null,
                }
            })
        );
    }

    #[test]
    fn a_veto_carries_the_subsystem_and_its_reason_in_json() {
        let step = StepError {
            step: Step::Prepare,
            subsystem: "region-capacity".into(),
            error: SubsystemError::Veto("too big".into()),
            undo_failures: vec![UndoFailure {
                subsystem: "kvm".into(),
                step: Step::Cancel,
                error: SubsystemError::Failed("stuck".into()),
            }],
        };
        let reply = ErrorReply {
            kind: ErrorKind::Vetoed,
            message: step.to_string(),
            hint: String::new(),
            step: Some(step),
        };
        let v = failure_json(
            &Failure::client("prepare", ClientError::Server(Box::new(reply))),
            &Details::default(),
        );
        assert_eq!(v["error"]["kind"], "vetoed");
        assert_eq!(v["error"]["code"], 13);
        assert_eq!(v["error"]["hint"], Value::Null);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("vetoed: too big"))
        );
        assert_eq!(
            v["error"]["step"],
            json!({
                "step": "prepare",
                "subsystem": "region-capacity",
                "veto": true,
                "reason": "too big",
                "undo_failures": [{"subsystem": "kvm", "step": "cancel", "error": "stuck"}],
            })
        );
    }

    #[test]
    fn a_local_failure_uses_luoctls_own_kind() {
        let f = Failure::new(
            "session preserve vm0 token 1",
            ExitCode::LocalIo,
            "cannot open /nope: No such file",
        )
        .with_hint("check --file");
        let v = failure_json(&f, &Details::default());
        assert_eq!(v["error"]["kind"], "local-io");
        assert_eq!(v["error"]["code"], 7);
        assert_eq!(v["error"]["hint"], "check --file");
    }

    #[test]
    fn details_of_a_failure_sit_between_ok_and_the_error() {
        let f = Failure::new("check", ExitCode::CheckFailed, "prepare would be refused");
        let item = CheckItem {
            name: "state".into(),
            ok: false,
            detail: "state is frozen".into(),
        };
        let details = Details {
            items: Some(vec![item]),
            already_on_target: None,
        };
        let text = serde_json::to_string(&failure_object(&f, &details)).unwrap();
        assert!(text.starts_with(r#"{"ok":false,"items":[{"name":"state","ok":false,"detail":"state is frozen"}],"error":{"kind":"check-failed","code":3,"#), "{text}");
    }

    #[test]
    fn success_is_flattened_beside_ok() {
        #[derive(Serialize)]
        struct Body {
            session: &'static str,
        }
        let v = serde_json::to_value(Success {
            ok: true,
            body: Body { session: "vm0" },
        })
        .unwrap();
        assert_eq!(v, json!({"ok": true, "session": "vm0"}));
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(12 << 20), "12.0 MiB");
        assert_eq!(bytes(256 << 20), "256 MiB");
        assert_eq!(bytes(2 << 30), "2.00 GiB");
    }

    #[test]
    fn durations_are_in_ms_below_a_second() {
        assert_eq!(duration(42_000), "0.042 ms");
        assert_eq!(duration(12_345_678), "12.3 ms");
        assert_eq!(duration(2_410_000_000), "2.41 s");
        assert_eq!(duration(185_000_000_000), "3m 05s");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day), 12:34:56.789
        assert_eq!(timestamp(951_827_696_789_000_000), "2000-02-29T12:34:56.789Z");
        assert_eq!(timestamp(1_735_689_599_000_000_000), "2024-12-31T23:59:59.000Z");
    }

    #[test]
    fn relative_times_round_down() {
        let s = 1_000_000_000;
        assert_eq!(ago(100 * s, 100 * s), "0s ago");
        assert_eq!(ago(0, 59 * s), "59s ago");
        assert_eq!(ago(0, 61 * s), "1m ago");
        assert_eq!(ago(0, 7200 * s), "2h ago");
        assert_eq!(ago(0, 3 * 86_400 * s), "3d ago");
        assert_eq!(ago(3 * s, 0), "in 3s");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Text::new();
        t.table(
            "  ",
            &["SESSION", "TOKEN"],
            &[
                vec!["vm0".into(), "1".into()],
                vec!["a-long-name".into(), "0x10".into()],
            ],
        );
        assert_eq!(
            t.as_str(),
            "  SESSION      TOKEN\n  vm0          1\n  a-long-name  0x10\n"
        );
    }
}
