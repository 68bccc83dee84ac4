//! NCCL groups (feature `cuda`). Without a GPU: asking for one is an error naming the rendezvous,
//! not a crash. With one: a 1-rank group sums and broadcasts CUDA tensors; with two or more
//! GPUs, two processes (this test binary re-run as the ranks) sum across devices.

#![allow(clippy::unwrap_used, reason = "tests")]
#![allow(clippy::print_stdout, reason = "the ranks report to the parent test on stdout")]

use std::process::{Command, Output};
use std::time::Duration;

use dist::{Backend, DistEnv, DistError, ProcessGroup};
use tch::{Device, Kind, Tensor};

const RANK_VAR: &str = "NIBBLE_DIST_TEST_RANK";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv { rank, world_size: world, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }
}

fn sum_on(pg: &ProcessGroup, rank: usize, world: usize) {
    let dev = pg.device();
    assert_eq!(dev, Device::Cuda(rank));
    let r = rank as f32 + 1.0;
    let mut ts = vec![
        Tensor::from_slice(&[r, 2.0 * r]).to_device(dev),
        Tensor::ones([3_000_000], (Kind::Float, dev)) * f64::from(r),
    ];
    pg.all_reduce_sum(&mut ts).unwrap();
    let want = (world * (world + 1) / 2) as f32;
    assert_eq!(Vec::<f32>::try_from(&ts[0].to_device(Device::Cpu)).unwrap(), [want, 2.0 * want]);
    assert_eq!(ts[1].min().double_value(&[]), f64::from(want));
    assert_eq!(pg.all_reduce_scalar(1.5).unwrap(), 1.5 * world as f64);
    let mut b = Tensor::from_slice(&[rank as i64 + 10]).to_device(dev);
    pg.broadcast(&mut b, 0).unwrap();
    assert_eq!(b.int64_value(&[0]), 10);
    pg.barrier().unwrap();
}

#[test]
fn nccl_groups_sum_cuda_tensors_or_fail_cleanly_without_a_gpu() {
    if let Ok(rank) = std::env::var(RANK_VAR).map(|r| r.parse::<usize>().unwrap()) {
        let port: u16 = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
        let pg =
            ProcessGroup::with_backend(env(rank, 2, port), Duration::from_secs(60), Backend::Nccl).unwrap();
        sum_on(&pg, rank, 2);
        println!("rank {rank} ok");
        return;
    }
    let gpus = if tch::Cuda::is_available() { tch::Cuda::device_count() as usize } else { 0 };
    if gpus == 0 {
        let err = ProcessGroup::with_backend(env(0, 1, free_port()), Duration::from_secs(5), Backend::Nccl)
            .unwrap_err();
        assert!(matches!(err, DistError::Rendezvous { .. }), "{err}");
        println!("no GPU: {err}");
        return;
    }
    let pg =
        ProcessGroup::with_backend(env(0, 1, free_port()), Duration::from_secs(60), Backend::Nccl).unwrap();
    sum_on(&pg, 0, 1);
    drop(pg);
    if gpus >= 2 {
        let port = free_port().to_string();
        let outs: Vec<Output> = (0..2)
            .map(|r| {
                Command::new(std::env::current_exe().unwrap())
                    .args([
                        "nccl_groups_sum_cuda_tensors_or_fail_cleanly_without_a_gpu",
                        "--exact",
                        "--nocapture",
                    ])
                    .env(RANK_VAR, r.to_string())
                    .env("MASTER_PORT", &port)
                    .spawn()
                    .unwrap()
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect();
        for (r, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "rank {r} failed");
        }
    }
}
