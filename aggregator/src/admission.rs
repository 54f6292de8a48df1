//! Who may hold what while a batch is in progress.
//!
//! Design constraints:
//! - **A slow body holds nothing scarce.** The body is read before a database
//!   slot is taken, so a client trickling bytes holds a connection and the
//!   bytes it has sent, never one of the `database.max_connections` slots.
//! - **One agent cannot take more than its share.** Each agent may have
//!   `admission.max_in_flight_per_agent` batches in progress (read, parsed or
//!   written); one more is refused at once with 429, before any body is read.
//!   Each tenant may hold `admission.max_in_flight_per_tenant` database slots,
//!   so the agents of one tenant cannot starve every other tenant.
//! - **Peak memory is set by configuration, not by connection count.** Every
//!   byte a batch holds (the compressed body, the decompressed JSON and the
//!   rows encoded for COPY) is reserved first from one budget of
//!   `admission.memory_budget` bytes, a semaphore on bytes.
//! - **A busy agent queues behind itself, not in front of others.** Inflating,
//!   parsing and writing a batch is where its CPU goes. An agent alone may
//!   run all its admitted batches through that stage at once (a lone agent
//!   draining a backlog pipelines); once another agent has sent within the
//!   last second, each agent runs at most `admission.fair_share` at once
//!   (default: half the CPU cores, at least 1) and the rest of its admitted
//!   batches wait their turn, body already read, without a database slot.
//! - Refusals are counted by reason in
//!   `dcs_aggregator_admission_refused_total{reason}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::AdmissionConfig;

/// The budget counts KiB, so `acquire_many` (a `u32`) covers terabytes.
const UNIT: u64 = 1024;

/// Why a batch was not admitted; each is one status and one reason label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The agent already has its share of batches in progress (429).
    AgentInFlight,
    /// The tenant's agents hold all its database slots and none freed in time (503).
    TenantInFlight,
    /// The memory budget had no room in time (503).
    MemoryBudget,
    /// No database slot freed in time (503).
    DatabaseSlots,
    /// The agent's earlier batches still held its fair share when the
    /// request's deadline passed (503).
    FairShare,
}

impl Refusal {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refusal::AgentInFlight => "agent_in_flight",
            Refusal::TenantInFlight => "tenant_in_flight",
            Refusal::MemoryBudget => "memory_budget",
            Refusal::DatabaseSlots => "database_slots",
            Refusal::FairShare => "fair_share",
        }
    }

    fn count(self) -> Self {
        metrics::counter!("dcs_aggregator_admission_refused_total", "reason" => self.reason())
            .increment(1);
        self
    }
}

/// How recently another agent must have sent for an agent to be held to its
/// fair share: longer than the gap between a steady agent's batches.
const ACTIVE_WINDOW: Duration = Duration::from_secs(1);
/// How often a batch waiting for its turn looks again whether the other
/// agents went quiet (a turn freed by the agent's own batch wakes it at once).
const TURN_RECHECK: Duration = Duration::from_millis(50);

/// One agent's batches in progress.
#[derive(Default)]
struct AgentLoad {
    /// Admitted (holding a ticket).
    in_flight: usize,
    /// In the inflate-parse-write stage.
    working: usize,
    /// Woken when one of them leaves that stage.
    turn_freed: Arc<Notify>,
}

type Agents = Arc<Mutex<HashMap<String, AgentLoad>>>;

pub(crate) struct Admission {
    config: AdmissionConfig,
    /// At most this many of one agent's batches work at once while other
    /// agents are active.
    fair_share: usize,
    agents: Agents,
    /// The two agents that sent most recently, with when: enough to tell
    /// whether any agent other than a given one sent within ACTIVE_WINDOW.
    recent: Mutex<[Option<(String, Instant)>; 2]>,
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
    memory: Arc<Semaphore>,
    database: Arc<Semaphore>,
}

impl Admission {
    pub(crate) fn new(config: AdmissionConfig, database_slots: usize) -> Self {
        let fair_share = match config.fair_share {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() / 2),
            n => n,
        }
        .clamp(1, config.max_in_flight_per_agent.max(1));
        Admission {
            config,
            fair_share,
            agents: Arc::default(),
            recent: Mutex::default(),
            tenants: Mutex::default(),
            memory: Arc::new(Semaphore::new(units(config.memory_budget.0) as usize)),
            database: Arc::new(Semaphore::new(database_slots)),
        }
    }

    /// Counts one more batch of `agent` in progress, or refuses it at once.
    pub(crate) fn enter(&self, agent: &str) -> Result<AgentTicket, Refusal> {
        self.seen(agent);
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let load = agents.entry(agent.to_owned()).or_default();
        if load.in_flight >= self.config.max_in_flight_per_agent {
            return Err(Refusal::AgentInFlight.count());
        }
        load.in_flight += 1;
        Ok(AgentTicket {
            agents: self.agents.clone(),
            agent: agent.to_owned(),
        })
    }

    fn seen(&self, agent: &str) {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *recent {
            [Some((first, at)), _] if first == agent => *at = now,
            [first, second] => {
                let previous = first.take();
                *second = match previous {
                    Some((name, at)) if name != agent => Some((name, at)),
                    _ => second.take().filter(|(name, _)| name != agent),
                };
                *first = Some((agent.to_owned(), now));
            }
        }
    }

    /// Whether an agent other than `agent` sent within ACTIVE_WINDOW.
    fn others_active(&self, agent: &str) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .flatten()
            .any(|(name, at)| name != agent && at.elapsed() < ACTIVE_WINDOW)
    }

    /// The turn of one of `ticket`'s batches in the inflate-parse-write
    /// stage, waiting until `deadline` while the agent's earlier batches hold
    /// its fair share (see the module documentation).
    pub(crate) async fn turn(
        &self,
        ticket: &AgentTicket,
        deadline: Instant,
    ) -> Result<Turn, Refusal> {
        loop {
            let turn_freed;
            let mut freed;
            {
                let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
                let load = agents.entry(ticket.agent.clone()).or_default();
                let cap = if self.others_active(&ticket.agent) {
                    self.fair_share
                } else {
                    self.config.max_in_flight_per_agent
                };
                if load.working < cap {
                    load.working += 1;
                    return Ok(Turn {
                        agents: self.agents.clone(),
                        agent: ticket.agent.clone(),
                    });
                }
                turn_freed = load.turn_freed.clone();
                // Registered before the lock is let go, so a turn freed in
                // between is not missed.
                freed = Box::pin(turn_freed.notified());
                freed.as_mut().enable();
            }
            let recheck = (Instant::now() + TURN_RECHECK).min(deadline);
            if tokio::time::timeout_at(recheck, freed).await.is_err() && recheck >= deadline {
                return Err(Refusal::FairShare.count());
            }
        }
    }

    /// Reserves `bytes` of the memory budget, waiting until `deadline`.
    pub(crate) async fn reserve(
        &self,
        bytes: u64,
        deadline: Instant,
    ) -> Result<MemoryPermit, Refusal> {
        let wanted = units(bytes);
        if wanted == 0 {
            return Ok(MemoryPermit(None));
        }
        match tokio::time::timeout_at(deadline, self.memory.clone().acquire_many_owned(wanted))
            .await
        {
            Ok(Ok(permit)) => Ok(MemoryPermit(Some(permit))),
            _ => Err(Refusal::MemoryBudget.count()),
        }
    }

    /// Grows `permit` until it covers `total` bytes, waiting until `deadline`:
    /// a body is reserved as it arrives, so a slow one holds only what it sent.
    pub(crate) async fn grow(
        &self,
        permit: &mut MemoryPermit,
        total: u64,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        let held = permit.0.as_ref().map_or(0, |p| p.num_permits() as u64);
        let missing = u64::from(units(total)).saturating_sub(held);
        if missing > 0 {
            permit.merge(self.reserve(missing * UNIT, deadline).await?);
        }
        Ok(())
    }

    /// A database slot within the tenant's share, waiting until `deadline`.
    pub(crate) async fn database_slot(
        &self,
        tenant: &str,
        deadline: Instant,
    ) -> Result<DatabaseSlot, Refusal> {
        let semaphore = {
            let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
            // Forget tenants nobody is writing for, so the map stays as large
            // as the set of tenants writing right now.
            tenants.retain(|_, s| Arc::strong_count(s) > 1);
            tenants
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(self.config.max_in_flight_per_tenant)))
                .clone()
        };
        let tenant_permit = tokio::time::timeout_at(deadline, semaphore.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Refusal::TenantInFlight)
            .map_err(Refusal::count)?;
        let database = tokio::time::timeout_at(deadline, self.database.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(Refusal::DatabaseSlots)
            .map_err(Refusal::count)?;
        Ok(DatabaseSlot {
            _tenant: tenant_permit,
            _database: database,
        })
    }

    /// Bytes of the budget free right now (for tests and metrics).
    #[cfg(test)]
    fn memory_free(&self) -> u64 {
        self.memory.available_permits() as u64 * UNIT
    }
}

/// Whole KiB, rounded up, saturating at what one `acquire_many` can take.
fn units(bytes: u64) -> u32 {
    bytes.div_ceil(UNIT).min(u64::from(u32::MAX)) as u32
}

/// One batch of one agent in progress; released on drop.
pub(crate) struct AgentTicket {
    agents: Agents,
    agent: String,
}

impl Drop for AgentTicket {
    fn drop(&mut self) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(load) = agents.get_mut(&self.agent) {
            load.in_flight = load.in_flight.saturating_sub(1);
            if load.in_flight == 0 && load.working == 0 {
                agents.remove(&self.agent);
            }
        }
    }
}

/// One of an agent's batches in the inflate-parse-write stage; the next one
/// waiting gets its turn on drop.
pub(crate) struct Turn {
    agents: Agents,
    agent: String,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(load) = agents.get_mut(&self.agent) {
            load.working = load.working.saturating_sub(1);
            load.turn_freed.notify_waiters();
            if load.in_flight == 0 && load.working == 0 {
                agents.remove(&self.agent);
            }
        }
    }
}

/// Bytes of the memory budget; returned on drop.
pub(crate) struct MemoryPermit(Option<OwnedSemaphorePermit>);

impl MemoryPermit {
    pub(crate) fn none() -> Self {
        MemoryPermit(None)
    }

    /// Adds `more` to this reservation.
    pub(crate) fn merge(&mut self, more: MemoryPermit) {
        match (&mut self.0, more.0) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
    }
}

/// A database slot within the tenant's share; released on drop.
pub(crate) struct DatabaseSlot {
    _tenant: OwnedSemaphorePermit,
    _database: OwnedSemaphorePermit,
}

/// What a batch needs once its body is read: the JSON and the rows encoded
/// for COPY, each at most the decompressed size. The gzip trailer states the
/// decompressed size (mod 2^32); a body that lies about it is cut off at the
/// reservation and refused, so the reservation is also the cap.
pub(crate) fn decompressed_estimate(compressed: &[u8], max_decompressed: u64) -> u64 {
    stated_size(compressed).min(max_decompressed)
}

/// The decompressed size the last gzip member's trailer states (ISIZE, the
/// size mod 2^32); 0 for a body too short to have one.
pub(crate) fn stated_size(compressed: &[u8]) -> u64 {
    let trailer = compressed
        .len()
        .checked_sub(4)
        .map(|at| u32::from_le_bytes(compressed[at..].try_into().unwrap_or([0; 4])))
        .unwrap_or(0);
    u64::from(trailer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dcs_shared::config::ByteSize;
    use std::time::Duration;

    fn admission(per_agent: usize, per_tenant: usize, budget: u64, slots: usize) -> Admission {
        Admission::new(
            AdmissionConfig {
                max_in_flight_per_agent: per_agent,
                max_in_flight_per_tenant: per_tenant,
                memory_budget: ByteSize(budget),
                fair_share: 1,
            },
            slots,
        )
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_millis(50)
    }

    #[test]
    fn an_agent_past_its_share_is_refused_and_freed_on_drop() {
        let a = admission(2, 8, 1 << 20, 4);
        let one = a.enter("acme/edge-01").unwrap();
        let _two = a.enter("acme/edge-01").unwrap();
        assert_eq!(a.enter("acme/edge-01").err(), Some(Refusal::AgentInFlight));
        // Another agent, even of the same tenant, has its own share.
        let _other = a.enter("acme/edge-02").unwrap();
        drop(one);
        assert!(a.enter("acme/edge-01").is_ok());
    }

    #[tokio::test]
    async fn a_tenant_cannot_hold_more_than_its_database_slots() {
        let a = admission(8, 2, 1 << 20, 4);
        let _one = a.database_slot("acme", soon()).await.unwrap();
        let _two = a.database_slot("acme", soon()).await.unwrap();
        assert_eq!(
            a.database_slot("acme", soon()).await.err(),
            Some(Refusal::TenantInFlight)
        );
        // The victim tenant still finds the slots acme may not take.
        let _victim = a.database_slot("victim", soon()).await.unwrap();
    }

    #[tokio::test]
    async fn the_memory_budget_bounds_what_is_reserved_at_once() {
        let a = admission(8, 8, 10 << 10, 4);
        let mut first = a.reserve(6 << 10, soon()).await.unwrap();
        assert_eq!(
            a.reserve(6 << 10, soon()).await.err(),
            Some(Refusal::MemoryBudget)
        );
        first.merge(a.reserve(1, soon()).await.unwrap());
        assert_eq!(a.memory_free(), 3 << 10);
        // Growing to a total reserves only the difference.
        a.grow(&mut first, 8 << 10, soon()).await.unwrap();
        assert_eq!(a.memory_free(), 2 << 10);
        drop(first);
        assert_eq!(a.memory_free(), 10 << 10);
        assert!(a.reserve(10 << 10, soon()).await.is_ok());
    }

    #[tokio::test]
    async fn an_agent_alone_works_on_all_its_batches_at_once() {
        let a = admission(4, 8, 1 << 20, 4);
        let tickets: Vec<_> = (0..4).map(|_| a.enter("acme/edge-01").unwrap()).collect();
        let mut turns = Vec::new();
        for ticket in &tickets {
            turns.push(a.turn(ticket, soon()).await.unwrap());
        }
    }

    #[tokio::test]
    async fn with_another_agent_active_a_busy_agent_works_on_its_fair_share() {
        let a = admission(4, 8, 1 << 20, 4);
        let _victim = a.enter("victim/edge-01").unwrap();
        let first = a.enter("acme/edge-01").unwrap();
        let second = a.enter("acme/edge-01").unwrap();
        let working = a.turn(&first, soon()).await.unwrap();
        // Its second batch waits for the first, and gives up at the deadline.
        assert_eq!(
            a.turn(&second, soon()).await.err(),
            Some(Refusal::FairShare)
        );
        // The other agent's batch goes straight in.
        let victim_ticket = a.enter("victim/edge-01").unwrap();
        let _victim_turn = a.turn(&victim_ticket, soon()).await.unwrap();
        // The first batch done, the second gets its turn at once.
        let waiting = a.turn(&second, Instant::now() + Duration::from_secs(5));
        let release = async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(working);
        };
        let started = Instant::now();
        let (turn, ()) = tokio::join!(waiting, release);
        assert!(turn.is_ok());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_estimate_is_the_gzip_trailer_capped_by_the_limit() {
        let body = dcs_shared::wire::encode_batch(
            uuid::Uuid::nil(),
            None,
            Vec::<dcs_shared::wire::OutRecord>::new(),
            1,
        );
        let json = dcs_shared::wire::gunzip_limited(&body, 1 << 20).unwrap();
        assert_eq!(decompressed_estimate(&body, 1 << 20), json.len() as u64);
        assert_eq!(decompressed_estimate(&body, 3), 3);
        assert_eq!(decompressed_estimate(b"x", 1 << 20), 0);
    }
}
