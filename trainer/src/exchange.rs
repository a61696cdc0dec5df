//! The collective gradient exchange: the ranks of a step sum their gradients among
//! themselves (NCCL between GPUs) instead of through the object store.
//!
//! A step is exchanged collectively when `[trainer] exchange` is not `store`, no rank of the
//! step has written a gradient object yet, at least `world_size` trainers are alive, and every
//! rank's holder arrives at the step's rendezvous before the deadline:
//!
//! 1. Each holder writes an [`Arrival`] to [`flywheel_storage::keys::step_exchange`]: its
//!    member id and the communicator it keeps from an earlier step ([`Held`]). It reads the
//!    others' until all `world_size` are there.
//! 2. [`plan`] decides from the arrivals alone, so every member decides the same: when every
//!    member holds the same communicator of this size it is kept (members may hold other
//!    ranks than last step: [`Plan::Reuse`] maps step ranks to communicator ranks), else a
//!    new one is formed ([`Plan::Form`]): rank 0's holder makes its id and writes it beside
//!    the arrivals ([`NewCommunicator`], tagged with the attempt named in rank 0's arrival,
//!    so a stale one is never used). The communicator is therefore re-formed exactly when the
//!    world size or the member set changes, and an id is made only when one is used (an NCCL
//!    id holds a listening thread until its members connect).
//! 3. [`all_gather_sum`] gathers every rank's gradient, chunk by chunk, and adds them in step
//!    rank order from zero: the bits [`crate::service`]'s object-store sum gives, so a step
//!    redone or replayed either way reaches the same weights. (An NCCL all-reduce sums in an
//!    order of its own, and a replay could not reproduce it.)
//!
//! Every wait has the step's deadline (`exchange_timeout_ms`); a member that misses it, a
//! failed NCCL call or a plan that cannot be made falls back to the object store for that
//! step, and the service records why.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flywheel_model::cuda::{NcclComm, nccl_unique_id};
use flywheel_model::{ModelError, Params};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How the ranks of a step bring their gradients together (`[trainer] exchange`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExchangeKind {
    /// Every rank writes its gradient to the object store and the finisher sums them.
    #[default]
    Store,
    /// NCCL among the trainers' GPUs (`device` must be a GPU), the object store as fallback.
    Nccl,
    /// The same protocol among trainers of one process (tests and embedded runs).
    InProcess,
}

/// Why an exchange did not happen; the step falls back to the object store.
#[derive(Debug, Error)]
#[error("gradient exchange: {0}")]
pub struct ExchangeError(pub String);

impl From<ModelError> for ExchangeError {
    fn from(e: ModelError) -> Self {
        ExchangeError(e.to_string())
    }
}

/// One member of a group that gathers buffers among its members.
pub trait Communicator: Send + Sync {
    /// This member's rank in the group.
    fn rank(&self) -> usize;
    /// The number of members.
    fn size(&self) -> usize;
    /// Gathers every member's `send` into `recv` (member k's at `k * send.len()`) by
    /// `deadline`; every member passes the same length.
    fn all_gather(
        &mut self,
        send: &[f32],
        recv: &mut [f32],
        deadline: Instant,
    ) -> Result<(), ExchangeError>;
}

/// Makes communicators.
pub trait Collective: Send + Sync {
    /// A fresh id for a new group (made by rank 0's holder).
    fn new_id(&self) -> Result<Vec<u8>, ExchangeError>;
    /// Joins group `id` as member `rank` of `size`, waiting for the others until `deadline`.
    fn connect(
        &self,
        id: &[u8],
        size: usize,
        rank: usize,
        deadline: Instant,
    ) -> Result<Box<dyn Communicator>, ExchangeError>;
}

/// The collective of `kind` for a trainer on GPU `gpu` (`None`: the CPU); `None` for the
/// object store alone.
pub fn open(
    kind: ExchangeKind,
    gpu: Option<usize>,
) -> Result<Option<Arc<dyn Collective>>, ExchangeError> {
    Ok(match kind {
        ExchangeKind::Store => None,
        ExchangeKind::InProcess => Some(Arc::new(InProcess)),
        ExchangeKind::Nccl => {
            let ordinal = gpu.ok_or_else(|| {
                ExchangeError(
                    "exchange = \"nccl\" needs the trainer on a GPU (device = \"cuda\"); this \
                     trainer runs on the CPU: use exchange = \"store\""
                        .into(),
                )
            })?;
            flywheel_model::cuda::require_nccl()?;
            Some(Arc::new(Nccl { ordinal }))
        }
    })
}

/// What a rank's holder writes at a step's rendezvous.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arrival {
    /// The step rank it holds.
    pub rank: u32,
    /// The trainer.
    pub member: String,
    /// The communicator it keeps from an earlier step.
    pub held: Option<Held>,
    /// Rank 0 only: names this attempt at the rendezvous, so the members take the
    /// [`NewCommunicator`] written for it and no older one.
    pub attempt: Option<String>,
}

/// The id of a communicator being formed, written by rank 0's holder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewCommunicator {
    /// Rank 0's [`Arrival::attempt`].
    pub attempt: String,
    /// The id.
    pub id: Vec<u8>,
}

/// A communicator a trainer keeps between steps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Its id, the same for every member.
    pub id: Vec<u8>,
    /// Its number of members.
    pub size: usize,
    /// This trainer's rank in it.
    pub rank: usize,
}

/// What the members of a step do, decided by [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Keep the communicator every member holds; `order[r]` is the communicator rank of the
    /// holder of step rank r.
    Reuse {
        /// Communicator rank by step rank.
        order: Vec<usize>,
    },
    /// Form a new communicator (rank 0's holder makes its id); communicator ranks are step
    /// ranks.
    Form,
}

impl Plan {
    /// Communicator rank by step rank.
    pub fn order(&self, world: usize) -> Vec<usize> {
        match self {
            Plan::Reuse { order } => order.clone(),
            Plan::Form => (0..world).collect(),
        }
    }
}

/// Decides from the step's arrivals (one per rank, in rank order) whether the members keep
/// their communicator or form a new one. Every member calls it on the same arrivals and gets
/// the same answer.
pub fn plan(arrivals: &[Arrival]) -> Result<Plan, ExchangeError> {
    let world = arrivals.len();
    for (r, a) in arrivals.iter().enumerate() {
        if a.rank as usize != r {
            return Err(ExchangeError(format!("arrival {r} is for rank {}", a.rank)));
        }
        if arrivals[..r].iter().any(|b| b.member == a.member) {
            return Err(ExchangeError(format!(
                "trainer `{}` holds two ranks of the step",
                a.member
            )));
        }
    }
    let first = arrivals.first().and_then(|a| a.held.as_ref());
    if let Some(first) = first {
        let same = |h: &Option<Held>| {
            h.as_ref()
                .is_some_and(|h| h.id == first.id && h.size == world)
        };
        let mut order: Vec<usize> = Vec::with_capacity(world);
        if arrivals.iter().all(|a| same(&a.held)) {
            order.extend(arrivals.iter().map(|a| a.held.as_ref().expect("same").rank));
            let mut seen = vec![false; world];
            let distinct = order
                .iter()
                .all(|&c| c < world && !std::mem::replace(&mut seen[c], true));
            if distinct {
                return Ok(Plan::Reuse { order });
            }
        }
    }
    if arrivals.first().is_none_or(|a| a.attempt.is_none()) {
        return Err(ExchangeError("rank 0's arrival names no attempt".into()));
    }
    Ok(Plan::Form)
}

/// Values gathered per call: bounds the receive buffer (`size` × this) of each member.
pub const CHUNK_VALUES: usize = 1 << 22;

/// Sums `grads` over the members of `comm`: each tensor is gathered in chunks of at most
/// `chunk` values and added in step-rank order (`order[r]`: the communicator rank of step
/// rank r), starting from zero. Every member gets the same sum.
pub fn all_gather_sum(
    comm: &mut dyn Communicator,
    grads: &Params,
    order: &[usize],
    chunk: usize,
    deadline: Instant,
) -> Result<Params, ExchangeError> {
    let size = comm.size();
    if order.len() != size {
        return Err(ExchangeError(format!(
            "{} step ranks for a communicator of {size}",
            order.len()
        )));
    }
    let mut sum = grads.clone();
    let chunk = chunk.max(1);
    let mut recv = Vec::new();
    for t in sum.tensors_mut() {
        for out in t.data.chunks_mut(chunk) {
            let n = out.len();
            recv.resize(n * size, 0.0);
            comm.all_gather(out, &mut recv, deadline)?;
            for (i, v) in out.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for &c in order {
                    acc += recv[c * n + i];
                }
                *v = acc;
            }
        }
    }
    Ok(sum)
}

/// Waits until every member reached this call (or `deadline`).
pub fn barrier(comm: &mut dyn Communicator, deadline: Instant) -> Result<(), ExchangeError> {
    let mut recv = vec![0.0; comm.size()];
    comm.all_gather(&[0.0], &mut recv, deadline)
}

/// NCCL on one GPU per trainer.
struct Nccl {
    ordinal: usize,
}

impl Collective for Nccl {
    fn new_id(&self) -> Result<Vec<u8>, ExchangeError> {
        Ok(nccl_unique_id()?.to_vec())
    }

    fn connect(
        &self,
        id: &[u8],
        size: usize,
        rank: usize,
        deadline: Instant,
    ) -> Result<Box<dyn Communicator>, ExchangeError> {
        Ok(Box::new(NcclComm::connect(
            self.ordinal,
            id,
            size,
            rank,
            deadline,
        )?))
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        NcclComm::rank(self)
    }

    fn size(&self) -> usize {
        NcclComm::size(self)
    }

    fn all_gather(
        &mut self,
        send: &[f32],
        recv: &mut [f32],
        deadline: Instant,
    ) -> Result<(), ExchangeError> {
        Ok(NcclComm::all_gather(self, send, recv, deadline)?)
    }
}

/// Groups of trainers of this process, by id.
static GROUPS: LazyLock<Mutex<HashMap<Vec<u8>, Arc<Group>>>> = LazyLock::new(Default::default);

/// The in-process collective: members are trainers of this process, meeting in [`GROUPS`].
struct InProcess;

struct Group {
    size: usize,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Default)]
struct GroupState {
    /// Members that joined (and have not left).
    joined: Vec<bool>,
    /// The gather in progress and each member's contribution to it.
    round: u64,
    slots: Vec<Option<Vec<f32>>>,
    /// Members that copied the current round out.
    read: usize,
    /// A member missed a deadline or left: every later call fails.
    broken: bool,
}

impl Group {
    /// Waits on the group until `done` holds, the group breaks or `deadline` passes (which
    /// breaks it).
    fn wait<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, GroupState>,
        deadline: Instant,
        what: &str,
        done: impl Fn(&GroupState) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, GroupState>, ExchangeError> {
        loop {
            if done(&state) {
                return Ok(state);
            }
            if state.broken {
                return Err(ExchangeError(format!(
                    "{what}: a member of the group failed or left"
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                state.broken = true;
                self.changed.notify_all();
                return Err(ExchangeError(format!(
                    "{what}: a member did not answer before the deadline"
                )));
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("group lock")
                .0;
        }
    }
}

impl Collective for InProcess {
    fn new_id(&self) -> Result<Vec<u8>, ExchangeError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut id = nanos.to_le_bytes().to_vec();
        id.extend(NEXT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        Ok(id)
    }

    fn connect(
        &self,
        id: &[u8],
        size: usize,
        rank: usize,
        deadline: Instant,
    ) -> Result<Box<dyn Communicator>, ExchangeError> {
        if rank >= size {
            return Err(ExchangeError(format!("rank {rank} of a group of {size}")));
        }
        let group = GROUPS
            .lock()
            .expect("groups lock")
            .entry(id.to_vec())
            .or_insert_with(|| {
                Arc::new(Group {
                    size,
                    state: Mutex::new(GroupState {
                        joined: vec![false; size],
                        slots: vec![None; size],
                        ..GroupState::default()
                    }),
                    changed: Condvar::new(),
                })
            })
            .clone();
        if group.size != size {
            return Err(ExchangeError(format!(
                "group {id:?} has {} members, not {size}",
                group.size
            )));
        }
        let mut state = group.state.lock().expect("group lock");
        if std::mem::replace(&mut state.joined[rank], true) {
            return Err(ExchangeError(format!("rank {rank} of the group is taken")));
        }
        group.changed.notify_all();
        let member = InProcessMember {
            id: id.to_vec(),
            group: group.clone(),
            rank,
            round: 0,
        };
        let joined = group.wait(state, deadline, "connect", |s| s.joined.iter().all(|&j| j));
        drop(joined?);
        Ok(Box::new(member))
    }
}

/// A member of an in-process group.
struct InProcessMember {
    id: Vec<u8>,
    group: Arc<Group>,
    rank: usize,
    /// The next gather this member takes part in.
    round: u64,
}

impl Communicator for InProcessMember {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.group.size
    }

    fn all_gather(
        &mut self,
        send: &[f32],
        recv: &mut [f32],
        deadline: Instant,
    ) -> Result<(), ExchangeError> {
        let (n, size, round) = (send.len(), self.group.size, self.round);
        if recv.len() != n * size {
            return Err(ExchangeError(format!(
                "all-gather of {n} values among {size} needs {} to receive into",
                n * size
            )));
        }
        let group = &self.group;
        let state = group.state.lock().expect("group lock");
        // The previous gather must be drained by every member first.
        let mut state = group.wait(state, deadline, "all-gather", |s| s.round == round)?;
        state.slots[self.rank] = Some(send.to_vec());
        group.changed.notify_all();
        let mut state = group.wait(state, deadline, "all-gather", |s| {
            s.slots.iter().all(Option::is_some)
        })?;
        let sizes: Vec<usize> = state.slots.iter().flatten().map(Vec::len).collect();
        if let Some(k) = sizes.iter().position(|&len| len != n) {
            state.broken = true;
            group.changed.notify_all();
            return Err(ExchangeError(format!(
                "member {k} sent {} values, this member {n}",
                sizes[k]
            )));
        }
        for (k, slot) in state.slots.iter().flatten().enumerate() {
            recv[k * n..(k + 1) * n].copy_from_slice(slot);
        }
        state.read += 1;
        if state.read == size {
            state.read = 0;
            state.slots.iter_mut().for_each(|s| *s = None);
            state.round += 1;
            group.changed.notify_all();
        }
        self.round += 1;
        Ok(())
    }
}

impl Drop for InProcessMember {
    fn drop(&mut self) {
        let mut state = self.group.state.lock().expect("group lock");
        state.joined[self.rank] = false;
        state.broken = true;
        self.group.changed.notify_all();
        if state.joined.iter().all(|&j| !j) {
            drop(state);
            GROUPS.lock().expect("groups lock").remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_model::{ModelConfig, Tokenizer};
    use std::time::Duration;

    fn arrival(rank: u32, member: &str, held: Option<(&str, usize, usize)>) -> Arrival {
        Arrival {
            rank,
            member: member.into(),
            held: held.map(|(id, size, rank)| Held {
                id: id.into(),
                size,
                rank,
            }),
            attempt: (rank == 0).then(|| "a1".into()),
        }
    }

    #[test]
    fn the_communicator_is_kept_while_the_members_are_the_same() {
        // Same members, same communicator, ranks swapped between steps: kept, remapped.
        let p = plan(&[
            arrival(0, "b", Some(("aa", 2, 1))),
            arrival(1, "a", Some(("aa", 2, 0))),
        ])
        .unwrap();
        assert_eq!(p, Plan::Reuse { order: vec![1, 0] });
        assert_eq!(p.order(2), vec![1, 0]);
    }

    #[test]
    fn the_communicator_is_re_formed_when_the_world_or_the_members_change() {
        let form = Plan::Form;
        // A third trainer joined: the world grew from 2 to 3.
        let grown = [
            arrival(0, "a", Some(("aa", 2, 0))),
            arrival(1, "b", Some(("aa", 2, 1))),
            arrival(2, "c", None),
        ];
        assert_eq!(plan(&grown).unwrap(), form);
        // The world shrank to 1: the two-member communicator cannot serve it.
        assert_eq!(plan(&[arrival(0, "a", Some(("aa", 2, 0)))]).unwrap(), form);
        // Same size, but one member was replaced (it holds another group, or none).
        let replaced = [
            arrival(0, "a", Some(("aa", 2, 0))),
            arrival(1, "c", Some(("cc", 2, 1))),
        ];
        assert_eq!(plan(&replaced).unwrap(), form);
        let restarted = [arrival(0, "a", Some(("aa", 2, 0))), arrival(1, "b", None)];
        assert_eq!(plan(&restarted).unwrap(), form);
        // First step: nobody holds one.
        assert_eq!(
            plan(&[arrival(0, "a", None), arrival(1, "b", None)]).unwrap(),
            form
        );
    }

    #[test]
    fn a_plan_that_cannot_be_made_is_an_error() {
        let mut no_attempt = arrival(0, "a", None);
        no_attempt.attempt = None;
        assert!(plan(&[no_attempt, arrival(1, "b", None)]).is_err());
        let twice = plan(&[arrival(0, "a", None), arrival(1, "a", None)]).unwrap_err();
        assert!(twice.to_string().contains("holds two ranks"), "{twice}");
        // Two members claiming the same rank of a kept communicator cannot keep it.
        let clash = [
            arrival(0, "a", Some(("aa", 2, 0))),
            arrival(1, "b", Some(("aa", 2, 0))),
        ];
        assert_eq!(plan(&clash).unwrap(), Plan::Form);
    }

    fn grads(seed: u64) -> Params {
        let mut cfg = ModelConfig::tiny(Tokenizer::arithmetic().vocab_size());
        cfg.d_model = 8;
        cfg.n_heads = 2;
        cfg.d_ff = 16;
        cfg.max_seq_len = 8;
        Params::init(&cfg, seed).unwrap()
    }

    /// Runs `f(member)` for `size` members of one in-process group, each on its own thread.
    fn in_group<T: Send + 'static>(
        size: usize,
        f: impl Fn(usize, Box<dyn Communicator>) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let id = InProcess.new_id().unwrap();
        let f = Arc::new(f);
        let threads: Vec<_> = (0..size)
            .map(|rank| {
                let (id, f) = (id.clone(), f.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let comm = InProcess.connect(&id, size, rank, deadline).unwrap();
                    f(rank, comm)
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }

    #[test]
    fn the_gathered_sum_has_the_bits_of_the_rank_ordered_sum() {
        let world = 3;
        // Step rank r is held by communicator rank ORDER[r].
        const ORDER: [usize; 3] = [2, 0, 1];
        let sums = in_group(world, move |rank, mut comm| {
            let step_rank = ORDER.iter().position(|&o| o == rank).unwrap();
            let own = grads(10 + step_rank as u64);
            let deadline = Instant::now() + Duration::from_secs(60);
            // A chunk smaller than most tensors: several gathers per tensor.
            all_gather_sum(comm.as_mut(), &own, &ORDER, 7, deadline).unwrap()
        });
        // The object-store path: zero, then + rank 0, + rank 1, + rank 2.
        let mut expected = grads(10);
        for t in expected.tensors_mut() {
            t.data.iter_mut().for_each(|v| *v = 0.0);
        }
        for r in 0..world {
            let g = grads(10 + r as u64);
            for (t, s) in expected.tensors_mut().iter_mut().zip(g.tensors()) {
                t.data.iter_mut().zip(&s.data).for_each(|(a, b)| *a += b);
            }
        }
        let bits = |p: &Params| p.to_bytes_map();
        for sum in &sums {
            assert_eq!(bits(sum), bits(&expected));
        }
    }

    #[test]
    fn a_member_that_never_comes_fails_the_others_by_the_deadline() {
        let id = InProcess.new_id().unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        let e = InProcess.connect(&id, 2, 0, deadline).err().unwrap();
        assert!(e.to_string().contains("before the deadline"), "{e}");

        // A member that leaves mid-exchange breaks the group for the one still in it.
        let results = in_group(2, |rank, mut comm| {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut recv = [0.0; 2];
            let first = comm.all_gather(&[1.0], &mut recv, deadline);
            if rank == 1 {
                drop(comm);
                return (first.is_ok(), true);
            }
            let second = comm.all_gather(&[1.0], &mut recv, deadline);
            (first.is_ok(), second.is_ok())
        });
        assert_eq!(results, vec![(true, false), (true, true)]);
    }

    #[test]
    fn nccl_needs_a_gpu_trainer() {
        let e = open(ExchangeKind::Nccl, None).err().unwrap();
        assert!(e.to_string().contains("needs the trainer on a GPU"), "{e}");
        assert!(open(ExchangeKind::Store, None).unwrap().is_none());
        assert!(open(ExchangeKind::InProcess, None).unwrap().is_some());
    }
}
