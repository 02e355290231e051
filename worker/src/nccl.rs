//! Gradient all-reduce between GPUs with NCCL, through cudarc's NCCL module (the `nccl-rs`
//! crate the design named is not published; ARCHITECTURE.md). NCCL is loaded at run time
//! (`libnccl.so`; NVIDIA's wheel ships `libnccl.so.2`, so link that name, as the container image
//! and scripts/gpu-check.sh do), so nothing here is needed to build or to run on CPU.
//!
//! The unique id that builds a communicator is made by every CUDA worker ([`new_id`]) and sent
//! with its Join; the coordinator hands the generation's rank 0's to every rank
//! (`JoinReply.nccl_id`), so each generation gets a fresh communicator. Every call that can
//! wait on a peer (the communicator's setup, each all-reduce until its completion on the
//! stream) runs under a [`Watchdog`]: past `elastic.collective_timeout_s` the worker aborts with
//! a clear error instead of hanging, and the job restarts from its last checkpoint.
//!
//! Compiled everywhere; it has not run yet (no GPU was at hand): scripts/gpu-check.sh runs a
//! 1-rank communicator through [`NcclRing::all_reduce_sum`].

use crate::watchdog::Watchdog;
use cudarc::driver::{CudaStream, CudaViewMut};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The size of an NCCL unique id.
pub const ID_BYTES: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    #[error("no NCCL library found (libnccl.so): install NCCL (NVIDIA's nvidia-nccl-cu12 wheel ships libnccl.so.2: link it as libnccl.so) and put its folder on LD_LIBRARY_PATH")]
    Missing,
    #[error("NCCL {what}: {code:?}")]
    Call { what: String, code: cudarc::nccl::sys::ncclResult_t },
    #[error("an NCCL unique id is {ID_BYTES} bytes; got {0}")]
    BadId(usize),
    #[error("CUDA: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("the all-reduce was cancelled: the job is restarting")]
    Cancelled,
}

/// Whether `libnccl` can be loaded (cudarc panics on first use otherwise).
pub fn available() -> bool {
    #[allow(unsafe_code)]
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe {
        cudarc::nccl::sys::is_culib_present()
    }
}

/// A fresh unique id, as bytes for the Join.
pub fn new_id() -> Result<Vec<u8>, NcclError> {
    if !available() {
        return Err(NcclError::Missing);
    }
    let id = Id::new().map_err(|e| NcclError::Call { what: "ncclGetUniqueId".into(), code: e.0 })?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// One rank's communicator of a generation.
pub struct NcclRing {
    comm: Comm,
    stream: Arc<CudaStream>,
    watchdog: Watchdog,
}

impl std::fmt::Debug for NcclRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclRing(rank {} of {})", self.comm.rank(), self.comm.world_size())
    }
}

impl NcclRing {
    /// Joins the communicator of `id` (rank 0's, relayed by the coordinator) as `rank` of
    /// `world`, on `stream`. Waits for every rank, under the watchdog.
    pub fn connect(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: &[u8],
        watchdog: Watchdog,
    ) -> Result<Self, NcclError> {
        if !available() {
            return Err(NcclError::Missing);
        }
        let bytes: [u8; ID_BYTES] = id.try_into().map_err(|_| NcclError::BadId(id.len()))?;
        let id = Id::uninit(bytes.map(|b| b as core::ffi::c_char));
        let _armed = watchdog.arm(&format!("NCCL communicator setup (rank {rank} of {world})"));
        let comm = Comm::from_rank(Arc::clone(&stream), rank, world, id)
            .map_err(|e| NcclError::Call { what: "ncclCommInitRank".into(), code: e.0 })?;
        Ok(NcclRing { comm, stream, watchdog })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Sums `buf` over the ranks, in place, and waits until the sum is complete on the stream
    /// (polling, so that the watchdog, not the driver, decides how long is too long, and so
    /// that `cancel`, set when the job restarts, stops the wait: the caller then drops this
    /// communicator, which aborts it). Returns the time it took.
    pub fn all_reduce_sum(
        &self,
        buf: &mut CudaViewMut<'_, f32>,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<Duration, NcclError> {
        let start = Instant::now();
        self.all_reduce_async(buf)?;
        self.wait(&format!("NCCL all-reduce of {} floats", buf.len()), cancel)?;
        Ok(start.elapsed())
    }

    /// Queues an in-place sum of `buf` on this communicator's stream and returns at once
    /// (cudarc orders it after the buffer's last write on another stream).
    pub fn all_reduce_async<B: cudarc::driver::DevicePtrMut<f32>>(&self, buf: &mut B) -> Result<(), NcclError> {
        self.comm
            .all_reduce_in_place(buf, &ReduceOp::Sum)
            .map_err(|e| NcclError::Call { what: "ncclAllReduce".into(), code: e.0 })?;
        Ok(())
    }

    /// An event recorded on this communicator's stream now (for timing its work).
    pub fn mark(&self) -> Result<cudarc::driver::CudaEvent, NcclError> {
        Ok(self.stream.record_event(None)?)
    }

    /// Waits until everything queued on this communicator's stream is done, under the
    /// watchdog (named `what`), stopping early when `cancel` is set.
    pub fn wait(&self, what: &str, cancel: Option<&std::sync::atomic::AtomicBool>) -> Result<Duration, NcclError> {
        let start = Instant::now();
        let _armed = self.watchdog.arm(what);
        let done = self.stream.record_event(None)?;
        while !done.try_is_complete()? {
            if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
                return Err(NcclError::Cancelled);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(start.elapsed())
    }
}
