//! `luoctl session evict NAME`: root releases another uid's session.

use super::super::{Ctx, Failed, unexpected};
use super::create::SessionJson;
use crate::output;
use liveupdate::protocol::{Request, Response};

/// `session evict`'s arguments.
#[derive(Debug, clap::Args)]
pub struct EvictArgs {
    /// Session name (any owner's).
    pub name: String,
}

/// Asks luod to evict the session.
pub fn run(args: &EvictArgs, ctx: &Ctx) -> Result<(), Failed> {
    let what = format!("session evict {}", args.name);
    let req = Request::SessionEvict {
        name: args.name.clone(),
    };
    match ctx.call(&what, &req)? {
        Response::Done => {}
        other => return Err(unexpected(&what, &req, &other).into()),
    }
    if ctx.json() {
        output::json_success(SessionJson { session: &args.name });
    } else {
        output::print(&format!(
            "evicted session {} (recorded; `luoctl history` shows it)\n",
            args.name
        ));
    }
    Ok(())
}
