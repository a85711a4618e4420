//! luoctl: the command-line client of luod.
//!
//! Parses the command line, runs one command, prints its result (human text,
//! or one JSON object with `--json`), and exits with an [`exit::ExitCode`].
//! The commands live in [`commands`], one file each.

mod commands;
mod error;
mod exit;
mod output;
mod progress;

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
        // `luoctl` alone, `luoctl session`: the help is the useful answer.
        ClapErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::Usage
        }
        _ => {
            // The arguments did not parse, so look for --json by hand.
            let json = std::env::args_os()
                .skip(1)
                .take_while(|a| a != "--")
                .any(|a| a == "--json");
            let mode = if json { Mode::Json } else { Mode::Human };
            output::report_failure(mode, &usage_failure(e), &output::Details::default());
            ExitCode::Usage
        }
    }
}
