//! `luoctl check`: preflight. Changes nothing; exits 3 when `prepare` would
//! be refused.

use super::prepare::KernelArgs;
use super::{Ctx, Failed, unexpected};
use crate::error::Failure;
use crate::exit::ExitCode;
use crate::output::{self, Details, Text};
use liveupdate::protocol::{CheckItem, CheckReport, Request, Response};
use serde::Serialize;
use std::os::fd::{AsFd, BorrowedFd};

/// `check`'s options: the same target kernel `prepare` would get.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The target kernel to check.
    #[command(flatten)]
    pub kernel: KernelArgs,
}

/// `check --json`: `{"ok": ..., "items": [...], "already_on_target": ...}`.
#[derive(Debug, Serialize)]
struct ItemsJson<'a> {
    items: &'a [CheckItem],
    already_on_target: bool,
}

/// Asks luod what `prepare` would find and prints every item.
pub fn run(args: &CheckArgs, ctx: &Ctx) -> Result<(), Failed> {
    let (args, files) = args.kernel.open("check")?;
    let req = Request::Check(args);
    let fds: Vec<BorrowedFd<'_>> = files.iter().map(|f| f.as_fd()).collect();
    let report = match ctx.call_fds("check", &req, &fds)? {
        (Response::Check(r), _) => r,
        (other, _) => return Err(unexpected("check", &req, &other).into()),
    };
    if report.already_on_target {
        // Before anything else: a rolling update skips this host, whatever
        // else check found.
        if !ctx.json() {
            render(&report).print();
        }
        let detail = report
            .items
            .iter()
            .find(|i| i.name == "running kernel")
            .map(|i| i.detail.clone())
            .unwrap_or_default();
        return Err(Failed {
            failure: Failure::new(
                "check",
                ExitCode::AlreadyOnTarget,
                format!("already on target: {detail}"),
            )
            .with_hint("nothing to update on this host"),
            details: Details {
                items: Some(report.items),
                already_on_target: Some(true),
            },
        });
    }
    if report.ok {
        if ctx.json() {
            // CheckReport's own `ok` is the top-level `ok`.
            output::json_success(ItemsJson {
                items: &report.items,
                already_on_target: false,
            });
        } else {
            let mut t = render(&report);
            t.line("check: prepare would be allowed");
            t.print();
        }
        return Ok(());
    }
    if !ctx.json() {
        render(&report).print();
    }
    Err(Failed {
        failure: failure(&report),
        details: Details {
            items: Some(report.items),
            already_on_target: Some(false),
        },
    })
}

/// One line per item: `ok` or `FAIL`, name, detail.
fn render(r: &CheckReport) -> Text {
    let rows: Vec<Vec<String>> = r
        .items
        .iter()
        .map(|i| {
            vec![
                if i.ok { "ok" } else { "FAIL" }.to_string(),
                i.name.clone(),
                i.detail.clone(),
            ]
        })
        .collect();
    let mut t = Text::new();
    t.table("", &["RESULT", "CHECK", "DETAIL"], &rows);
    t
}

/// The failure of a check that found problems: each failed item, named.
fn failure(r: &CheckReport) -> Failure {
    let failed: Vec<String> = r
        .items
        .iter()
        .filter(|i| !i.ok)
        .map(|i| format!("{}: {}", i.name, i.detail))
        .collect();
    let message = match failed.len() {
        0 => "prepare would be refused".to_string(),
        n => format!(
            "prepare would be refused ({} of {} checks failed): {}",
            n,
            r.items.len(),
            failed.join("; ")
        ),
    };
    Failure::new("check", ExitCode::CheckFailed, message).with_hint("fix what failed, then check again")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_names_each_failed_item() {
        let r = CheckReport {
            ok: false,
            items: vec![
                CheckItem {
                    name: "state".into(),
                    ok: true,
                    detail: "normal: prepare is allowed".into(),
                },
                CheckItem {
                    name: "privilege".into(),
                    ok: false,
                    detail: "transitions need root or CAP_SYS_BOOT".into(),
                },
            ],
            already_on_target: false,
        };
        let f = failure(&r);
        assert_eq!(f.code, ExitCode::CheckFailed);
        assert_eq!(
            f.line(),
            "luoctl: check: prepare would be refused (1 of 2 checks failed): privilege: transitions need root or \
             CAP_SYS_BOOT; fix what failed, then check again"
        );
    }
}
