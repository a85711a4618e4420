//! luoctl: the command-line client of luod.
//!
//! Parses the command line, runs one command, prints its result (human text,
//! or one JSON object with `--json`), and exits with an [`exit::ExitCode`].
//! The commands live in [`commands`], one file each.

use luoctl::{commands, error, exit, output};

use clap::Parser;
use clap::error::ErrorKind as ClapErrorKind;
use commands::{Cli, Ctx, usage_failure};
use exit::ExitCode;
use output::Mode;

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage(&e).into(),
    };
    let ctx = Ctx::new(&cli.global);
    match cli.command.run(&ctx) {
        Ok(()) => ExitCode::Success.into(),
        Err(failed) => {
            output::report_failure(ctx.mode, &failed.failure, &failed.details);
            failed.failure.code.into()
        }
    }
}

/// Reports a command line clap refused (or `--help`/`--version`).
fn usage(e: &clap::Error) -> ExitCode {
    match e.kind() {
        ClapErrorKind::DisplayHelp | ClapErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::Success
        }
        // `luoctl` alone, `luoctl session`: the help is the useful answer,
        // unless the caller asked for JSON.
        ClapErrorKind::DisplayHelpOnMissingArgumentOrSubcommand if !json_requested() => {
            let _ = e.print();
            ExitCode::Usage
        }
        ClapErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            output::report_failure(Mode::Json, &missing_subcommand(e), &output::Details::default());
            ExitCode::Usage
        }
        _ => {
            let mode = if json_requested() { Mode::Json } else { Mode::Human };
            output::report_failure(mode, &usage_failure(e), &output::Details::default());
            ExitCode::Usage
        }
    }
}

/// True when `--json` is on the command line (looked for by hand: the
/// arguments did not parse).
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// The usage failure for a command group given without its subcommand
/// (`luoctl --json session`), from the help clap rendered.
fn missing_subcommand(e: &clap::Error) -> error::Failure {
    let help = e.render().to_string();
    let usage = help
        .lines()
        .find_map(|l| l.strip_prefix("Usage: "))
        .unwrap_or("luoctl <COMMAND>")
        .trim()
        .to_string();
    let command = usage
        .split(" [")
        .next()
        .unwrap_or(&usage)
        .split(" <")
        .next()
        .unwrap_or(&usage);
    let subcommands: Vec<&str> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    error::Failure::new(
        "command line",
        ExitCode::Usage,
        format!("{command} needs a subcommand: {}", subcommands.join(", ")),
    )
    .with_hint(format!("usage: {usage}"))
}
