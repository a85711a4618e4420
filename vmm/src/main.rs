//! `luo-test-vmm`: run a tiny KVM guest; pause it, save its state, and
//! continue it in a fresh process. Every result line starts with `VMM: `.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use liveupdate::protocol::client::{Client, ClientError, VmConnection};
use liveupdate::protocol::{DEFAULT_SOCKET, ErrorKind};
use luo_test_vmm::{
    DEFAULT_PROGRESS_EVERY, DEFAULT_RAM_SIZE, RunReport, Vm, VmError, VmStateV1, create_ram_memfd, hex, state,
};

mod service;
use service::{At, Behaviour, Ended, KvmGuest, RAM_TOKEN, clocks, serve_loop, spawn_monitor, stop_monitor};

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
    /// Boot the guest, register it with luod and serve luod's calls
    /// (prepare, freeze: pause and hand over the state, unfreeze/cancel:
    /// resume) until luod closes the connection.
    Serve(ServeArgs),
    /// In the new kernel: claim the VM from luod (its RAM memfd and state),
    /// continue the guest, and report the counter, the RAM check and the blackout.
    Claim(ClaimArgs),
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

#[derive(Debug, Args)]
struct ServeArgs {
    /// luod's socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The VM's name at luod (1 to 60 bytes, no NUL, no '/').
    #[arg(long, value_parser = parse_vm_name)]
    name: String,
    /// Veto every `prepare` with this reason.
    #[arg(long, value_name = "REASON")]
    veto: Option<String>,
    /// Never answer this call (nor any later one); the guest keeps running.
    #[arg(long, value_enum, value_name = "CALL")]
    hang_at: Option<At>,
    /// Exit (status 3) at this call without answering.
    #[arg(long, value_enum, value_name = "CALL", conflicts_with = "hang_at")]
    exit_at: Option<At>,
    /// Do not put the SHA-256 of RAM in the state at freeze (saves a pass
    /// over RAM inside the blackout; claim then checks counter, ring and the
    /// static part only).
    #[arg(long)]
    no_ram_checksum: bool,
    /// Print a heartbeat line (counter, running/paused) this often; 0: never.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    heartbeat_ms: u64,
    /// Keep the vCPU idle this long after each progress exit (a VM that
    /// mostly waits, as most of a host's VMs do; the guest's loop never
    /// halts by itself); a pause wakes it at once. 0: run flat out.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    idle_ms: u64,
    #[command(flatten)]
    guest: GuestArgs,
}

#[derive(Debug, Args)]
struct ClaimArgs {
    /// luod's socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The VM's name at luod.
    #[arg(long, value_parser = parse_vm_name)]
    name: String,
    /// How long to run the guest after the claim.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Skip the RAM checks before resuming (they add to the blackout).
    #[arg(long)]
    no_verify: bool,
    /// Keep trying to connect to luod this long (it may still be starting).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    wait: f64,
    /// Also print `@@LUO mark NAME` at the first guest progress (for the QEMU harness).
    #[arg(long, value_name = "NAME")]
    mark: Option<String>,
    /// After the report, keep the guest running, register it with luod again
    /// once luod takes it (after `luoctl finish`) and serve luod's calls like
    /// `serve`: the guest can go through the next live update.
    #[arg(long)]
    serve: bool,
    /// With --serve: how long to keep trying to register again.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    register_wait: f64,
    /// With --serve: heartbeat period (as for `serve`).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    heartbeat_ms: u64,
}

/// A VM name as luod accepts it (its session is `vm-NAME`, at most 63 bytes).
fn parse_vm_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 60 || s.contains(['\0', '/']) {
        return Err(format!("`{s}`: a VM name has 1 to 60 bytes, no NUL and no '/'"));
    }
    Ok(s.to_string())
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
fn run_then_pause(vm: Vm, d: Duration, watch: bool, mark: Option<&str>) -> Result<(Vm, RunReport, Duration), VmError> {
    let running = vm.spawn();
    let end = Instant::now() + d;
    if watch {
        while Instant::now() < end && !running.is_finished() {
            if let Some(p) = running.pauser().progress().first_this_run {
                if let Some(m) = mark {
                    println!("@@LUO mark {m}");
                }
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
    let (vm, r, latency) = run_then_pause(vm, secs(seconds)?, false, None).map_err(|e| e.to_string())?;
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
    let (ok, vm, run) = continue_restored(vm, &st, t0, no_verify, seconds, None)?;
    if let (Some(_), Some((sp, rp))) = (run, out) {
        save(&vm, sp, rp, true)?;
    }
    Ok(ok)
}

/// Checks a restored VM (unless `no_verify`), runs it for `seconds` and
/// reports: counter before and after, RAM checks, blackout (realtime and TSC).
/// `t0` is when the restore began (for `restore_ms`).
fn continue_restored(
    vm: Vm,
    st: &VmStateV1,
    t0: Instant,
    no_verify: bool,
    seconds: f64,
    mark: Option<&str>,
) -> Result<(bool, Vm, Option<RunReport>), String> {
    let restored_ns = luo_test_vmm::realtime_ns();
    let mut ok = true;
    if !no_verify {
        let t = Instant::now();
        let v = vm.verify_restored_ram();
        println!(
            "VMM: restored counter={} generation={} ram_size={} ram_sha256={} ram_match={} verify_ms={}",
            vm.counter(),
            vm.generation(),
            vm.ram_size(),
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
            return Ok((false, vm, None));
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
    let (vm, r, latency) = run_then_pause(vm, secs(seconds)?, true, mark).map_err(|e| e.to_string())?;
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
    let blackout_tsc = tsc_hz.and_then(|hz| r.blackout_tsc(hz));
    println!(
        "VMM: resumed counter_before={before} first_progress_counter={} counter_after={after} increasing={} \
         static_match={} ring={} blackout_ms={} blackout_tsc_ms={} tsc_hz={} pause_to_restore_ms={} \
         restore_to_first_progress_ms={}",
        first.map_or("none".into(), |f| f.to_string()),
        yes(increasing),
        yes(static_ok),
        ring.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into()),
        blackout.map_or("none".into(), ms),
        blackout_tsc.map_or("none".into(), ms),
        tsc_hz.map_or("none".into(), |hz| format!("{hz:.0}")),
        ms(Duration::from_nanos(restored_ns.saturating_sub(st.paused_realtime_ns))),
        r.first_progress.map_or("none".into(), |s| ms(Duration::from_nanos(
            s.realtime_ns.saturating_sub(restored_ns)
        ))),
    );
    if !increasing {
        println!("VMM: FAIL the counter did not increase: before {before}, first progress {first:?}, after {after}");
    }
    ok &= increasing && static_ok && ring.is_ok() && blackout.is_some();
    Ok((ok, vm, Some(r)))
}

fn client_err(e: ClientError) -> String {
    match e.hint() {
        Some(h) => format!("{e} ({h})"),
        None => e.to_string(),
    }
}

fn cmd_serve(a: &ServeArgs) -> Result<bool, String> {
    let ram = create_ram_memfd("luo-test-vmm-ram", a.guest.ram_size).map_err(|e| e.to_string())?;
    let mut vm = boot(&a.guest, ram).map_err(|e| e.to_string())?;
    vm.set_idle(Some(Duration::from_millis(a.idle_ms)));
    let t = Instant::now();
    let client = Client::connect(&a.socket, "luo-test-vmm").map_err(client_err)?;
    let server = client.server().to_string();
    let mut conn = client
        .register_vm(&a.name, &[(RAM_TOKEN, vm.ram_fd())])
        .map_err(client_err)?;
    println!(
        "VMM: registered name={} token={RAM_TOKEN} ram_size={} server={server:?} register_ms={} {}",
        a.name,
        vm.ram_size(),
        ms(t.elapsed()),
        clocks()
    );
    let running = Running::start(&a.name, vm, !a.no_ram_checksum, a.heartbeat_ms);
    let behaviour = Behaviour {
        veto: a.veto.clone(),
        hang_at: a.hang_at,
        exit_at: a.exit_at,
    };
    running.serve(&mut conn, &behaviour)
}

/// The guest on its vCPU thread, with its monitor thread.
struct Running {
    guest: KvmGuest,
    monitor: std::sync::Arc<service::Monitor>,
    watcher: std::thread::JoinHandle<()>,
}

impl Running {
    fn start(name: &str, vm: Vm, ram_checksum: bool, heartbeat_ms: u64) -> Running {
        let guest = KvmGuest::start(vm, ram_checksum);
        let monitor = guest.monitor();
        let watcher = spawn_monitor(
            name.to_string(),
            guest.pauser().clone(),
            monitor.clone(),
            Duration::from_millis(heartbeat_ms),
        );
        println!("VMM: running name={name} {}", clocks());
        Running {
            guest,
            monitor,
            watcher,
        }
    }

    /// Serves luod's calls until luod closes the connection; then pauses
    /// the guest and checks it.
    fn serve(self, conn: &mut VmConnection, behaviour: &Behaviour) -> Result<bool, String> {
        let Running {
            mut guest,
            monitor,
            watcher,
        } = self;
        let ended = serve_loop(conn, &mut guest, behaviour, &mut std::io::stdout());
        match &ended {
            Ok(Ended::Exit(_)) => {
                let _ = std::io::stdout().flush();
                std::process::exit(3);
            }
            Ok(Ended::Closed) => println!("VMM: luod closed the connection {}", clocks()),
            Err(e) => println!("VMM: the connection to luod failed: {e} {}", clocks()),
        }
        stop_monitor(&monitor, watcher);
        let Some(vm) = guest.stop() else {
            return Err("the VM was lost".into());
        };
        let ring = vm.check_ring();
        println!(
            "VMM: stopped counter={} static_match={} ring={}",
            vm.counter(),
            yes(vm.static_checksum() == vm.boot_static_checksum()),
            ring.as_ref().map_or_else(|e| e.to_string(), |_| "ok".into())
        );
        Ok(ended.is_ok() && ring.is_ok())
    }
}

fn cmd_claim(a: &ClaimArgs) -> Result<bool, String> {
    let t0 = Instant::now();
    println!("VMM: claim name={} started {}", a.name, clocks());
    let deadline = t0 + secs(a.wait)?;
    let mut tries = 0u32;
    let mut client = loop {
        tries += 1;
        match Client::connect(&a.socket, "luo-test-vmm") {
            Ok(c) => break c,
            Err(ClientError::Connect { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(client_err(e)),
        }
    };
    let connect = t0.elapsed();
    let claimed = client.claim_vm(&a.name).map_err(client_err)?;
    println!(
        "VMM: claimed name={} tokens={:?} state_bytes={} connect_tries={tries} connect_ms={} claim_ms={} {}",
        a.name,
        claimed.ram.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        claimed.state.len(),
        ms(connect),
        ms(t0.elapsed() - connect),
        clocks()
    );
    let Some((_, fd)) = claimed.ram.into_iter().find(|(t, _)| *t == RAM_TOKEN) else {
        return Err(format!("luod handed over no memfd with token {RAM_TOKEN}"));
    };
    let st = state::decode(&claimed.state).map_err(|e| format!("the state luod kept: {e}"))?;
    let vm = Vm::restore(fd, &claimed.state).map_err(|e| e.to_string())?;
    let (ok, vm, r) = continue_restored(vm, &st, t0, a.no_verify, a.seconds, a.mark.as_deref())?;
    let Some(r) = r else { return Ok(false) };
    // The VM blackout across the kexec: last progress in the old kernel's
    // VMM -> first progress here, in TSC ticks (CLOCK_REALTIME restarted
    // from the RTC with the new kernel; the TSC did not).
    println!(
        "VMM: blackout_tsc_ms={} counter_before={} counter_after={} (last guest progress before the pause -> first after the claim)",
        r.tsc_hz().and_then(|hz| r.blackout_tsc(hz)).map_or("none".into(), ms),
        st.counter,
        r.counter_end
    );
    if !a.serve || !ok {
        return Ok(ok);
    }
    serve_again(a, vm)
}

/// After a claim: the guest runs on, and the VMM registers it with luod
/// again as soon as luod takes registrations (once `luoctl finish` closed
/// the update), then serves luod's calls: the guest can go through the
/// next live update.
fn serve_again(a: &ClaimArgs, vm: Vm) -> Result<bool, String> {
    let ram = vm
        .ram_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("dup of the RAM memfd: {e}"))?;
    let ram_size = vm.ram_size();
    let running = Running::start(&a.name, vm, true, a.heartbeat_ms);
    let t = Instant::now();
    let deadline = t + secs(a.register_wait)?;
    let mut tries = 0u32;
    let mut conn = loop {
        tries += 1;
        let registered = Client::connect(&a.socket, "luo-test-vmm")
            .and_then(|c| c.register_vm(&a.name, &[(RAM_TOKEN, ram.as_fd())]));
        match registered {
            Ok(conn) => break conn,
            // luod is still `updated` (the old session is in the record):
            // wait for `luoctl finish`.
            Err(ClientError::Server(e))
                if matches!(e.kind, ErrorKind::WrongState | ErrorKind::AlreadyExists) && Instant::now() < deadline =>
            {
                if tries == 1 {
                    println!("VMM: waiting for luod to take the registration: {}", e.message);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                let _ = running.guest.stop();
                return Err(client_err(e));
            }
        }
    };
    println!(
        "VMM: registered name={} token={RAM_TOKEN} ram_size={ram_size} again after {} ms ({tries} tries) {}",
        a.name,
        ms(t.elapsed()),
        clocks()
    );
    running.serve(&mut conn, &Behaviour::default())
}

fn cmd_cycle(seconds: f64, pauses: u32, pause_ms: u64, g: &GuestArgs) -> Result<bool, String> {
    let ram = create_ram_memfd("luo-test-vmm-ram", g.ram_size).map_err(|e| e.to_string())?;
    let mut vm = boot(g, ram).map_err(|e| e.to_string())?;
    let mut ok = true;
    for i in 0..=pauses {
        let (v, r, latency) = run_then_pause(vm, secs(seconds)?, false, None).map_err(|e| e.to_string())?;
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
        Cmd::Serve(a) => cmd_serve(a),
        Cmd::Claim(a) => cmd_claim(a),
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

    #[test]
    fn serve_parses_with_its_defaults_and_knobs() {
        let c = Cli::try_parse_from(["luo-test-vmm", "serve", "--name", "vm0"]).unwrap();
        let Cmd::Serve(a) = c.cmd else { panic!("not serve") };
        assert_eq!(a.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(a.name, "vm0");
        assert_eq!(
            (a.veto, a.hang_at, a.exit_at, a.no_ram_checksum),
            (None, None, None, false)
        );
        assert_eq!(
            (a.heartbeat_ms, a.guest.ram_size, a.idle_ms),
            (1000, DEFAULT_RAM_SIZE, 0)
        );

        let c = Cli::try_parse_from([
            "luo-test-vmm",
            "serve",
            "--socket",
            "/tmp/s",
            "--name",
            "vm1",
            "--ram-size",
            "4M",
            "--veto",
            "backup running",
            "--hang-at",
            "prepare",
            "--no-ram-checksum",
            "--heartbeat-ms",
            "0",
            "--idle-ms",
            "5",
        ])
        .unwrap();
        let Cmd::Serve(a) = c.cmd else { panic!("not serve") };
        assert_eq!(a.idle_ms, 5);
        assert_eq!(a.socket, PathBuf::from("/tmp/s"));
        assert_eq!(a.guest.ram_size, 4 << 20);
        assert_eq!(a.veto.as_deref(), Some("backup running"));
        assert_eq!(a.hang_at, Some(At::Prepare));
        assert!(a.no_ram_checksum);
        assert_eq!(a.heartbeat_ms, 0);

        let c = Cli::try_parse_from(["luo-test-vmm", "serve", "--name", "v", "--exit-at", "freeze"]).unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Serve(ServeArgs {
                exit_at: Some(At::Freeze),
                ..
            })
        ));
        let c = Cli::try_parse_from(["luo-test-vmm", "serve", "--name", "v", "--hang-at", "freeze"]).unwrap();
        assert!(matches!(
            c.cmd,
            Cmd::Serve(ServeArgs {
                hang_at: Some(At::Freeze),
                ..
            })
        ));
    }

    #[test]
    fn serve_refuses_bad_arguments() {
        let bad: &[&[&str]] = &[
            &["serve"],
            &["serve", "--name", ""],
            &["serve", "--name", "a/b"],
            &["serve", "--name", &"x".repeat(61)],
            &["serve", "--name", "v", "--hang-at", "reboot"],
            &["serve", "--name", "v", "--exit-at", "unfreeze"],
            &["serve", "--name", "v", "--hang-at", "freeze", "--exit-at", "freeze"],
            &["serve", "--name", "v", "--ram-size", "lots"],
            &["serve", "--name", "v", "--heartbeat-ms", "-1"],
            &["serve", "--name", "v", "--idle-ms", "-1"],
        ];
        for args in bad {
            let argv = std::iter::once("luo-test-vmm").chain(args.iter().copied());
            assert!(Cli::try_parse_from(argv).is_err(), "accepted {args:?}");
        }
        assert!(Cli::try_parse_from(["luo-test-vmm", "serve", "--name", &"x".repeat(60)]).is_ok());
    }

    #[test]
    fn claim_parses() {
        let c = Cli::try_parse_from(["luo-test-vmm", "claim", "--name", "vm0"]).unwrap();
        let Cmd::Claim(a) = c.cmd else { panic!("not claim") };
        assert_eq!(a.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!((a.seconds, a.wait, a.no_verify, a.mark), (2.0, 30.0, false, None));
        let c = Cli::try_parse_from([
            "luo-test-vmm",
            "claim",
            "--socket",
            "/run/x.sock",
            "--name",
            "vm0",
            "--seconds",
            "0.5",
            "--no-verify",
            "--wait",
            "3",
            "--mark",
            "vm-resumed",
        ])
        .unwrap();
        let Cmd::Claim(a) = c.cmd else { panic!("not claim") };
        assert_eq!((a.seconds, a.wait, a.no_verify), (0.5, 3.0, true));
        assert_eq!(a.mark.as_deref(), Some("vm-resumed"));
        assert!(!a.serve);
        let c = Cli::try_parse_from([
            "luo-test-vmm",
            "claim",
            "--name",
            "vm0",
            "--serve",
            "--register-wait",
            "9",
        ])
        .unwrap();
        let Cmd::Claim(a) = c.cmd else { panic!("not claim") };
        assert!(a.serve);
        assert_eq!((a.register_wait, a.heartbeat_ms), (9.0, 1000));
        assert!(Cli::try_parse_from(["luo-test-vmm", "claim"]).is_err());
        assert!(Cli::try_parse_from(["luo-test-vmm", "claim", "--name", "vm0", "--veto", "x"]).is_err());
        assert!(Cli::try_parse_from(["luo-test-vmm", "claim", "--name", "vm0", "--seconds", "soon"]).is_err());
    }

    #[test]
    fn vm_names_follow_luods_rules() {
        assert_eq!(parse_vm_name("vm-0.a_b"), Ok("vm-0.a_b".into()));
        assert!(parse_vm_name("").is_err());
        assert!(parse_vm_name("a\0b").is_err());
        assert!(parse_vm_name("a/b").is_err());
    }

    #[test]
    fn a_claim_without_luod_fails_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let a = ClaimArgs {
            socket: dir.path().join("none.sock"),
            name: "vm0".into(),
            seconds: 0.1,
            no_verify: false,
            wait: 0.05,
            mark: None,
            serve: false,
            register_wait: 1.0,
            heartbeat_ms: 0,
        };
        let t = Instant::now();
        let e = cmd_claim(&a).unwrap_err();
        assert!(
            e.contains("cannot connect to luod") && e.contains("is luod running?"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "gave up after --wait");
    }
}
