//! An NCCL communicator with deadlines: every call returns by its deadline.
//!
//! NCCL's blocking calls wait for every member, for ever if one is gone. This communicator is
//! created non-blocking (`ncclConfig_t::blocking = 0`), so initialisation and collectives
//! return at once and are polled (`ncclCommGetAsyncError`, a CUDA event) until they complete
//! or the deadline passes; then the communicator is aborted (`ncclCommAbort`) and the call
//! fails. libnccl is loaded on first use, never at build time.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;

use super::{cuda_err, grown, guarded};
use crate::error::{ModelError, Result};

/// Bytes of an NCCL unique id (what members exchange to form a communicator).
pub const NCCL_ID_BYTES: usize = 128;

/// `NCCL_CONFIG_UNDEF_INT`: "use NCCL's default" for an integer field of the config.
const UNDEF: i32 = i32::MIN;

/// How long to sleep between polls of an operation in progress.
const POLL: Duration = Duration::from_micros(200);

fn nccl_err(what: &str, code: sys::ncclResult_t) -> ModelError {
    // Safety: ncclGetErrorString returns a static NUL-terminated string for any code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(code)) };
    ModelError::Backend(format!(
        "NCCL {what}: {} ({code:?})",
        text.to_string_lossy()
    ))
}

/// Fails, saying what to do, unless libnccl loads.
pub fn require_nccl() -> Result<()> {
    // Safety: only tries to dlopen the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(ModelError::Backend(
        "libnccl.so (NCCL 2) not found: put NCCL's lib directory on LD_LIBRARY_PATH (the \
         nvidia-nccl wheel ships libnccl.so.2; link it as libnccl.so), or set \
         `[trainer] exchange = \"store\"`"
            .into(),
    ))
}

/// A fresh NCCL unique id, made by the member that proposes a new communicator.
pub fn nccl_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    require_nccl()?;
    guarded("NCCL", || {
        let mut id = MaybeUninit::<sys::ncclUniqueId>::uninit();
        // Safety: ncclGetUniqueId fills the id it is given.
        let id = unsafe {
            sys::ncclGetUniqueId(id.as_mut_ptr())
                .result()
                .map_err(|e| nccl_err("unique id", e.0))?;
            id.assume_init()
        };
        Ok(id.internal.map(|c| c as u8))
    })
}

/// One member of an NCCL communicator on one GPU.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// Staging buffers on the GPU, grown to the largest call.
    send: Option<CudaSlice<f32>>,
    recv: Option<CudaSlice<f32>>,
}

// Safety: every NCCL call goes through `&mut self`, so one thread at a time uses the
// communicator (NCCL allows it to move between threads); `&self` only reads plain fields.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the communicator `id` as member `rank` of `size`, on GPU `ordinal`, waiting for
    /// the others until `deadline`.
    pub fn connect(
        ordinal: usize,
        id: &[u8],
        size: usize,
        rank: usize,
        deadline: Instant,
    ) -> Result<Self> {
        let internal: [u8; NCCL_ID_BYTES] = id.try_into().map_err(|_| {
            ModelError::Backend(format!(
                "an NCCL id has {NCCL_ID_BYTES} bytes, not {}",
                id.len()
            ))
        })?;
        if rank >= size {
            return Err(ModelError::Backend(format!(
                "NCCL rank {rank} of a communicator of {size}"
            )));
        }
        require_nccl()?;
        guarded("NCCL", || {
            let ctx = CudaContext::new(ordinal).map_err(cuda_err("context"))?;
            let stream = ctx.new_stream().map_err(cuda_err("stream"))?;
            ctx.bind_to_thread().map_err(cuda_err("bind"))?;
            let mut version = 0;
            // Safety: plain FFI calls with valid pointers; the config is fully initialised
            // (as NCCL_CONFIG_INITIALIZER does) before it is passed.
            let comm = unsafe {
                sys::ncclGetVersion(&mut version)
                    .result()
                    .map_err(|e| nccl_err("version", e.0))?;
                let mut config = config(version);
                let mut comm = MaybeUninit::<sys::ncclComm_t>::uninit();
                sys::ncclCommInitRankConfig(
                    comm.as_mut_ptr(),
                    size as i32,
                    sys::ncclUniqueId {
                        internal: internal.map(|b| b as _),
                    },
                    rank as i32,
                    &mut config,
                )
                .result()
                .map_err(|e| nccl_err("init", e.0))?;
                comm.assume_init()
            };
            let mut nccl = NcclComm {
                comm,
                stream,
                rank,
                size,
                send: None,
                recv: None,
            };
            nccl.wait_async("init", deadline)?;
            Ok(nccl)
        })
    }

    /// This member's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Gathers every member's `send` into `recv` (member k's at `k * send.len()`), by
    /// `deadline`. Every member passes the same length.
    pub fn all_gather(&mut self, send: &[f32], recv: &mut [f32], deadline: Instant) -> Result<()> {
        let n = send.len();
        if recv.len() != n * self.size {
            return Err(ModelError::Backend(format!(
                "all-gather of {n} values among {} needs {} to receive into, not {}",
                self.size,
                n * self.size,
                recv.len()
            )));
        }
        guarded("NCCL", || {
            let stream = self.stream.clone();
            // The calls may come from another thread than `connect`'s: NCCL works on the
            // calling thread's current device.
            stream
                .context()
                .bind_to_thread()
                .map_err(cuda_err("bind"))?;
            let send_buf = grown(&stream, &mut self.send, n)?;
            stream
                .memcpy_htod(send, &mut send_buf.slice_mut(..n))
                .map_err(cuda_err("copy to the GPU"))?;
            let recv_buf = grown(&stream, &mut self.recv, n * self.size)?;
            {
                let (src, _src_done) = send_buf.device_ptr(&stream);
                let (dst, _dst_done) = recv_buf.device_ptr_mut(&stream);
                // Safety: both buffers live on this communicator's GPU and hold at least
                // n and n·size values.
                unsafe {
                    sys::ncclAllGather(
                        src as _,
                        dst as _,
                        n,
                        sys::ncclDataType_t::ncclFloat32,
                        self.comm,
                        stream.cu_stream() as _,
                    )
                    .result()
                    .map_err(|e| nccl_err("all-gather", e.0))?;
                }
            }
            self.wait_async("all-gather", deadline)?;
            let done = stream.record_event(None).map_err(cuda_err("event"))?;
            while !done.try_is_complete().map_err(cuda_err("all-gather"))? {
                self.check_async("all-gather")?;
                if Instant::now() >= deadline {
                    return Err(self.abort("all-gather"));
                }
                std::thread::sleep(POLL);
            }
            let recv_buf = self.recv.as_ref().expect("staged above");
            stream
                .memcpy_dtoh(&recv_buf.slice(..n * self.size), recv)
                .map_err(cuda_err("copy from the GPU"))
        })
    }

    /// Polls the communicator until its last operation is no longer in progress.
    fn wait_async(&mut self, what: &str, deadline: Instant) -> Result<()> {
        loop {
            match self.async_state(what)? {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress if Instant::now() < deadline => {
                    std::thread::sleep(POLL)
                }
                sys::ncclResult_t::ncclInProgress => return Err(self.abort(what)),
                code => return Err(nccl_err(what, code)),
            }
        }
    }

    /// Fails if the communicator reported an asynchronous error.
    fn check_async(&mut self, what: &str) -> Result<()> {
        match self.async_state(what)? {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            code => Err(nccl_err(what, code)),
        }
    }

    fn async_state(&self, what: &str) -> Result<sys::ncclResult_t> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // Safety: the communicator is live until drop.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) }
            .result()
            .map_err(|e| nccl_err(what, e.0))?;
        Ok(state)
    }

    /// Aborts the communicator (it is unusable afterwards) and returns the timeout error.
    fn abort(&mut self, what: &str) -> ModelError {
        if !self.comm.is_null() {
            // Safety: aborting a live communicator is always allowed; it is not used again.
            let _ = unsafe { sys::ncclCommAbort(self.comm) };
            self.comm = std::ptr::null_mut();
        }
        ModelError::Backend(format!(
            "NCCL {what}: a member did not answer before the deadline; the communicator was \
             aborted"
        ))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // Safety: abort frees the communicator without waiting for other members.
            let _ = unsafe { sys::ncclCommAbort(self.comm) };
        }
    }
}

/// NCCL_CONFIG_INITIALIZER with `blocking = 0`, for a library of `version`.
fn config(version: i32) -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_id_or_rank_is_refused_before_any_library_is_loaded() {
        let deadline = Instant::now();
        let short = NcclComm::connect(0, &[0; 12], 1, 0, deadline)
            .err()
            .unwrap();
        assert!(short.to_string().contains("128 bytes, not 12"), "{short}");
        let rank = NcclComm::connect(0, &[0; NCCL_ID_BYTES], 2, 2, deadline)
            .err()
            .unwrap();
        assert!(
            rank.to_string().contains("rank 2 of a communicator of 2"),
            "{rank}"
        );
    }

    #[test]
    fn a_missing_libnccl_is_an_error_that_says_what_to_do() {
        // Safety: only tries to dlopen the library.
        let present = unsafe { sys::is_culib_present() };
        match require_nccl() {
            Ok(()) => assert!(present, "libnccl reported present but not found"),
            Err(e) => {
                assert!(!present, "libnccl loads, yet: {e}");
                let e = e.to_string();
                assert!(e.contains("libnccl.so (NCCL 2) not found"), "{e}");
                assert!(e.contains("exchange = \"store\""), "{e}");
                // Making an id needs the library first.
                assert!(nccl_unique_id().is_err());
            }
        }
    }
}
