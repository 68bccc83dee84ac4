//! `sft launch --nproc N RECIPE [flags]`: torchrun's job on one machine. Spawns N ranks of this
//! same binary with torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, a free `MASTER_PORT`), prefixes each line they print with its rank,
//! and when one rank fails, stops the others and exits non-zero.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::LaunchArgs;

/// Copy `from` to our stdout or stderr line by line, each prefixed with `[rank r]`.
fn forward(
    from: impl std::io::Read + Send + 'static,
    rank: usize,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            // A closed stdout/stderr is not worth failing the run for.
            let _ = if to_stderr {
                writeln!(std::io::stderr().lock(), "[rank {rank}] {line}")
            } else {
                writeln!(std::io::stdout().lock(), "[rank {rank}] {line}")
            };
        }
    })
}

/// Start the ranks and wait for them; the exit code is the first failing rank's (1 when it died
/// from a signal), after the others were killed.
pub(crate) fn run(a: LaunchArgs) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the sft binary")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for the rendezvous")?
        .port();
    // As torchrun: with several ranks and no OMP_NUM_THREADS, split the cores between them.
    let threads = std::env::var_os("OMP_NUM_THREADS").is_none().then(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / a.nproc).max(1).to_string()
    });
    tracing::info!("launching {} ranks on 127.0.0.1:{port}", a.nproc);
    // Ctrl-C reaches every rank (same process group): they save a checkpoint and stop; the
    // launcher keeps waiting for them.
    if let Err(e) = ctrlc::set_handler(|| {}) {
        tracing::debug!("no Ctrl-C handler: {e}");
    }
    let mut children: Vec<Child> = Vec::with_capacity(a.nproc);
    let mut pumps = Vec::new();
    for rank in 0..a.nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&a.rest)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", a.nproc.to_string())
            .env("LOCAL_WORLD_SIZE", a.nproc.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = &threads {
            cmd.env("OMP_NUM_THREADS", t);
        }
        // SAFETY: between fork and exec the closure only makes one async-signal-safe syscall.
        unsafe { cmd.pre_exec(die_with_parent) };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                kill_all(&mut children);
                return Err(e).with_context(|| format!("starting rank {rank} ({})", exe.display()));
            }
        };
        tracing::info!("rank {rank}: pid {}", child.id());
        if let Some(out) = child.stdout.take() {
            pumps.push(forward(out, rank, false));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(forward(err, rank, true));
        }
        children.push(child);
    }
    let mut done = vec![false; children.len()];
    // Ranks that stopped on SIGINT/SIGTERM after their checkpoint (exit 130): not a failure.
    let mut interrupted = false;
    let code = loop {
        // Every rank found dead in this pass is reported (the first to die and the peers its
        // death brought down may end within one poll).
        let mut failed = Vec::new();
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    done[rank] = true;
                    if status.code() == Some(130) {
                        interrupted = true;
                    } else if !status.success() {
                        failed.push((rank, status));
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    kill_all(&mut children);
                    return Err(e).with_context(|| format!("waiting for rank {rank}"));
                }
            }
        }
        if let Some((_, first)) = failed.first() {
            for (rank, status) in &failed {
                tracing::error!("rank {rank} failed ({status}); stopping the other ranks");
            }
            kill_all(&mut children);
            break first.code().and_then(|c| u8::try_from(c).ok()).filter(|&c| c != 0).unwrap_or(1);
        }
        if done.iter().all(|d| *d) {
            break if interrupted { 130 } else { 0 };
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for p in pumps {
        let _ = p.join();
    }
    Ok(ExitCode::from(code))
}

unsafe extern "C" {
    fn prctl(option: i32, arg2: u64, ...) -> i32;
}

/// In the child before exec: receive SIGKILL when the launcher dies, so a killed launcher leaves
/// no rank behind (Linux's `PR_SET_PDEATHSIG`).
fn die_with_parent() -> std::io::Result<()> {
    const PR_SET_PDEATHSIG: i32 = 1;
    const SIGKILL: u64 = 9;
    // SAFETY: prctl(PR_SET_PDEATHSIG, signal) reads no memory of ours.
    if unsafe { prctl(PR_SET_PDEATHSIG, SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Kill and reap every rank still running.
fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}
