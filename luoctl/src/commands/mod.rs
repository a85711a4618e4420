//! The command line: global options, one module per subcommand, and the
//! context every command runs with.

pub mod cancel;
pub mod check;
pub mod discard_record;
#[cfg(test)]
mod fake;
pub mod finish;
pub mod freeze;
pub mod history;
pub mod prepare;
pub mod reboot;
pub mod session;
pub mod status;
pub mod vm;

use crate::error::Failure;
use crate::exit::ExitCode;
use crate::output::{self, Details, Mode, Text};
use clap::{Args, Parser, Subcommand};
use liveupdate::protocol::client::Client;
use liveupdate::protocol::{DEFAULT_SOCKET, Request, Response, TransitionReport};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// Drive Linux kernel live updates through luod.
///
/// A cycle is `prepare`, `freeze`, `reboot`, then `finish` in the new kernel,
/// or `cancel` before the reboot. Exit codes and JSON shapes are stable; see
/// CLI.md.
#[derive(Debug, Parser)]
#[command(name = "luoctl", version, propagate_version = true)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// luod's socket.
    #[arg(long, global = true, value_name = "PATH", env = "LUOD_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Print the result, or the error, as one JSON object on stdout.
    #[arg(long, global = true)]
    pub json: bool,

    /// Seconds to wait for each of luod's answers, instead of the default
    /// for the request's kind (reads 10, check 120, changes 600); 1 to 86400.
    #[arg(long, global = true, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout: Option<u64>,
}

/// How long luoctl waits for the answer to a read (and for luod's hello):
/// luod answers reads from a snapshot, without waiting for a change.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long luoctl waits for `check` (luod reads the kernel image whole).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long luoctl waits for a change (a transition calls every subsystem
/// and VM, each with its own timeout; a session change waits for one in
/// progress).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(600);

/// luoctl's timeout for the answer to `req`.
pub fn timeout_for(req: &Request) -> Duration {
    match req {
        Request::Hello { .. }
        | Request::Status
        | Request::History
        | Request::SessionList
        | Request::SessionListFrom { .. }
        | Request::VmList => READ_TIMEOUT,
        Request::Check(_) => CHECK_TIMEOUT,
        _ => CHANGE_TIMEOUT,
    }
}

/// luoctl's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the state, sessions, subsystems and the last cycle.
    Status(status::StatusArgs),
    /// Preflight: would `prepare` succeed (exit 3 if not)? Is --kernel the running kernel already (exit 9)? Changes nothing.
    Check(check::CheckArgs),
    /// Start a cycle: load the target kernel, prepare every subsystem (normal -> prepared).
    Prepare(prepare::PrepareCmd),
    /// Quiesce workloads and write the final record (prepared -> frozen); the blackout begins.
    Freeze(freeze::FreezeArgs),
    /// Kexec into the target kernel (frozen -> updated); freezes first when prepared.
    Reboot(reboot::RebootArgs),
    /// Close the cycle in the new kernel (updated -> normal).
    Finish(finish::FinishArgs),
    /// Abandon the cycle before the reboot (prepared|frozen -> normal).
    Cancel(cancel::CancelArgs),
    /// Show past cycles.
    History(history::HistoryArgs),
    /// Create sessions and preserve, retrieve or finish their files.
    #[command(subcommand)]
    Session(session::SessionCommand),
    /// VMs registered by VMMs.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Give up a handover record luod cannot read, and the files it keeps for it; needs --yes.
    DiscardRecord(discard_record::DiscardRecordArgs),
}

impl Command {
    /// Runs the command.
    pub fn run(&self, ctx: &Ctx) -> Result<(), Failed> {
        match self {
            Command::Status(a) => status::run(a, ctx),
            Command::Check(a) => check::run(a, ctx),
            Command::Prepare(a) => prepare::run(a, ctx),
            Command::Freeze(a) => freeze::run(a, ctx),
            Command::Reboot(a) => reboot::run(a, ctx),
            Command::Finish(a) => finish::run(a, ctx),
            Command::Cancel(a) => cancel::run(a, ctx),
            Command::History(a) => history::run(a, ctx),
            Command::Session(c) => c.run(ctx),
            Command::Vm(c) => c.run(ctx),
            Command::DiscardRecord(a) => discard_record::run(a, ctx),
        }
    }
}

/// A failure and what the failed command still reports in JSON beside it
/// (the items of a failed `check`).
#[derive(Debug)]
pub struct Failed {
    /// The failure.
    pub failure: Failure,
    /// Extra top-level JSON fields.
    pub details: Details,
}

impl From<Failure> for Failed {
    fn from(failure: Failure) -> Failed {
        Failed {
            failure,
            details: Details::default(),
        }
    }
}

/// What every command runs with.
#[derive(Debug)]
pub struct Ctx {
    /// luod's socket.
    pub socket: PathBuf,
    /// Human or JSON output.
    pub mode: Mode,
    /// `--timeout`: one timeout for every answer.
    pub timeout: Option<Duration>,
}

impl Ctx {
    /// The context for the parsed global options.
    pub fn new(global: &Global) -> Ctx {
        Ctx {
            socket: global.socket.clone(),
            mode: if global.json { Mode::Json } else { Mode::Human },
            timeout: global.timeout.map(Duration::from_secs),
        }
    }

    /// True with `--json`.
    pub fn json(&self) -> bool {
        self.mode == Mode::Json
    }

    /// Connects to luod; `what` names the operation in the error.
    pub fn connect(&self, what: &str) -> Result<Client, Failure> {
        let name = concat!("luoctl ", env!("CARGO_PKG_VERSION"));
        let hello = self.timeout.unwrap_or(READ_TIMEOUT);
        Client::connect_within(&self.socket, name, Some(hello)).map_err(|e| Failure::client(what, e))
    }

    /// Connects, with the timeout for `req` set for what follows.
    pub fn connect_for(&self, what: &str, req: &Request) -> Result<Client, Failure> {
        let mut c = self.connect(what)?;
        c.set_timeout(Some(self.timeout.unwrap_or_else(|| timeout_for(req))))
            .map_err(|e| Failure::client(what, e))?;
        Ok(c)
    }

    /// Connects, sends `req` and returns luod's answer.
    pub fn call(&self, what: &str, req: &Request) -> Result<Response, Failure> {
        self.connect_for(what, req)?
            .call(req)
            .map_err(|e| Failure::client(what, e))
    }

    /// Like [`Ctx::call`], with file descriptors both ways.
    pub fn call_fds(
        &self,
        what: &str,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>), Failure> {
        self.connect_for(what, req)?
            .call_fds(req, fds)
            .map_err(|e| Failure::client(what, e))
    }
}

/// The failure for an answer that does not fit the request.
pub fn unexpected(what: &str, req: &Request, got: &Response) -> Failure {
    Failure::client(what, liveupdate::protocol::client::unexpected(req, got))
}

/// Sends a transition request and returns its report.
pub fn transition(ctx: &Ctx, what: &str, req: &Request) -> Result<TransitionReport, Failure> {
    match ctx.call(what, req)? {
        Response::Transition(r) => Ok(r),
        other => Err(unexpected(what, req, &other)),
    }
}

/// Prints a transition's report: `prepare: normal -> prepared (...)` and its notes.
pub fn print_transition(ctx: &Ctx, what: &str, r: &TransitionReport) {
    if ctx.json() {
        output::json_success(r);
        return;
    }
    let mut t = Text::new();
    t.line(transition_line(what, r));
    for note in &r.notes {
        t.line(format!("  note: {note}"));
    }
    t.print();
}

/// The one-line summary of a transition.
pub fn transition_line(what: &str, r: &TransitionReport) -> String {
    format!(
        "{what}: {} -> {} (record generation {}; {}, {}, {}; took {})",
        r.from,
        r.to,
        r.generation,
        output::count(r.sessions, "session"),
        output::count(r.files, "file"),
        output::bytes(r.bytes),
        output::duration(r.elapsed_ns),
    )
}

/// Turns a clap parse error into a one-line usage failure.
pub fn usage_failure(err: &clap::Error) -> Failure {
    let rendered = err.render().to_string();
    // The first paragraph says what is wrong (it may list several missing
    // arguments, one per line); the rest is usage text and tips.
    let first: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = first.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message).to_string();
    let message = if message.is_empty() {
        "invalid command line".to_string()
    } else {
        message
    };
    let hint = match rendered.lines().find_map(|l| l.strip_prefix("Usage: ")) {
        Some(usage) => format!("usage: {}", usage.trim()),
        None => "see `luoctl --help`".to_string(),
    };
    Failure::new("command line", ExitCode::Usage, message).with_hint(hint)
}
