//! Data-parallel collectives for training on several processes: torchrun's environment, a c10d
//! TCPStore rendezvous and a Gloo process group (libtorch's own, reached through `csrc/shim.cpp`;
//! NCCL with the `cuda` feature), with bucketed in-place sums, broadcast and barrier that fail
//! with an error, never a hang, when a peer dies or stops answering within the timeout.

#![deny(missing_docs)]

use std::ffi::{CStr, CString, c_char};
use std::time::Duration;

use tch::{Device, Tensor};

/// Bytes per all-reduce bucket (PyTorch DDP's default `bucket_cap_mb`).
pub const BUCKET_BYTES: usize = 25 * 1024 * 1024;

/// Why a distributed operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A torchrun variable is missing or malformed.
    #[error("distributed environment: {var}: {message}")]
    Env {
        /// The variable (`RANK`, `WORLD_SIZE`, ...).
        var: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Meeting the other ranks at the store failed or timed out.
    #[error("rank {rank} of {world_size}: rendezvous at {addr} failed (timeout {timeout:?}): {message}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// Ranks in the group.
        world_size: usize,
        /// `MASTER_ADDR:MASTER_PORT`.
        addr: String,
        /// How long it waited at most.
        timeout: Duration,
        /// c10d's message.
        message: String,
    },
    /// A collective failed: a peer died, hung past the timeout, or the tensors disagree.
    #[error(
        "rank {rank} of {world_size}: {op} failed (timeout {timeout:?}; a peer rank may have died or hung): {message}"
    )]
    Collective {
        /// The operation (`all_reduce`, `broadcast`, `barrier`).
        op: &'static str,
        /// This rank.
        rank: usize,
        /// Ranks in the group.
        world_size: usize,
        /// The timeout it ran under.
        timeout: Duration,
        /// Gloo's or c10d's message (it names the peer when the transport knows it).
        message: String,
    },
    /// Preparing tensors for a collective failed (undefined gradient, libtorch error).
    #[error("rank {rank}: {op}: {message}")]
    Tensor {
        /// The operation.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// What failed.
        message: String,
    },
}

/// The torchrun variables that place this process in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// `RANK`: this process among all.
    pub rank: usize,
    /// `WORLD_SIZE`: processes in the group.
    pub world_size: usize,
    /// `LOCAL_RANK`: this process on its machine (picks the local device).
    pub local_rank: usize,
    /// `MASTER_ADDR`: where rank 0 serves the store.
    pub master_addr: String,
    /// `MASTER_PORT`: the store's port.
    pub master_port: u16,
}

impl DistEnv {
    /// Read torchrun's variables through `get`; `None` when `WORLD_SIZE` is absent or 1 (a
    /// single process needs no group).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>, DistError> {
        fn parse<T: std::str::FromStr>(var: &'static str, v: Option<String>) -> Result<T, DistError>
        where
            T::Err: std::fmt::Display,
        {
            let v = v.ok_or_else(|| DistError::Env { var, message: "not set".into() })?;
            v.trim()
                .parse()
                .map_err(|e| DistError::Env { var, message: format!("`{v}` is not a valid value: {e}") })
        }
        let world_size: usize = match get("WORLD_SIZE") {
            None => return Ok(None),
            v => parse("WORLD_SIZE", v)?,
        };
        if world_size <= 1 {
            return Ok(None);
        }
        let rank: usize = parse("RANK", get("RANK"))?;
        if rank >= world_size {
            return Err(DistError::Env {
                var: "RANK",
                message: format!("{rank} is not below WORLD_SIZE {world_size}"),
            });
        }
        let local_rank = match get("LOCAL_RANK") {
            None => rank,
            v => parse("LOCAL_RANK", v)?,
        };
        let master_addr = get("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or(DistError::Env { var: "MASTER_ADDR", message: "not set".into() })?;
        let master_port = parse("MASTER_PORT", get("MASTER_PORT"))?;
        Ok(Some(DistEnv { rank, world_size, local_rank, master_addr, master_port }))
    }

    /// [`DistEnv::from_vars`] over the process environment.
    pub fn from_env() -> Result<Option<DistEnv>, DistError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Whether the store is on this machine's loopback (every rank on one machine).
    fn is_loopback(&self) -> bool {
        let a = self.master_addr.trim();
        a == "localhost" || a == "::1" || a.starts_with("127.")
    }
}

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors, TCP between the ranks.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors on device `LOCAL_RANK` (needs the `cuda` feature).
    Nccl,
}

mod ffi {
    use std::ffi::{c_char, c_void};

    #[repr(C)]
    pub struct Group {
        _private: [u8; 0],
    }

    unsafe extern "C" {
        pub fn nibble_dist_free_error(msg: *mut c_char);
        pub fn nibble_dist_new_gloo(
            host: *const c_char,
            port: u16,
            rank: i32,
            world: i32,
            timeout_ms: i64,
            device_host: *const c_char,
            device_iface: *const c_char,
            out: *mut *mut Group,
        ) -> *mut c_char;
        pub fn nibble_dist_free_group(g: *mut Group);
        pub fn nibble_dist_allreduce(g: *mut Group, t: *mut c_void, op: i32, timeout_ms: i64) -> *mut c_char;
        pub fn nibble_dist_broadcast(
            g: *mut Group,
            t: *mut c_void,
            root: i32,
            timeout_ms: i64,
        ) -> *mut c_char;
        pub fn nibble_dist_barrier(g: *mut Group, timeout_ms: i64) -> *mut c_char;
        #[cfg(feature = "cuda")]
        pub fn nibble_dist_new_nccl(
            host: *const c_char,
            port: u16,
            rank: i32,
            world: i32,
            timeout_ms: i64,
            device: i32,
            out: *mut *mut Group,
        ) -> *mut c_char;
    }
}

/// Take ownership of an error string from the shim.
fn take_error(msg: *mut c_char) -> Option<String> {
    if msg.is_null() {
        return None;
    }
    // SAFETY: a non-null return of the shim is a NUL-terminated malloc'd string it gave up.
    let s = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    // SAFETY: freed once, by the allocator that made it.
    unsafe { ffi::nibble_dist_free_error(msg) };
    Some(s)
}

/// A group of processes that train together (c10d TCPStore + ProcessGroupGloo).
pub struct ProcessGroup {
    group: *mut ffi::Group,
    env: DistEnv,
    timeout: Duration,
    backend: Backend,
    device: Device,
}

// SAFETY: the c10d backend is used from one thread at a time (`&mut`-free API but no interior
// sharing across threads: `ProcessGroup` is not `Sync`); moving it between threads is fine.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("env", &self.env)
            .field("backend", &self.backend)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `group` came from `nibble_dist_new_gloo` and is freed once.
        unsafe { ffi::nibble_dist_free_group(self.group) };
    }
}

fn timeout_ms(t: Duration) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX).max(1)
}

impl ProcessGroup {
    /// The group torchrun's variables describe, or `None` for a single process; every rank
    /// blocks here until all have arrived (or `timeout` passes: an error).
    pub fn from_env(timeout: Duration) -> Result<Option<ProcessGroup>, DistError> {
        match DistEnv::from_env()? {
            Some(env) => Self::new(env, timeout).map(Some),
            None => Ok(None),
        }
    }

    /// Rendezvous at `env.master_addr:env.master_port` (rank 0 serves the store) and connect
    /// every pair of ranks with Gloo; `timeout` bounds the rendezvous and every later collective.
    pub fn new(env: DistEnv, timeout: Duration) -> Result<ProcessGroup, DistError> {
        Self::with_backend(env, timeout, Backend::Gloo)
    }

    /// [`ProcessGroup::new`] on a chosen backend: NCCL puts this rank on CUDA device
    /// `env.local_rank` and sums CUDA tensors; without the `cuda` feature it is an error.
    pub fn with_backend(
        env: DistEnv,
        timeout: Duration,
        backend: Backend,
    ) -> Result<ProcessGroup, DistError> {
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let rendezvous = |message: String| DistError::Rendezvous {
            rank: env.rank,
            world_size: env.world_size,
            addr: addr.clone(),
            timeout,
            message,
        };
        let cstr = |s: &str| CString::new(s).map_err(|e| rendezvous(e.to_string()));
        let host = cstr(&env.master_addr)?;
        // Gloo binds each rank's transport to an address peers can reach: loopback when the
        // store is, else the interface torch's GLOO_SOCKET_IFNAME names, else the hostname's.
        let iface = std::env::var("GLOO_SOCKET_IFNAME").unwrap_or_default();
        let device_host = cstr(if env.is_loopback() { "127.0.0.1" } else { "" })?;
        let device_iface = cstr(&iface)?;
        let rank = i32::try_from(env.rank).map_err(|e| rendezvous(e.to_string()))?;
        let world = i32::try_from(env.world_size).map_err(|e| rendezvous(e.to_string()))?;
        let mut group = std::ptr::null_mut();
        let device = match backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl => Device::Cuda(env.local_rank),
        };
        if backend == Backend::Nccl {
            #[cfg(feature = "cuda")]
            {
                let dev = i32::try_from(env.local_rank).map_err(|e| rendezvous(e.to_string()))?;
                // SAFETY: valid C strings outlive the call; `group` is written on success.
                let err = unsafe {
                    ffi::nibble_dist_new_nccl(
                        host.as_ptr(),
                        env.master_port,
                        rank,
                        world,
                        timeout_ms(timeout),
                        dev,
                        &mut group,
                    )
                };
                if let Some(message) = take_error(err) {
                    return Err(rendezvous(message));
                }
                tracing::debug!(rank = env.rank, world_size = env.world_size, %addr, "process group ready (nccl)");
                return Ok(ProcessGroup { group, env, timeout, backend, device });
            }
            #[cfg(not(feature = "cuda"))]
            return Err(rendezvous("NCCL needs dist's `cuda` feature; this build has Gloo only".into()));
        }
        // SAFETY: valid C strings outlive the call; `group` is written on success.
        let err = unsafe {
            ffi::nibble_dist_new_gloo(
                host.as_ptr(),
                env.master_port,
                rank,
                world,
                timeout_ms(timeout),
                device_host.as_ptr(),
                device_iface.as_ptr(),
                &mut group,
            )
        };
        if let Some(message) = take_error(err) {
            return Err(rendezvous(message));
        }
        tracing::debug!(rank = env.rank, world_size = env.world_size, %addr, "process group ready (gloo)");
        Ok(ProcessGroup { group, env, timeout, backend, device })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.env.rank
    }

    /// Ranks in the group.
    pub fn world_size(&self) -> usize {
        self.env.world_size
    }

    /// This process's rank on its machine.
    pub fn local_rank(&self) -> usize {
        self.env.local_rank
    }

    /// Whether this is rank 0 (the one that logs and saves).
    pub fn is_main(&self) -> bool {
        self.env.rank == 0
    }

    /// The timeout of every collective.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The backend carrying the collectives.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where this rank's tensors must live for the collectives (CPU for Gloo).
    pub fn device(&self) -> Device {
        self.device
    }

    fn collective(&self, op: &'static str, err: *mut c_char) -> Result<(), DistError> {
        match take_error(err) {
            None => Ok(()),
            Some(message) => Err(DistError::Collective {
                op,
                rank: self.env.rank,
                world_size: self.env.world_size,
                timeout: self.timeout,
                message,
            }),
        }
    }

    fn tensor_err(&self, op: &'static str) -> impl Fn(tch::TchError) -> DistError + '_ {
        move |e| DistError::Tensor { op, rank: self.env.rank, message: e.to_string() }
    }

    /// Sum (`op` 0) or maximum (`op` 1) of one dense contiguous tensor over the ranks, in place.
    fn all_reduce_one(&self, t: &Tensor, op: i32) -> Result<(), DistError> {
        // SAFETY: `t` is a live tensor; the shim only copies the handle (sharing its storage).
        let err = unsafe {
            ffi::nibble_dist_allreduce(self.group, t.as_ptr() as *mut _, op, timeout_ms(self.timeout))
        };
        self.collective("all_reduce", err)
    }

    /// Sum `tensors` over the ranks, in place, flattened into buckets of about [`BUCKET_BYTES`]
    /// (one message per bucket rather than per tensor). Every rank must pass tensors of the same
    /// shapes, kinds and order.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<(), DistError> {
        let op = "all_reduce";
        let terr = self.tensor_err(op);
        let mut start = 0;
        while start < tensors.len() {
            let first = &tensors[start];
            if !first.defined() {
                return Err(DistError::Tensor {
                    op,
                    rank: self.env.rank,
                    message: format!("tensor {start} is undefined (a parameter without a gradient?)"),
                });
            }
            let (kind, device) = (first.f_kind().map_err(&terr)?, first.device());
            let mut end = start;
            let mut bytes = 0usize;
            while end < tensors.len() {
                let t = &tensors[end];
                if !t.defined() || t.f_kind().map_err(&terr)? != kind || t.device() != device {
                    break;
                }
                let b = t.numel() * kind.elt_size_in_bytes();
                if end > start && bytes + b > BUCKET_BYTES {
                    break;
                }
                bytes += b;
                end += 1;
            }
            let bucket = &mut tensors[start..end];
            if bucket.len() == 1 && bucket[0].is_contiguous() {
                self.all_reduce_one(&bucket[0], 0)?;
            } else {
                let flat: Vec<Tensor> =
                    bucket.iter().map(|t| t.f_reshape([-1])).collect::<Result<_, _>>().map_err(&terr)?;
                let flat = Tensor::f_cat(&flat, 0).map_err(&terr)?;
                self.all_reduce_one(&flat, 0)?;
                let mut at = 0i64;
                for t in bucket.iter_mut() {
                    let n = t.numel() as i64;
                    let part =
                        flat.f_narrow(0, at, n).map_err(&terr)?.f_view(t.size().as_slice()).map_err(&terr)?;
                    t.f_copy_(&part).map_err(&terr)?;
                    at += n;
                }
            }
            start = end;
        }
        Ok(())
    }

    /// The sum of `value` over the ranks (in f64).
    pub fn all_reduce_scalar(&self, value: f64) -> Result<f64, DistError> {
        let terr = self.tensor_err("all_reduce");
        let t = Tensor::from_slice(&[value]).f_to_device(self.device).map_err(&terr)?;
        self.all_reduce_one(&t, 0)?;
        t.f_double_value(&[0]).map_err(terr)
    }

    /// Whether every rank passes the same `values` (settings that must agree across ranks, such
    /// as the data size or the step a run resumes from): one all-reduce of the maxima of `v` and
    /// `-v`.
    pub fn all_equal(&self, values: &[f64]) -> Result<bool, DistError> {
        let local: Vec<f64> = values.iter().copied().chain(values.iter().map(|v| -v)).collect();
        let terr = self.tensor_err("all_reduce");
        let t = Tensor::from_slice(&local).f_to_device(self.device).map_err(&terr)?;
        self.all_reduce_one(&t, 1)?;
        let max: Vec<f64> =
            Vec::<f64>::try_from(&t.f_to_device(Device::Cpu).map_err(&terr)?).map_err(terr)?;
        let n = values.len();
        Ok((0..n).all(|i| max[i] == -max[n + i]))
    }

    /// Make every rank's `tensor` (dense, contiguous, same shape everywhere) equal to `root`'s.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), DistError> {
        let op = "broadcast";
        if root >= self.env.world_size || !tensor.is_contiguous() {
            return Err(DistError::Tensor {
                op,
                rank: self.env.rank,
                message: format!(
                    "root {root} of {} ranks, contiguous: {}",
                    self.env.world_size,
                    tensor.is_contiguous()
                ),
            });
        }
        // SAFETY: a live tensor; the shim shares its storage for the duration of the call.
        let err = unsafe {
            ffi::nibble_dist_broadcast(
                self.group,
                tensor.as_mut_ptr() as *mut _,
                root as i32,
                timeout_ms(self.timeout),
            )
        };
        self.collective(op, err)
    }

    /// Return once every rank has reached this point.
    pub fn barrier(&self) -> Result<(), DistError> {
        // SAFETY: `group` is live.
        let err = unsafe { ffi::nibble_dist_barrier(self.group, timeout_ms(self.timeout)) };
        self.collective("barrier", err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn env_is_absent_for_one_process() {
        assert_eq!(DistEnv::from_vars(vars(&[])).ok(), Some(None));
        assert_eq!(DistEnv::from_vars(vars(&[("WORLD_SIZE", "1"), ("RANK", "0")])).ok(), Some(None));
    }

    #[test]
    fn env_reads_torchrun_variables() {
        let e = DistEnv::from_vars(vars(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29511"),
        ]));
        let Ok(Some(e)) = e else { panic!("{e:?}") };
        assert_eq!((e.rank, e.world_size, e.local_rank, e.master_port), (1, 2, 1, 29511));
        assert!(e.is_loopback());
    }

    #[test]
    fn env_errors_name_the_variable() {
        for (pairs, var) in [
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "two")], "WORLD_SIZE"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "RANK"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")], "MASTER_ADDR"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "x")],
                "MASTER_PORT",
            ),
        ] {
            match DistEnv::from_vars(vars(&pairs)) {
                Err(DistError::Env { var: v, .. }) => assert_eq!(v, var, "{pairs:?}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }
}
