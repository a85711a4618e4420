//! `luoctl session ...`: a client's sessions and the files preserved in them.
//!
//! Session names are validated by luod; luoctl passes them through.

pub mod create;
pub mod evict;
pub mod finish;
pub mod list;
pub mod preserve;
pub mod retrieve;

use super::{Ctx, Failed, unexpected};
use crate::output;
use clap::Subcommand;
use liveupdate::protocol::{Request, Response};
use serde::Serialize;
use std::num::IntErrorKind;

/// The session subcommands.
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Create a session owned by your uid (only in state normal).
    Create(create::CreateArgs),
    /// List your sessions and their files.
    List(list::ListArgs),
    /// Copy a file into a new memfd and preserve it under a token (only in state normal).
    Preserve(preserve::PreserveArgs),
    /// After an update, take a preserved file back and write it to a path.
    Retrieve(retrieve::RetrieveArgs),
    /// Close a session: unpreserves its files in normal, discards what was not retrieved in updated (root: any uid's, recorded).
    Finish(finish::FinishArgs),
    /// Root only: release any uid's session and its files, recorded in the history (not while frozen).
    Evict(evict::EvictArgs),
}

impl SessionCommand {
    /// Runs the subcommand.
    pub fn run(&self, ctx: &Ctx) -> Result<(), Failed> {
        match self {
            SessionCommand::Create(a) => create::run(a, ctx),
            SessionCommand::List(a) => list::run(a, ctx),
            SessionCommand::Preserve(a) => preserve::run(a, ctx),
            SessionCommand::Retrieve(a) => retrieve::run(a, ctx),
            SessionCommand::Finish(a) => finish::run(a, ctx),
            SessionCommand::Evict(a) => evict::run(a, ctx),
        }
    }
}

/// Parses a token: a `u64` in decimal (`42`) or hex (`0x2a`).
pub fn parse_token(s: &str) -> Result<u64, String> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    // from_str_radix accepts a leading '+'; a token does not.
    if digits.starts_with('+') {
        return Err(format!(
            "{s:?} is not a token: give a number in decimal (42) or hex (0x2a)"
        ));
    }
    u64::from_str_radix(digits, radix).map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow => format!("{s} is larger than the largest token, 0xffffffffffffffff"),
        IntErrorKind::Empty if radix == 16 => format!("{s:?} has no hex digits after 0x"),
        _ => format!("{s:?} is not a token: give a number in decimal (42) or hex (0x2a)"),
    })
}

#[cfg(test)]
mod tests {
    use super::parse_token;

    #[test]
    fn tokens_are_decimal_or_hex() {
        assert_eq!(parse_token("0"), Ok(0));
        assert_eq!(parse_token("42"), Ok(42));
        assert_eq!(parse_token("0x2a"), Ok(42));
        assert_eq!(parse_token("0X2A"), Ok(42));
        assert_eq!(parse_token("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_token("0xffffffffffffffff"), Ok(u64::MAX));
        assert_eq!(parse_token("007"), Ok(7));
    }

    #[test]
    fn malformed_tokens_say_what_is_accepted() {
        let bad = "is not a token: give a number in decimal (42) or hex (0x2a)";
        assert_eq!(parse_token(""), Err(format!("\"\" {bad}")));
        assert_eq!(parse_token("-1"), Err(format!("\"-1\" {bad}")));
        assert_eq!(parse_token("+1"), Err(format!("\"+1\" {bad}")));
        assert_eq!(parse_token("0x+1"), Err(format!("\"0x+1\" {bad}")));
        assert_eq!(parse_token("12abc"), Err(format!("\"12abc\" {bad}")));
        assert_eq!(parse_token(" 1"), Err(format!("\" 1\" {bad}")));
        assert_eq!(parse_token("0x"), Err("\"0x\" has no hex digits after 0x".to_string()));
        assert_eq!(parse_token("0xg"), Err(format!("\"0xg\" {bad}")));
    }

    #[test]
    fn tokens_beyond_u64_are_refused_as_too_large() {
        assert_eq!(
            parse_token("18446744073709551616"),
            Err("18446744073709551616 is larger than the largest token, 0xffffffffffffffff".to_string())
        );
        assert_eq!(
            parse_token("0x10000000000000000"),
            Err("0x10000000000000000 is larger than the largest token, 0xffffffffffffffff".to_string())
        );
    }
}

/// `session create|finish|evict --json`: `{"ok": true, "session": NAME}`.
#[derive(Debug, Serialize)]
pub struct SessionJson<'a> {
    /// The session's name.
    pub session: &'a str,
}

/// Sends `req`, a request about session `name` that luod answers with
/// `Done`, and reports it: `{"ok": true, "session": NAME}` with `--json`,
/// else `done` (a line of text).
fn session_request(ctx: &Ctx, what: &str, req: Request, name: &str, done: &str) -> Result<(), Failed> {
    match ctx.call(what, &req)? {
        Response::Done => {}
        other => return Err(unexpected(what, &req, &other).into()),
    }
    if ctx.json() {
        output::json_success(SessionJson { session: name });
    } else {
        output::print(&format!("{done}\n"));
    }
    Ok(())
}
