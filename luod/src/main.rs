//! luod: the live-update daemon.
//!
//! Exit status: 0 after SIGTERM/SIGINT, 1 when it cannot start (the message
//! says why), 2 on bad arguments or a bad configuration file, 75 after a
//! simulated kexec (`--backend file`): the record is in the region, start
//! luod again on it. `--check-config`: 0 when the configuration is valid, 2
//! when not.

mod backend;
mod config;
mod peer;
mod server;

use luod::args;
use std::process::ExitCode;

/// Raises the soft open-file limit to the hard one: luod and its holder keep
/// a descriptor per preserved file and session (thousands on a busy host).
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    backend::mark_start();
    let loaded = match config::load(std::env::args_os().collect()) {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            let argv: Vec<_> = std::env::args_os().collect();
            if argv.iter().any(|a| a == "--check-config") && argv.iter().any(|a| a == "--json") {
                println!("{}", serde_json::json!({"ok": false, "error": e.to_string()}));
            }
            eprintln!("luod: {e}");
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let args = &loaded.args;
    if args.check_config {
        if args.json {
            println!("{}", loaded.json());
        } else {
            print!("{}", loaded.render());
        }
        return ExitCode::SUCCESS;
    }
    raise_nofile_limit();
    if let Some(path) = &args.holder {
        // The fd holder: a separate process so that preserved files outlive
        // a crash of luod (see liveupdate::holder). Named as a forked one is.
        let _ = nix::sys::prctl::set_name(c"luod-holder");
        return match liveupdate::holder::run_holder(path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("luod fd holder: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LUOD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::debug!("luod main after {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    match server::run(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("luod: {e}");
            ExitCode::FAILURE
        }
    }
}
