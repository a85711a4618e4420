//! `luoctl session finish NAME`.

use super::super::{Ctx, Failed, unexpected};
use super::create::SessionJson;
use crate::output;
use liveupdate::protocol::{Request, Response};

/// `session finish`'s arguments.
#[derive(Debug, clap::Args)]
pub struct FinishArgs {
    /// Session name.
    pub name: String,
}

/// Asks luod to close the session.
pub fn run(args: &FinishArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = format!("session finish {}", args.name);
    let req = Request::SessionFinish {
        name: args.name.clone(),
    };
    match ctx.call(&what, &req)? {
        Response::Done => {}
        other => return Err(unexpected(&what, &req, &other).into()),
    }
    if ctx.json() {
        output::json_success(SessionJson { session: &args.name });
    } else {
        output::print(&format!("finished session {}\n", args.name));
    }
    Ok(())
}
