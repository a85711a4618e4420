//! `luoctl history`: past cycles and events (sessions evicted, ...), oldest first.

use super::{Ctx, Failed, unexpected};
use crate::output::{self, Text};
use liveupdate::engine::{blackout, hex};
use liveupdate::protocol::{HistoryReport, Request, Response};
use liveupdate::record::{Cycle, Event, HookRun, KernelImage, Outcome, Timestamps, Validation};
use serde::Serialize;

/// `history` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {}

/// A past cycle as `history --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CycleJson {
    /// Cycle id.
    pub id: u64,
    /// `finished`, `cancelled` or `rolled-back`.
    pub outcome: &'static str,
    /// The target kernel, or `null`.
    pub target: Option<TargetJson>,
    /// Kernel release before the update.
    pub from_release: String,
    /// Kernel release after it (empty when cancelled).
    pub to_release: String,
    /// Transition timestamps, nanoseconds since the epoch, `null` when not reached.
    pub timestamps: Timestamps,
    /// Blackout (freeze start to `updated`) in nanoseconds, or `null`.
    pub blackout_ns: Option<u64>,
    /// Sessions carried.
    pub sessions: u32,
    /// Files carried.
    pub files: u32,
    /// Bytes carried.
    pub bytes: u64,
    /// The kernel running when the cycle was prepared (what a rollback goes
    /// back to), or `null`.
    pub previous: Option<TargetJson>,
    /// The cycle this one rolled back, or `null`.
    pub rollback_of: Option<u64>,
    /// The cycle that rolled this one back, or `null`.
    pub rolled_back_by: Option<u64>,
    /// A failed validation (`hook`, `reason`, `accepted_by`, `accepted_at`), or `null`.
    pub validation: Option<Validation>,
    /// The hooks run for the cycle, in order (`phase`, `hook`, `ok`, `status`, `duration_ns`, `last_line`).
    pub hooks: Vec<HookRun>,
}

fn target_json(t: &KernelImage) -> TargetJson {
    TargetJson {
        kernel: t.kernel.clone(),
        kernel_sha256: hex(&t.kernel_sha256),
        initrd: t.initrd.clone(),
        initrd_sha256: t.initrd_sha256.as_ref().map(|d| hex(d)),
        cmdline: t.cmdline.clone(),
    }
}

/// A target kernel, digests in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetJson {
    /// Kernel image path.
    pub kernel: String,
    /// Its SHA-256, hex.
    pub kernel_sha256: String,
    /// Initrd path, or `null`.
    pub initrd: Option<String>,
    /// Its SHA-256, hex, or `null`.
    pub initrd_sha256: Option<String>,
    /// Command line.
    pub cmdline: String,
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Finished => "finished",
        Outcome::Cancelled => "cancelled",
        Outcome::RolledBack => "rolled-back",
    }
}

impl From<&Cycle> for CycleJson {
    fn from(c: &Cycle) -> CycleJson {
        CycleJson {
            id: c.id,
            outcome: outcome(c.outcome),
            target: c.target.as_ref().map(target_json),
            from_release: c.from_release.clone(),
            to_release: c.to_release.clone(),
            timestamps: c.timestamps.clone(),
            blackout_ns: blackout(&c.timestamps),
            sessions: c.sessions,
            files: c.files,
            bytes: c.bytes,
            previous: c.previous.as_ref().map(target_json),
            rollback_of: c.rollback_of,
            rolled_back_by: c.rolled_back_by,
            validation: c.validation.clone(),
            hooks: c.hooks.clone(),
        }
    }
}

/// `history --json`: `{"ok": true, "cycles": [...], "events": [...]}`.
#[derive(Debug, Serialize)]
struct HistoryJson<'a> {
    cycles: Vec<CycleJson>,
    /// The record's events as they are (`at`, `uid`, `action`, `subject`, `detail`).
    events: &'a [Event],
}

/// Asks luod for the history and prints it.
pub fn run(_args: &HistoryArgs, ctx: &Ctx) -> Result<(), Failed> {
    let req = Request::History;
    let report = match ctx.call("history", &req)? {
        Response::History(r) => r,
        other => return Err(unexpected("history", &req, &other).into()),
    };
    if ctx.json() {
        output::json_success(HistoryJson {
            cycles: report.cycles.iter().map(CycleJson::from).collect(),
            events: &report.events,
        });
    } else {
        render(&report).print();
    }
    Ok(())
}

/// One row per cycle, then one per event.
fn render(report: &HistoryReport) -> Text {
    let mut t = render_cycles(&report.cycles);
    if !report.events.is_empty() {
        let rows: Vec<Vec<String>> = report
            .events
            .iter()
            .map(|e| {
                vec![
                    output::timestamp(e.at),
                    e.uid.to_string(),
                    e.action.clone(),
                    e.subject.clone(),
                    e.detail.clone(),
                ]
            })
            .collect();
        t.line("events");
        t.table("  ", &["AT", "UID", "ACTION", "SUBJECT", "DETAIL"], &rows);
    }
    t
}

/// One row per cycle.
fn render_cycles(cycles: &[Cycle]) -> Text {
    let mut t = Text::new();
    if cycles.is_empty() {
        t.line("no cycles yet");
        return t;
    }
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = cycles
        .iter()
        .map(|c| {
            let ts = &c.timestamps;
            let ended = ts.finished.or(ts.cancelled);
            let kernel = match (&c.target, c.to_release.is_empty()) {
                (_, false) => format!("{} -> {}", c.from_release, c.to_release),
                (Some(t), true) => t.kernel.clone(),
                (None, true) => c.from_release.clone(),
            };
            let mut o = outcome(c.outcome).to_string();
            if let Some(by) = c.rolled_back_by {
                o.push_str(&format!(" (by #{by})"));
            }
            if let Some(of) = c.rollback_of {
                o.push_str(&format!(" (rollback of #{of})"));
            }
            vec![
                c.id.to_string(),
                o,
                ts.prepared.map(output::timestamp).unwrap_or_else(dash),
                ended.map(output::timestamp).unwrap_or_else(dash),
                blackout(ts).map(output::duration).unwrap_or_else(dash),
                c.files.to_string(),
                output::bytes(c.bytes),
                kernel,
            ]
        })
        .collect();
    t.table(
        "",
        &[
            "ID", "OUTCOME", "PREPARED", "ENDED", "BLACKOUT", "FILES", "SIZE", "KERNEL",
        ],
        &rows,
    );
    for c in cycles {
        if let Some(v) = &c.validation {
            let accepted = match v.accepted_by {
                Some(uid) => format!(" (accepted by uid {uid})"),
                None => String::new(),
            };
            t.line(format!(
                "  #{}: validation failed: post-update hook {}: {}{accepted}",
                c.id, v.hook, v.reason
            ));
        }
        for h in &c.hooks {
            let last = if h.last_line.is_empty() {
                String::new()
            } else {
                format!(": {}", h.last_line)
            };
            t.line(format!(
                "  #{}: hook {}/{} {} in {}{last}",
                c.id,
                h.phase,
                h.hook,
                h.status,
                output::duration(h.duration_ns)
            ));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveupdate::record::KernelImage;

    #[test]
    fn history_json_has_hex_digests_and_the_blackout() {
        let c = Cycle {
            id: 4,
            outcome: Outcome::Finished,
            target: Some(KernelImage {
                kernel: "/boot/vmlinuz".into(),
                kernel_sha256: [0xab; 32],
                initrd: None,
                initrd_sha256: None,
                cmdline: "quiet".into(),
            }),
            from_release: "6.19.0".into(),
            to_release: "6.19.1".into(),
            timestamps: Timestamps {
                freeze_started: Some(1_000),
                updated: Some(5_001_000),
                ..Default::default()
            },
            sessions: 1,
            files: 2,
            bytes: 4096,
            previous: None,
            rollback_of: None,
            rolled_back_by: None,
            validation: None,
            hooks: Vec::new(),
        };
        let v = serde_json::to_value(CycleJson::from(&c)).unwrap();
        assert_eq!(v["outcome"], "finished");
        assert_eq!(v["blackout_ns"], 5_000_000);
        assert_eq!(v["target"]["kernel_sha256"], "ab".repeat(32));
        assert_eq!(v["target"]["initrd_sha256"], serde_json::Value::Null);
        assert_eq!(v["timestamps"]["updated"], 5_001_000);
        assert_eq!(v["timestamps"]["finished"], serde_json::Value::Null);
    }

    #[test]
    fn history_text_lists_events_after_the_cycles() {
        let report = HistoryReport {
            cycles: Vec::new(),
            events: vec![Event {
                at: 0,
                uid: 0,
                action: "session-evicted".into(),
                subject: "vm1".into(),
                detail: "owner uid 65534; 1 file(s), 4096 bytes released (1 not retrieved) in state updated".into(),
            }],
        };
        let text = render(&report);
        let lines: Vec<&str> = text.as_str().lines().collect();
        assert_eq!(lines[0], "no cycles yet");
        assert_eq!(lines[1], "events");
        assert!(lines[2].trim_start().starts_with("AT"), "{lines:?}");
        let cells: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(cells[1..5], ["0", "session-evicted", "vm1", "owner"], "{lines:?}");
    }
}
