//! Two real processes on 127.0.0.1 through c10d's TCPStore and Gloo: sums of known tensors
//! (across a bucket boundary), broadcast, barrier, and a dead or hung peer turning into an error
//! within the timeout. Each test re-runs this test binary as the ranks (`NIBBLE_DIST_TEST_RANK`).

#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(clippy::print_stdout, reason = "the ranks report to the parent test on stdout")]

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use dist::{DistError, ProcessGroup};
use tch::{Kind, Tensor};

const RANK_VAR: &str = "NIBBLE_DIST_TEST_RANK";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Start `world` copies of this test binary running only `test`, as ranks 0..world.
fn spawn(test: &str, world: usize) -> Vec<Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|r| {
            Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(RANK_VAR, r.to_string())
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// This process's rank when it is one of the spawned ranks.
fn child_rank() -> Option<usize> {
    std::env::var(RANK_VAR).ok().and_then(|r| r.parse().ok())
}

fn group(timeout_s: u64) -> ProcessGroup {
    ProcessGroup::from_env(Duration::from_secs(timeout_s)).unwrap().unwrap()
}

#[test]
fn collectives_sum_broadcast_and_meet() {
    if let Some(rank) = child_rank() {
        let pg = group(30);
        assert_eq!((pg.rank(), pg.world_size()), (rank, 2));
        let r = rank as f32 + 1.0;
        // A 28 MB tensor is a bucket of its own; the small ones share one, a 2-D one included.
        let big = Tensor::ones([7_000_000], (Kind::Float, tch::Device::Cpu)) * f64::from(r);
        let mut ts = vec![
            Tensor::from_slice(&[r, 2.0 * r, 3.0 * r]),
            Tensor::from_slice(&[10.0 * r; 6]).reshape([2, 3]),
            big,
            Tensor::from_slice(&[-r]),
        ];
        pg.all_reduce_sum(&mut ts).unwrap();
        assert_eq!(Vec::<f32>::try_from(&ts[0]).unwrap(), [3.0, 6.0, 9.0]);
        assert_eq!(ts[1].size(), [2, 3]);
        assert_eq!(Vec::<f32>::try_from(&ts[1].reshape([-1])).unwrap(), [30.0; 6]);
        assert_eq!(ts[2].min().double_value(&[]), 3.0);
        assert_eq!(ts[2].max().double_value(&[]), 3.0);
        assert_eq!(Vec::<f32>::try_from(&ts[3]).unwrap(), [-3.0]);
        assert_eq!(pg.all_reduce_scalar(rank as f64 + 0.5).unwrap(), 2.0);
        let mut b = Tensor::from_slice(&[rank as i64 * 7 + 1, 5]);
        pg.broadcast(&mut b, 1).unwrap();
        assert_eq!(Vec::<i64>::try_from(&b).unwrap(), [8, 5]);
        assert!(pg.all_equal(&[4.0, 2.5]).unwrap());
        assert!(!pg.all_equal(&[4.0, rank as f64]).unwrap());
        pg.barrier().unwrap();
        println!("rank {rank} ok");
        return;
    }
    let outs: Vec<Output> = spawn("collectives_sum_broadcast_and_meet", 2)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for (r, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "rank {r} failed:\n{}", text(o));
        assert!(text(o).contains(&format!("rank {r} ok")), "{}", text(o));
    }
}

#[test]
fn a_dead_peer_is_an_error_not_a_hang() {
    if let Some(rank) = child_rank() {
        let pg = group(20);
        pg.barrier().unwrap();
        if rank == 1 {
            std::process::exit(3);
        }
        let start = Instant::now();
        let mut ts = vec![Tensor::from_slice(&[1.0f32])];
        let err = pg.all_reduce_sum(&mut ts).unwrap_err();
        assert!(matches!(err, DistError::Collective { op: "all_reduce", rank: 0, .. }), "{err}");
        println!("rank 0 saw after {:.1}s: {err}", start.elapsed().as_secs_f64());
        return;
    }
    let start = Instant::now();
    let outs: Vec<Output> = spawn("a_dead_peer_is_an_error_not_a_hang", 2)
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    eprintln!("{}", text(&outs[0]));
    assert_eq!(outs[1].status.code(), Some(3), "{}", text(&outs[1]));
    assert!(outs[0].status.success(), "rank 0:\n{}", text(&outs[0]));
    assert!(text(&outs[0]).contains("rank 0 saw after"), "{}", text(&outs[0]));
    assert!(start.elapsed() < Duration::from_secs(25), "took {:?}", start.elapsed());
}

#[test]
fn a_hung_peer_is_an_error_within_the_timeout() {
    if let Some(rank) = child_rank() {
        let pg = group(3);
        pg.barrier().unwrap();
        if rank == 1 {
            std::thread::sleep(Duration::from_secs(60));
            return;
        }
        let start = Instant::now();
        let err = pg.all_reduce_scalar(1.0).unwrap_err();
        let waited = start.elapsed();
        assert!(matches!(err, DistError::Collective { .. }), "{err}");
        assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(15), "{waited:?}: {err}");
        println!("rank 0 saw after {:.1}s: {err}", waited.as_secs_f64());
        std::process::exit(0);
    }
    let mut children = spawn("a_hung_peer_is_an_error_within_the_timeout", 2);
    let mut hung = children.pop().unwrap();
    let first = children.pop().unwrap().wait_with_output().unwrap();
    eprintln!("{}", text(&first));
    hung.kill().unwrap();
    let _ = hung.wait();
    assert!(first.status.success(), "rank 0:\n{}", text(&first));
    assert!(text(&first).contains("rank 0 saw after"), "{}", text(&first));
}

#[test]
fn a_missing_peer_fails_the_rendezvous_within_the_timeout() {
    if child_rank().is_some() {
        return;
    }
    // Rank 0 alone: the store waits for a second worker that never comes.
    let start = Instant::now();
    let env = dist::DistEnv {
        rank: 0,
        world_size: 2,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    let err = ProcessGroup::new(env, Duration::from_secs(2)).unwrap_err();
    assert!(matches!(err, DistError::Rendezvous { rank: 0, .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(15), "{:?}", start.elapsed());
}
