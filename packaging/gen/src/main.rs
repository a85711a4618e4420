//! luo-gen-docs: renders luod's and luoctl's man pages (clap_mangen) and
//! their bash, zsh and fish completions (clap_complete) from the clap
//! definitions the binaries parse with (`luod::command`, `luoctl::command`),
//! so the package's documentation of the options cannot drift from them.
//!
//! Output, under `--out DIR`:
//! - `man/luod.8`, `man/luoctl.8`, and `man/luoctl-COMMAND[-SUB].8` for each
//!   luoctl command;
//! - `completions/bash/{luod,luoctl}`, `completions/zsh/{_luod,_luoctl}`,
//!   `completions/fish/{luod,luoctl}.fish`.

use clap::Parser;
use clap_complete::Shell;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Render luod's and luoctl's man pages and shell completions.
#[derive(Debug, Parser)]
#[command(name = "luo-gen-docs", version)]
struct Args {
    /// The directory to write `man/` and `completions/` into (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// The package version the man pages name in their footer.
    #[arg(long, value_name = "VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    package_version: String,
    /// The date the man pages show (YYYY-MM-DD; the build script passes the
    /// commit's date, so the pages are reproducible).
    #[arg(long, value_name = "DATE")]
    date: String,
}

/// The man page section of both commands: system administration.
const SECTION: &str = "8";

fn main() -> ExitCode {
    let args = Args::parse();
    match generate(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luo-gen-docs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate(args: &Args) -> Result<(), String> {
    let man = args.out.join("man");
    mkdir(&man)?;
    for cmd in [luod::command(), luoctl::command()] {
        let mut cmd = cmd.disable_help_subcommand(true);
        cmd.build();
        man_pages(&cmd, &man, args)?;
    }
    for (shell, dir) in [(Shell::Bash, "bash"), (Shell::Zsh, "zsh"), (Shell::Fish, "fish")] {
        let dir = args.out.join("completions").join(dir);
        mkdir(&dir)?;
        for mut cmd in [luod::command(), luoctl::command()] {
            let name = cmd.get_name().to_string();
            let file = match shell {
                Shell::Zsh => format!("_{name}"),
                Shell::Fish => format!("{name}.fish"),
                _ => name.clone(),
            };
            write(&dir.join(file), |w| {
                clap_complete::generate(shell, &mut cmd, &name, w);
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Writes the man page of `cmd` and, recursively, of each of its visible
/// subcommands (`luoctl-session-create.8`, named by clap's display name).
fn man_pages(cmd: &clap::Command, dir: &Path, args: &Args) -> Result<(), String> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, dir, args)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .date(args.date.clone())
        .source(format!("liveupdate {}", args.package_version))
        .manual("System Administration");
    write(&dir.join(page.get_filename()), |w| page.render(w))
}

fn mkdir(dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn write(path: &Path, body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut w = BufWriter::new(File::create(path).map_err(fail)?);
    body(&mut w).map_err(fail)?;
    w.flush().map_err(fail)
}
