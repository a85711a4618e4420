//! `luoctl session create NAME`.

use super::super::{Ctx, Failed, unexpected};
use crate::output;
use liveupdate::protocol::{Request, Response};
use serde::Serialize;

/// `session create`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Session name (1 to 63 bytes, no '/'; unique on the host).
    pub name: String,
}

/// `session create --json`: `{"ok": true, "session": NAME}`.
#[derive(Debug, Serialize)]
pub struct SessionJson<'a> {
    /// The session's name.
    pub session: &'a str,
}

/// Asks luod to create the session.
pub fn run(args: &CreateArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = format!("session create {}", args.name);
    let req = Request::SessionCreate {
        name: args.name.clone(),
    };
    match ctx.call(&what, &req)? {
        Response::Done => {}
        other => return Err(unexpected(&what, &req, &other).into()),
    }
    if ctx.json() {
        output::json_success(SessionJson { session: &args.name });
    } else {
        output::print(&format!("created session {}\n", args.name));
    }
    Ok(())
}
