//! `luoctl session evict NAME`: root releases another uid's session.

use super::super::{Ctx, Failed};
use liveupdate::protocol::Request;

/// `session evict`'s arguments.
#[derive(Debug, clap::Args)]
pub struct EvictArgs {
    /// Session name (any owner's).
    pub name: String,
}

/// Asks luod to evict the session.
pub fn run(args: &EvictArgs, ctx: &Ctx) -> Result<(), Failed> {
    let req = Request::SessionEvict {
        name: args.name.clone(),
    };
    let what = format!("session evict {}", args.name);
    let done = format!("evicted session {} (recorded; `luoctl history` shows it)", args.name);
    super::session_request(ctx, &what, req, &args.name, &done)
}
