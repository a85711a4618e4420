//! luod's responsiveness, as ratios measured in the same run:
//!
//! - `status` p50/p99 while a `freeze` waits on a hung VMM (`--vm-timeout
//!   5`, an in-process VMM that answers `prepare` and never `freeze`),
//!   against `status` on an idle luod;
//! - luod's threads and RSS (`/proc/PID/status` `Threads`, `VmRSS`) with
//!   5,000 idle connections (each said hello), against none.
//!
//! Run with `cargo bench -p liveupdate-tests --bench responsiveness` (as
//! root, as the integration tests). It prints and never fails on a figure;
//! without root, or when a step cannot run, it says why and exits 0.

use liveupdate::kernel::memfd;
use liveupdate::protocol::client::Client;
use liveupdate::protocol::frame;
use liveupdate::protocol::{PROTOCOL_VERSION, Request, Response, VmAnswer, VmCall};
use liveupdate_tests::{Conn, Luod};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const IDLE_CONNECTIONS: usize = 5000;
const STATUS_CALLS: usize = 400;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Times `status` on `conn` up to `n` times, while `go` says so.
fn time_status(conn: &mut Conn, n: usize, mut go: impl FnMut() -> bool) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    while times.len() < n && go() {
        let start = Instant::now();
        let _ = conn.call(&Request::Status);
        times.push(start.elapsed());
    }
    times.sort();
    times
}

fn status_during_a_hung_freeze() -> Result<(), String> {
    let luod = Luod::new("8M").arg("--vm-timeout").arg("5").launched();
    let mut conn = luod.client();
    let idle = time_status(&mut conn, STATUS_CALLS, || true);

    let ram = memfd::from_bytes("vm0", &[7; 4096]).map_err(|e| e.to_string())?;
    let client = Client::connect(&luod.socket(), "hung-vmm").map_err(|e| e.to_string())?;
    let mut vm = client
        .register_vm("vm0", &[(1, ram.as_fd())])
        .map_err(|e| e.to_string())?;
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let vmm = std::thread::spawn(move || {
        while let Ok(Some(call)) = vm.next_call() {
            if call == VmCall::Freeze {
                let _ = held.recv();
                return;
            }
            if vm.answer(VmAnswer::Ok { state: None }).is_err() {
                return;
            }
        }
    });
    conn.prepare().map_err(|e| e.message)?;
    let socket = luod.socket();
    let freeze = std::thread::spawn(move || {
        let mut c = Conn::new(Client::connect(&socket, "freeze").expect("connect"));
        let _ = c.freeze();
    });
    // Until the freeze is seen waiting for the VM.
    let waiting = Instant::now();
    while conn.status().in_progress.and_then(|p| p.waiting_for).is_none() {
        if waiting.elapsed() > Duration::from_secs(3) {
            return Err("the freeze never showed as waiting for vm0".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let window = Instant::now();
    let busy = time_status(&mut conn, STATUS_CALLS, || window.elapsed() < Duration::from_secs(4));
    let still = conn.status().in_progress.is_some();
    drop(hold);
    let _ = freeze.join();
    let _ = vmm.join();
    let (i50, i99) = (percentile(&idle, 0.5), percentile(&idle, 0.99));
    let (b50, b99) = (percentile(&busy, 0.5), percentile(&busy, 0.99));
    println!(
        "status, idle luod ({} calls):              p50 {i50:>10.1?}  p99 {i99:>10.1?}",
        idle.len()
    );
    println!(
        "status, freeze waiting on a hung VMM ({} calls{}): p50 {b50:>10.1?}  p99 {b99:>10.1?}",
        busy.len(),
        if still { "" } else { "; the freeze ended meanwhile" }
    );
    println!(
        "ratio busy/idle: p50 {:.2}  p99 {:.2}  (1.0 = a hung freeze costs status nothing; before the snapshot, status waited out the 5 s)",
        b50.as_secs_f64() / i50.as_secs_f64().max(1e-9),
        b99.as_secs_f64() / i99.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// `Threads` and `VmRSS` (KiB) of process `pid`.
fn threads_and_rss(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:"))
}

fn greeted(luod: &Luod) -> Result<UnixStream, String> {
    let sock = UnixStream::connect(luod.socket()).map_err(|e| e.to_string())?;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: "idle".into(),
    };
    frame::send(&sock, &hello, &[]).map_err(|e| e.to_string())?;
    match frame::recv::<Response>(&sock) {
        Ok((Response::Hello { .. }, _)) => Ok(sock),
        Ok((other, _)) => Err(format!("hello answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn idle_connections() -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    // This process and luod (which inherits the limit) hold one descriptor
    // per connection each; root may raise the hard limit (CAP_SYS_RESOURCE).
    let limit = hard.max((IDLE_CONNECTIONS as u64) * 2 + 200);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit)
        .map_err(|e| format!("cannot raise RLIMIT_NOFILE to {limit}: {e}"))?;
    let luod = Luod::new("8M")
        .arg("--max-connections")
        .arg((IDLE_CONNECTIONS + 100).to_string())
        .launched();
    let pid = luod.pid();
    luod.status();
    std::thread::sleep(Duration::from_millis(200));
    let (t0, r0) = threads_and_rss(pid);
    let idle: Vec<UnixStream> = (0..IDLE_CONNECTIONS)
        .map(|_| greeted(&luod))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(200));
    let (t1, r1) = threads_and_rss(pid);
    let asked = Instant::now();
    luod.status();
    let took = asked.elapsed();
    println!("luod with 0 idle connections:     {t0:>5} threads, RSS {r0:>7} KiB");
    println!(
        "luod with {} idle connections:  {t1:>5} threads, RSS {r1:>7} KiB (status then took {took:.1?})",
        idle.len()
    );
    println!(
        "ratio at {IDLE_CONNECTIONS}/at 0: threads {:.2}, RSS {:.2}  (RSS per connection {:.2} KiB)",
        t1 as f64 / t0.max(1) as f64,
        r1 as f64 / r0.max(1) as f64,
        r1.saturating_sub(r0) as f64 / IDLE_CONNECTIONS as f64
    );
    Ok(())
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        println!("responsiveness: skipped, luod's tests and benches run as root");
        return;
    }
    println!("== status while a freeze waits on a hung VMM, against idle status");
    if let Err(e) = status_during_a_hung_freeze() {
        println!("not measured: {e}");
    }
    println!("== threads and RSS of luod at {IDLE_CONNECTIONS} idle connections, against 0");
    if let Err(e) = idle_connections() {
        println!("not measured: {e}");
    }
}
