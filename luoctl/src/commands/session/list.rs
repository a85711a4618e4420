//! `luoctl session list`: your sessions, one row per preserved file.

use super::super::{Ctx, Failed, unexpected};
use crate::error::Failure;
use crate::output::{self, Text};
use liveupdate::protocol::{Request, Response, SessionInfo};
use serde::Serialize;

/// `session list` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct ListArgs {}

/// `session list --json`: `{"ok": true, "sessions": [...]}`.
#[derive(Debug, Serialize)]
struct ListJson<'a> {
    sessions: &'a [SessionInfo],
}

/// Asks luod for the caller's sessions, page by page (a page is what fits
/// in one answer; an empty one ends the list), and prints them.
pub fn run(_args: &ListArgs, ctx: &Ctx) -> Result<(), Failed> {
    let mut client = ctx.connect("session list")?;
    let mut sessions: Vec<SessionInfo> = Vec::new();
    loop {
        let req = Request::SessionListFrom {
            start: sessions.len() as u64,
        };
        match client.call(&req).map_err(|e| Failure::client("session list", e))? {
            Response::Sessions(page) if page.is_empty() => break,
            Response::Sessions(page) => sessions.extend(page),
            other => return Err(unexpected("session list", &req, &other).into()),
        }
    }
    if ctx.json() {
        output::json_success(ListJson { sessions: &sessions });
    } else {
        render(&sessions).print();
    }
    Ok(())
}

/// One row per file; a session without files gets one row with `-`.
fn render(sessions: &[SessionInfo]) -> Text {
    let mut t = Text::new();
    if sessions.is_empty() {
        t.line("no sessions");
        return t;
    }
    let mut rows = Vec::new();
    for s in sessions {
        let dir = if s.incoming { "incoming" } else { "outgoing" };
        if s.files.is_empty() {
            rows.push(vec![
                s.name.clone(),
                s.owner_uid.to_string(),
                "-".into(),
                "-".into(),
                dir.into(),
            ]);
        }
        for f in &s.files {
            let state = match (s.incoming, f.retrieved) {
                (true, true) => "incoming, retrieved",
                (true, false) => "incoming",
                (false, _) => "outgoing",
            };
            rows.push(vec![
                s.name.clone(),
                s.owner_uid.to_string(),
                f.token.to_string(),
                output::bytes(f.size),
                state.into(),
            ]);
        }
    }
    t.table("", &["SESSION", "OWNER", "TOKEN", "SIZE", "STATE"], &rows);
    t
}
