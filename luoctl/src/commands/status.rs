//! `luoctl status`: the state, sessions, subsystems and the last cycle.

use super::{Ctx, Failed, unexpected};
use crate::output::{self, Text};
use liveupdate::protocol::{CycleSummary, Request, Response, SessionInfo, StatusReport};
use liveupdate::record::{Timestamps, UnixNanos};

/// `status` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {}

/// Asks luod for its status and prints it.
pub fn run(_args: &StatusArgs, ctx: &Ctx) -> Result<(), Failed> {
    let req = Request::Status;
    let report = match ctx.call("status", &req)? {
        Response::Status(r) => *r,
        other => return Err(unexpected("status", &req, &other).into()),
    };
    if ctx.json() {
        output::json_success(&report);
    } else {
        render(&report, output::now()).print();
    }
    Ok(())
}

/// The human status.
pub fn render(r: &StatusReport, now: UnixNanos) -> Text {
    let mut t = Text::new();
    t.line(format!("state         {}", r.state));
    if let Some(p) = &r.in_progress {
        let mut line = format!(
            "in progress   {} since {} ({})",
            p.step,
            output::timestamp(p.since),
            output::ago(p.since, now)
        );
        if let Some(w) = &p.waiting_for {
            line.push_str(&format!(", waiting for {w}"));
        }
        t.line(line);
    }
    t.line(format!("backend       {}, region {}", r.backend, r.region));
    if let Some(p) = &r.reboot_path {
        t.line(format!("reboot path   {}: {}", p.path, p.detail));
    }
    t.line(format!("record        generation {}", r.generation));
    t.line(format!("live updates  {}", r.live_updates));
    let subsystems = if r.subsystems.is_empty() {
        "none".to_string()
    } else {
        r.subsystems.join(", ")
    };
    t.line(format!("subsystems    {subsystems}"));
    if r.sessions.is_empty() {
        t.line("sessions      none");
    } else {
        t.line(format!("sessions      {}", r.sessions.len()));
        sessions_table(&mut t, &r.sessions);
    }
    match &r.last_cycle {
        None => t.line("last cycle    none"),
        Some(c) => cycle(&mut t, c, now),
    }
    for note in &r.notes {
        t.line(format!("note: {note}"));
    }
    t
}

/// One row per session: name, owner, files, bytes, tokens, and where it is.
fn sessions_table(t: &mut Text, sessions: &[SessionInfo]) {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            let bytes: u64 = s.files.iter().map(|f| f.size).sum();
            let retrieved = s.files.iter().filter(|f| f.retrieved).count();
            let mut tokens: Vec<String> = s.files.iter().take(8).map(|f| f.token.to_string()).collect();
            if s.files.len() > 8 {
                tokens.push(format!("+{} more", s.files.len() - 8));
            }
            let tokens = if tokens.is_empty() {
                "-".to_string()
            } else {
                tokens.join(",")
            };
            let state = if s.incoming {
                format!("incoming, {retrieved}/{} retrieved", s.files.len())
            } else {
                "outgoing".to_string()
            };
            vec![
                s.name.clone(),
                s.owner_uid.to_string(),
                s.files.len().to_string(),
                output::bytes(bytes),
                tokens,
                state,
            ]
        })
        .collect();
    t.table("  ", &["NAME", "OWNER", "FILES", "SIZE", "TOKENS", "STATE"], &rows);
}

/// The last cycle: id, outcome, target, blackout, then its timestamps.
fn cycle(t: &mut Text, c: &CycleSummary, now: UnixNanos) {
    let mut head = format!("last cycle    #{} {}", c.id, c.outcome);
    if let Some(k) = &c.target_kernel {
        head.push_str(&format!(", kernel {k}"));
    }
    if let Some(b) = c.blackout_ns {
        head.push_str(&format!(", blackout {}", output::duration(b)));
    }
    t.line(head);
    timestamps(t, &c.timestamps, now);
}

/// The transition timestamps that are set, in cycle order.
pub fn timestamps(t: &mut Text, ts: &Timestamps, now: UnixNanos) {
    let all = [
        ("prepared", ts.prepared),
        ("freeze started", ts.freeze_started),
        ("frozen", ts.frozen),
        ("reboot", ts.reboot),
        ("luod started", ts.luod_started),
        ("updated", ts.updated),
        ("finished", ts.finished),
        ("cancelled", ts.cancelled),
    ];
    for (name, at) in all {
        if let Some(at) = at {
            t.line(format!(
                "  {name:<15} {}  ({})",
                output::timestamp(at),
                output::ago(at, now)
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use liveupdate::protocol::FileInfo;
    use liveupdate::state::State;

    #[test]
    fn human_status_shows_sessions_and_the_last_cycle() {
        let s = 1_000_000_000u64;
        let now = 1_735_689_600 * s;
        let r = StatusReport {
            state: State::Updated,
            backend: "file".into(),
            region: "file /tmp/r (64.0 MiB)".into(),
            generation: 7,
            sessions: vec![SessionInfo {
                name: "vm0".into(),
                owner_uid: 0,
                files: vec![
                    FileInfo {
                        token: 1,
                        size: 1024,
                        retrieved: true,
                    },
                    FileInfo {
                        token: 2,
                        size: 1024,
                        retrieved: false,
                    },
                ],
                incoming: true,
            }],
            subsystems: vec!["region-capacity".into()],
            last_cycle: Some(CycleSummary {
                id: 3,
                outcome: "in-progress".into(),
                target_kernel: None,
                timestamps: Timestamps {
                    prepared: Some(now - 120 * s),
                    freeze_started: Some(now - 60 * s),
                    updated: Some(now - 60 * s + 12_300_000),
                    ..Default::default()
                },
                blackout_ns: Some(12_300_000),
            }),
            live_updates: 2,
            notes: vec![],
            in_progress: Some(liveupdate::progress::Progress {
                step: "freeze".into(),
                since: now - 3 * s,
                waiting_for: Some("VM vm0 (freeze)".into()),
            }),
            reboot_path: Some(liveupdate::protocol::RebootPathInfo {
                path: "systemd".into(),
                detail: "orderly shutdown".into(),
            }),
        };
        let text = render(&r, now);
        let out = text.as_str();
        assert!(out.starts_with("state         updated\n"), "{out}");
        assert!(
            out.contains(
                "\nin progress   freeze since 2024-12-31T23:59:57.000Z (3s ago), waiting for VM vm0 (freeze)\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("  vm0   0      2      2.00 KiB  1,2     incoming, 1/2 retrieved\n"),
            "{out}"
        );
        assert!(
            out.contains("last cycle    #3 in-progress, blackout 12.3 ms\n"),
            "{out}"
        );
        assert!(
            out.contains("  prepared        2024-12-31T23:58:00.000Z  (2m ago)\n"),
            "{out}"
        );
        assert!(!out.contains("finished"), "{out}");
    }
}
