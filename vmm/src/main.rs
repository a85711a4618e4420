//! `luo-test-vmm`: run a tiny KVM guest; pause it, save its state, and
//! continue it in a fresh process. Every result line starts with `VMM: `.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use luo_test_vmm::{DEFAULT_PROGRESS_EVERY, DEFAULT_RAM_SIZE, RunReport, Vm, VmError, create_ram_memfd, hex, state};

#[derive(Debug, Parser)]
#[command(
    name = "luo-test-vmm",
    version,
    about = "A small KVM VMM whose guest survives a live update"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open /dev/kvm and create a VM with RAM and a vCPU; print what works.
    Check,
    /// Boot the guest and run it for a while; print the counter.
    Run {
        /// How long to run.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Boot the guest, run it, pause it; write the vCPU state and the RAM.
    PauseSave {
        /// How long to run before pausing.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Where to write the state blob.
        #[arg(long)]
        state: PathBuf,
        /// Guest RAM: a PATH gets a copy of RAM at the pause; `fd:N` uses the
        /// inherited fd N (a memfd) as the RAM itself and writes no copy.
        #[arg(long)]
        ram: RamArg,
        /// Do not put the SHA-256 of RAM in the state (saves a pass over RAM).
        #[arg(long)]
        no_ram_checksum: bool,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Restore a paused guest in this fresh process and continue it.
    RestoreRun {
        /// The state blob written by pause-save.
        #[arg(long)]
        state: PathBuf,
        /// Guest RAM: a PATH is copied into a new memfd; `fd:N` is used as is.
        #[arg(long)]
        ram: RamArg,
        /// How long to run after the restore.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Skip the RAM checks before resuming (they add to the blackout).
        #[arg(long)]
        no_verify: bool,
        /// Pause again at the end and write the state here (for another hop).
        #[arg(long, requires = "ram_out")]
        state_out: Option<PathBuf>,
        /// With --state-out: where to copy RAM (PATH) or `fd:N` if the RAM stays in the memfd.
        #[arg(long, requires = "state_out")]
        ram_out: Option<RamArg>,
    },
    /// Pause and resume the guest in this process several times (the
    /// cancel/unfreeze path) and report each blackout.
    Cycle {
        /// Run time between pauses.
        #[arg(long, default_value_t = 0.5)]
        seconds: f64,
        /// How many pause/resume cycles.
        #[arg(long, default_value_t = 3)]
        pauses: u32,
        /// How long each pause lasts, in milliseconds.
        #[arg(long, default_value_t = 100)]
        pause_ms: u64,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Decode a state blob and print it.
    ShowState {
        /// The state blob.
        #[arg(long)]
        state: PathBuf,
    },
}

#[derive(Debug, Args)]
struct GuestArgs {
    /// Guest RAM size (bytes, or with K/M/G suffix), a multiple of 4 KiB.
    #[arg(long, default_value = "2M", value_parser = parse_size)]
    ram_size: usize,
    /// A progress exit every this many guest iterations (a power of two).
    #[arg(long, default_value_t = DEFAULT_PROGRESS_EVERY)]
    progress_every: u64,
}

/// Guest RAM on the command line: a file path, or `fd:N` for an inherited fd.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RamArg {
    Path(PathBuf),
    Fd(RawFd),
}

impl FromStr for RamArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("fd:") {
            Some(n) => match n.parse::<RawFd>() {
                Ok(fd) if fd >= 0 => Ok(RamArg::Fd(fd)),
                _ => Err(format!("`{s}`: fd:N needs a file descriptor number")),
            },
            None if s.is_empty() => Err("empty path".into()),
            None => Ok(RamArg::Path(s.into())),
        }
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.trim_end_matches("iB").trim_end_matches('B') {
        x if x.ends_with(['k', 'K']) => (&x[..x.len() - 1], 1usize << 10),
        x if x.ends_with(['m', 'M']) => (&x[..x.len() - 1], 1 << 20),
        x if x.ends_with(['g', 'G']) => (&x[..x.len() - 1], 1 << 30),
        x => (x, 1),
    };
    let n: usize = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 2097152, 2M, 4MiB)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

fn secs(s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|_| format!("--seconds {s} is not a duration"))
}

/// Takes ownership of inherited fd `fd` after checking it is open.
fn inherited_fd(fd: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: F_GETFD only queries the descriptor table; an invalid fd gives EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("fd {fd} is not open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is open (checked above) and was handed to this process for
    // it to use as guest RAM; nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ram_for_boot(ram: &RamArg, size: usize) -> Result<OwnedFd, String> {
    match ram {
        RamArg::Path(_) => create_ram_memfd("luo-test-vmm-ram", size).map_err(|e| format!("memfd_create: {e}")),
        RamArg::Fd(n) => {
            let fd = inherited_fd(*n)?;
            let len = File::from(fd.try_clone().map_err(|e| e.to_string())?)
                .metadata()
                .map_err(|e| e.to_string())?
                .len();
            if len < size as u64 {
                nix::unistd::ftruncate(&fd, size as i64).map_err(|e| format!("growing fd {n} to {size}: {e}"))?;
            }
            Ok(fd)
        }
    }
}

fn write_ram_copy(vm: &Vm, ram: &RamArg) -> Result<(), String> {
    if let RamArg::Path(p) = ram {
        std::fs::write(p, vm.ram()).map_err(|e| format!("writing RAM to {}: {e}", p.display()))?;
        println!("VMM: ram copied to {} bytes={}", p.display(), vm.ram_size());
    }
    Ok(())
}

fn stamp_ns(s: Option<luo_test_vmm::Stamp>) -> String {
    s.map_or("none".into(), |s| s.realtime_ns.to_string())
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn print_run(what: &str, r: &RunReport) {
    println!(
        "VMM: {what} stopped_by={:?} counter_start={} counter_end={} progress_exits={} rate={:.0}/s last_progress_ns={}",
        r.stopped_by,
        r.counter_start,
        r.counter_end,
        r.progress_exits,
        r.rate(),
        stamp_ns(r.last_progress),
    );
}

fn boot(guest: &GuestArgs, ram: OwnedFd) -> Result<Vm, VmError> {
    let mut vm = Vm::new(ram, guest.ram_size)?;
    vm.boot(guest.progress_every)?;
    println!(
        "VMM: booted ram_size={} progress_every={} static_sha256={}",
        vm.ram_size(),
        guest.progress_every,
        hex(&vm.boot_static_checksum())
    );
    Ok(vm)
}

/// Runs on a vCPU thread for `d`, then pauses through the kick signal.
/// With `watch`, prints a `VMM: first-progress` line as soon as the guest
/// makes progress (polling every millisecond), so a harness that timestamps
/// serial lines gets the end of the blackout without waiting for the run.
fn run_then_pause(vm: Vm, d: Duration, watch: bool) -> Result<(Vm, RunReport, Duration), VmError> {
    let running = vm.spawn();
    let end = Instant::now() + d;
    if watch {
        while Instant::now() < end && !running.is_finished() {
            if let Some(p) = running.pauser().progress().first_this_run {
                println!(
                    "VMM: first-progress counter={} realtime_ns={} tsc={}",
                    p.counter, p.realtime_ns, p.tsc
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    while Instant::now() < end && !running.is_finished() {
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    let t = Instant::now();
    let (vm, r) = running.pause()?;
    Ok((vm, r, t.elapsed()))
}

fn save(vm: &Vm, state_path: &PathBuf, ram: &RamArg, checksum: bool) -> Result<(), String> {
    let t = Instant::now();
    let blob = vm.save_state(checksum).map_err(|e| e.to_string())?;
    let save_time = t.elapsed();
    std::fs::write(state_path, &blob).map_err(|e| format!("writing {}: {e}", state_path.display()))?;
    let st = state::decode(&blob).map_err(|e| e.to_string())?;
    println!(
        "VMM: paused counter={} generation={} last_progress_ns={} paused_ns={} ram_sha256={} state_bytes={} save_ms={}",
        st.counter,
        st.generation,
        stamp_ns(st.last_progress),
        st.paused_realtime_ns,
        st.ram_sha256.map_or("none".into(), |d| hex(&d)),
        blob.len(),
        ms(save_time),
    );
    write_ram_copy(vm, ram)
}

fn cmd_check() -> Result<bool, String> {
    let ram = create_ram_memfd("luo-test-vmm-check", DEFAULT_RAM_SIZE).map_err(|e| e.to_string())?;
    let vm = Vm::new(ram, DEFAULT_RAM_SIZE).map_err(|e| e.to_string())?;
    println!(
        "VMM: check kvm_api={} create_vm=ok memory_region=ok vcpu=ok ram_size={}",
        vm.kvm_api_version(),
        vm.ram_size()
    );
    Ok(true)
}

fn cmd_run(seconds: f64, guest: &GuestArgs) -> Result<bool, String> {
    let ram = create_ram_memfd("luo-test-vmm-ram", guest.ram_size).map_err(|e| e.to_string())?;
    let mut vm = boot(guest, ram).map_err(|e| e.to_string())?;
    let r = vm
        .run_until(Some(Instant::now() + secs(seconds)?))
        .map_err(|e| e.to_string())?;
    print_run("run", &r);
    let ring = vm.check_ring();
    let static_ok = vm.static_checksum() == vm.boot_static_checksum();
    println!(
        "VMM: counter={} ram_sha256={} static_match={} ring={}",
        vm.counter(),
        hex(&vm.ram_checksum()),
        yes(static_ok),
        ring.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())
    );
    Ok(ring.is_ok() && static_ok && r.counter_end > 0)
}

fn cmd_pause_save(
    seconds: f64,
    state_path: &PathBuf,
    ram: &RamArg,
    no_sum: bool,
    g: &GuestArgs,
) -> Result<bool, String> {
    let fd = ram_for_boot(ram, g.ram_size)?;
    let vm = boot(g, fd).map_err(|e| e.to_string())?;
    let (vm, r, latency) = run_then_pause(vm, secs(seconds)?, false).map_err(|e| e.to_string())?;
    print_run("run", &r);
    println!("VMM: pause_latency_ms={}", ms(latency));
    let ring = vm.check_ring();
    if let Err(e) = &ring {
        println!("VMM: FAIL {e}");
    }
    save(&vm, state_path, ram, !no_sum)?;
    Ok(ring.is_ok() && r.counter_end > 0)
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn cmd_restore_run(
    state_path: &PathBuf,
    ram: &RamArg,
    seconds: f64,
    no_verify: bool,
    out: Option<(&PathBuf, &RamArg)>,
) -> Result<bool, String> {
    let t0 = Instant::now();
    let blob = std::fs::read(state_path).map_err(|e| format!("reading {}: {e}", state_path.display()))?;
    let st = state::decode(&blob).map_err(|e| e.to_string())?;
    let fd = match ram {
        RamArg::Fd(n) => inherited_fd(*n)?,
        RamArg::Path(p) => {
            let content = std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            if content.len() as u64 != st.ram_size {
                return Err(format!(
                    "{} has {} bytes, the state says RAM is {}",
                    p.display(),
                    content.len(),
                    st.ram_size
                ));
            }
            let fd = create_ram_memfd("luo-test-vmm-ram", content.len()).map_err(|e| e.to_string())?;
            let f = File::from(fd);
            f.write_all_at(&content, 0)
                .map_err(|e| format!("filling the memfd: {e}"))?;
            f.into()
        }
    };
    let vm = Vm::restore(fd, &blob).map_err(|e| e.to_string())?;
    let restored_ns = luo_test_vmm::realtime_ns();
    let mut ok = true;
    if !no_verify {
        let t = Instant::now();
        let v = vm.verify_restored_ram();
        println!(
            "VMM: restored counter={} generation={} ram_sha256={} ram_match={} verify_ms={}",
            vm.counter(),
            vm.generation(),
            match &v {
                Ok(Some(d)) => hex(d),
                _ => "none".into(),
            },
            match &v {
                Ok(Some(_)) => "yes".into(),
                Ok(None) => "unknown".into(),
                Err(e) => format!("no ({e})"),
            },
            ms(t.elapsed())
        );
        ok &= v.is_ok();
        if !ok {
            return Ok(false);
        }
    } else {
        println!(
            "VMM: restored counter={} generation={} (not verified)",
            vm.counter(),
            vm.generation()
        );
    }
    println!(
        "VMM: restore_ms={} (read state and RAM, KVM setup, checks)",
        ms(t0.elapsed())
    );
    let (vm, r, latency) = run_then_pause(vm, secs(seconds)?, true).map_err(|e| e.to_string())?;
    println!("VMM: pause_latency_ms={}", ms(latency));
    print_run("run", &r);
    let before = st.counter;
    let first = r.first_progress.map(|s| s.counter);
    let after = r.counter_end;
    let increasing = first.is_some_and(|f| f > before) && after >= first.unwrap_or(0);
    let static_ok = vm.static_checksum() == vm.boot_static_checksum();
    let ring = vm.check_ring();
    let blackout = r.blackout();
    let tsc_hz = r.tsc_hz();
    println!(
        "VMM: resumed counter_before={before} first_progress_counter={} counter_after={after} increasing={} \
         static_match={} ring={} blackout_ms={} blackout_tsc_ms={} tsc_hz={} pause_to_restore_ms={} \
         restore_to_first_progress_ms={}",
        first.map_or("none".into(), |f| f.to_string()),
        yes(increasing),
        yes(static_ok),
        ring.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()),
        blackout.map_or("none".into(), ms),
        tsc_hz.and_then(|hz| r.blackout_tsc(hz)).map_or("none".into(), ms),
        tsc_hz.map_or("none".into(), |hz| format!("{hz:.0}")),
        ms(Duration::from_nanos(restored_ns.saturating_sub(st.paused_realtime_ns))),
        r.first_progress.map_or("none".into(), |s| ms(Duration::from_nanos(
            s.realtime_ns.saturating_sub(restored_ns)
        ))),
    );
    ok &= increasing && static_ok && ring.is_ok() && blackout.is_some();
    if let Some((sp, rp)) = out {
        save(&vm, sp, rp, true)?;
    }
    Ok(ok)
}

fn cmd_cycle(seconds: f64, pauses: u32, pause_ms: u64, g: &GuestArgs) -> Result<bool, String> {
    let ram = create_ram_memfd("luo-test-vmm-ram", g.ram_size).map_err(|e| e.to_string())?;
    let mut vm = boot(g, ram).map_err(|e| e.to_string())?;
    let mut ok = true;
    for i in 0..=pauses {
        let (v, r, latency) = run_then_pause(vm, secs(seconds)?, false).map_err(|e| e.to_string())?;
        vm = v;
        let increasing = r.first_progress.is_some_and(|f| f.counter > r.counter_start);
        ok &= increasing && vm.check_ring().is_ok();
        println!(
            "VMM: cycle {i} counter_start={} counter_end={} increasing={} blackout_ms={} pause_latency_ms={}",
            r.counter_start,
            r.counter_end,
            yes(increasing),
            r.blackout().map_or("none".into(), ms),
            ms(latency),
        );
        if i < pauses {
            std::thread::sleep(Duration::from_millis(pause_ms));
        }
    }
    Ok(ok)
}

fn cmd_show_state(path: &PathBuf) -> Result<bool, String> {
    let blob = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let st = state::decode(&blob).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "VMM: state version={} bytes={}", state::STATE_VERSION, blob.len()).map_err(|e| e.to_string())?;
    writeln!(out, "{st:#?}").map_err(|e| e.to_string())?;
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Check => cmd_check(),
        Cmd::Run { seconds, guest } => cmd_run(*seconds, guest),
        Cmd::PauseSave {
            seconds,
            state,
            ram,
            no_ram_checksum,
            guest,
        } => cmd_pause_save(*seconds, state, ram, *no_ram_checksum, guest),
        Cmd::RestoreRun {
            state,
            ram,
            seconds,
            no_verify,
            state_out,
            ram_out,
        } => cmd_restore_run(
            state,
            ram,
            *seconds,
            *no_verify,
            state_out.as_ref().zip(ram_out.as_ref()),
        ),
        Cmd::Cycle {
            seconds,
            pauses,
            pause_ms,
            guest,
        } => cmd_cycle(*seconds, *pauses, *pause_ms, guest),
        Cmd::ShowState { state } => cmd_show_state(state),
    };
    match res {
        Ok(true) => {
            println!("VMM: result ok");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("VMM: result FAIL");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("luo-test-vmm: error: {e}");
            println!("VMM: result ERROR {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ram_arg_parses() {
        assert_eq!("fd:3".parse(), Ok(RamArg::Fd(3)));
        assert_eq!("/tmp/ram".parse(), Ok(RamArg::Path("/tmp/ram".into())));
        assert!("fd:x".parse::<RamArg>().is_err());
        assert!("fd:-1".parse::<RamArg>().is_err());
        assert!("".parse::<RamArg>().is_err());
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2097152"), Ok(2 << 20));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("two").is_err());
    }

    #[test]
    fn subcommands_parse() {
        let c = Cli::try_parse_from(["luo-test-vmm", "run", "--seconds", "3", "--progress-every", "1024"]).unwrap();
        assert!(
            matches!(c.cmd, Cmd::Run { seconds, guest: GuestArgs { progress_every: 1024, ram_size } }
            if seconds == 3.0 && ram_size == DEFAULT_RAM_SIZE)
        );
        let c = Cli::try_parse_from(["luo-test-vmm", "pause-save", "--state", "s", "--ram", "fd:5"]).unwrap();
        assert!(matches!(c.cmd, Cmd::PauseSave { ram: RamArg::Fd(5), .. }));
        let c = Cli::try_parse_from(["luo-test-vmm", "restore-run", "--state", "s", "--ram", "r"]).unwrap();
        assert!(matches!(c.cmd, Cmd::RestoreRun { state_out: None, .. }));
        assert!(
            Cli::try_parse_from([
                "luo-test-vmm",
                "restore-run",
                "--state",
                "s",
                "--ram",
                "r",
                "--state-out",
                "x"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["luo-test-vmm", "pause-save", "--state", "s"]).is_err());
    }
}
