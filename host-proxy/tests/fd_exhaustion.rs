//! Out of file descriptors, the proxy's accept loops wait instead of spinning: a real
//! hostbind-proxy on a real swtpm whose RLIMIT_NOFILE is lowered (prlimit) while admin clients
//! hold every descriptor left and more wait in the admin socket's backlog. The listener stays
//! readable the whole time, so a loop that retries `accept` at once burns a core; the proxy's CPU
//! time (utime + stime from /proc/<pid>/stat) must stay low, its log must not repeat the failure
//! per attempt, and it must serve the admin socket again once the clients go.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hostbind_testkit::host::{Host, Vendor};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

/// CPU time of `pid` so far, in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn ticks_per_second() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn admin_accept_loop_out_of_file_descriptors_does_not_spin() {
    let v = Vendor::new().unwrap();
    let mut h = Host::enrolled(&v, &["vm-a"], "").unwrap();
    h.start_proxy().unwrap();
    let pid = h.proxy.as_ref().unwrap().pid();
    let admin = h.dir().join("admin.sock");
    h.proxy_ok(&["status"]).unwrap();

    // A few descriptors of headroom, then take them all with idle admin connections and leave
    // more waiting in the backlog (the listener stays readable while accept fails).
    let limit = open_fds(pid) + 4;
    let st = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .unwrap();
    assert!(st.success(), "prlimit failed");
    let clients: Vec<UnixStream> = (0..24)
        .map(|_| UnixStream::connect(&admin).unwrap())
        .collect();
    let mut waited = 0;
    while open_fds(pid) < limit && waited < 100 {
        std::thread::sleep(Duration::from_millis(50));
        waited += 1;
    }
    assert!(
        open_fds(pid) >= limit,
        "the proxy never ran out of descriptors"
    );

    let log_before = h.proxy.as_ref().unwrap().log();
    let (t0, window) = (cpu_ticks(pid), Duration::from_secs(3));
    std::thread::sleep(window);
    let spent = cpu_ticks(pid) - t0;
    let hz = ticks_per_second();
    let log = h.proxy.as_ref().unwrap().log();
    let new_log = &log[log_before.len().min(log.len())..];
    let failures = log
        .matches("accepting a connection on the admin socket failed")
        .count();
    let budget = hz * window.as_secs() / 4;
    eprintln!(
        "fd_exhaustion: {spent} ticks of CPU in {window:?} (budget {budget}, {hz}/s) with accept failing; {failures} accept failures logged"
    );
    // A spinning loop takes a whole core: `hz` ticks a second. A quarter of that over the
    // window is a generous bound for a loop that waits 100 ms between attempts.
    assert!(
        spent < budget,
        "the proxy used {spent} ticks in {window:?} out of descriptors:\n{new_log}"
    );
    assert!(failures >= 1, "the failing accept was never logged:\n{log}");
    assert!(
        failures <= 2,
        "the failing accept is logged per attempt, not rate-limited ({failures} lines):\n{log}"
    );

    // Once the clients go, the descriptors come back and the admin socket answers again.
    drop(clients);
    let mut ok = false;
    for _ in 0..50 {
        if h.proxy_ok(&["status"]).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ok,
        "the admin socket did not recover:\n{}",
        h.proxy.as_ref().unwrap().log()
    );
    h.stop_proxy();
}
