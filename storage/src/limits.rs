//! What one query may take, so that no query takes the node down: memory (DataFusion's
//! memory pool, operators spilling to disk where they can; see [`QueryLimits`]), time,
//! a place among the queries running at once, and the size of its result. Both SQL
//! endpoints go through the same [`Admission`]: HTTP in [`crate::Storage::sql`], the
//! PostgreSQL endpoint around its own result streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The limits of the SQL endpoints (`[query]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryLimits {
    /// Memory all running queries' operators may hold together (DataFusion's memory
    /// pool); sorts, aggregations and joins that can spill go to disk beyond.
    pub max_memory_bytes: usize,
    /// Spill files of all queries together at most.
    pub max_spill_bytes: u64,
    /// A query running longer is cancelled (its wait for a place included).
    pub timeout: Option<Duration>,
    /// Queries running at once; more wait for a place (within their timeout).
    pub max_concurrent: usize,
    /// Bytes of result one query may hand to its client (Arrow's in-memory size over
    /// HTTP, the encoded rows over PostgreSQL).
    pub max_result_bytes: usize,
}

impl QueryLimits {
    /// No limit but memory (a quarter of the machine): the offline `sluice sql`.
    pub fn unlimited() -> QueryLimits {
        let memory = default_max_memory();
        QueryLimits {
            max_memory_bytes: memory,
            max_spill_bytes: 4 * memory as u64,
            timeout: None,
            max_concurrent: usize::MAX >> 4,
            max_result_bytes: usize::MAX,
        }
    }

    /// A function call may build at most this many bytes of values at once (`repeat`,
    /// `lpad`, `array_repeat`, `range`: see `guards`).
    pub fn max_value_bytes(&self) -> usize {
        (self.max_memory_bytes / 4).max(1 << 20)
    }
}

/// A quarter of the machine's memory (or of its cgroup's limit), at least 256 MiB:
/// the rest is ingestion's.
pub fn default_max_memory() -> usize {
    let total = machine_memory().unwrap_or(4 << 30);
    ((total / 4) as usize).max(256 << 20)
}

/// Physical memory, or the cgroup's limit when lower.
fn machine_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut total = kib * 1024;
    for limit in [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ] {
        if let Some(bytes) = std::fs::read_to_string(limit)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            total = total.min(bytes);
        }
    }
    Some(total)
}

/// Why a query was stopped by a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("the query ran longer than query.timeout ({}) and was cancelled", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error(
        "too many queries at once: {0} are running (query.max_concurrent) and no place came free within query.timeout; try again later"
    )]
    Busy(usize),
    #[error(
        "the result is larger than query.max_result_bytes ({0} bytes) and was cut off; add a LIMIT, filter or aggregate"
    )]
    ResultTooLarge(usize),
}

/// Places for running queries.
#[derive(Debug)]
pub struct Admission {
    limits: QueryLimits,
    places: Arc<Semaphore>,
    running: Arc<AtomicUsize>,
}

/// A query's place: held until its result is handed over (or dropped), and never past
/// its deadline, even while no one reads its result (a PostgreSQL portal left
/// suspended): a timer gives the place back then.
#[derive(Debug)]
pub struct Ticket {
    place: Arc<Place>,
    deadline: Option<Instant>,
    timeout: Duration,
    max_result_bytes: usize,
}

/// A place, given back once: by the ticket's drop or by its deadline's timer.
#[derive(Debug)]
struct Place {
    permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
    running: Arc<AtomicUsize>,
}

impl Place {
    fn give_back(&self) {
        let permit = self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        if permit.is_some() {
            self.running.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.place.give_back();
    }
}

impl Admission {
    pub fn new(limits: QueryLimits) -> Admission {
        Admission {
            places: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            limits,
            running: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn limits(&self) -> &QueryLimits {
        &self.limits
    }

    /// Queries holding a place now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    /// Waits for a place; the query's time starts now, so the wait counts against its
    /// timeout, and a place not found within it is [`LimitExceeded::Busy`].
    pub async fn admit(&self) -> Result<Ticket, LimitExceeded> {
        let deadline = self.limits.timeout.map(|t| Instant::now() + t);
        let acquire = self.places.clone().acquire_owned();
        let permit = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, acquire)
                .await
                .map_err(|_| LimitExceeded::Busy(self.limits.max_concurrent))?,
            None => acquire.await,
        }
        .map_err(|_| LimitExceeded::Busy(self.limits.max_concurrent))?;
        self.running.fetch_add(1, Ordering::Relaxed);
        let place = Arc::new(Place {
            permit: std::sync::Mutex::new(Some(permit)),
            running: self.running.clone(),
        });
        if let Some(deadline) = deadline {
            let place = Arc::downgrade(&place);
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if let Some(place) = place.upgrade() {
                    place.give_back();
                }
            });
        }
        Ok(Ticket {
            place,
            deadline,
            timeout: self.limits.timeout.unwrap_or_default(),
            max_result_bytes: self.limits.max_result_bytes,
        })
    }
}

impl Ticket {
    /// Runs `work` (planning, say) within the query's time.
    pub async fn within<T, E>(
        &self,
        work: impl Future<Output = Result<T, E>>,
        limit: impl FnOnce(LimitExceeded) -> E,
    ) -> Result<T, E> {
        match self.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, work)
                .await
                .unwrap_or_else(|_| Err(limit(LimitExceeded::Timeout(self.timeout)))),
            None => work.await,
        }
    }

    /// `stream` within the query's time and result size (`size` of each item); the
    /// first limit reached ends it with `limit`'s error. The place is held until the
    /// stream ends or is dropped; several streams of one query (a simple query's
    /// statements) each take a clone of the ticket, and the place is held until the
    /// last of them ends.
    pub fn guard<T, E, S>(
        self: Arc<Self>,
        stream: S,
        size: impl Fn(&T) -> usize + Send + Sync + 'static,
        limit: impl Fn(LimitExceeded) -> E + Send + Sync + 'static,
    ) -> impl Stream<Item = Result<T, E>> + Send + 'static
    where
        S: Stream<Item = Result<T, E>> + Send + Unpin + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        struct State<S> {
            stream: S,
            ticket: Arc<Ticket>,
            bytes: usize,
            done: bool,
        }
        let state = State {
            stream,
            ticket: self,
            bytes: 0,
            done: false,
        };
        let (size, limit) = (Arc::new(size), Arc::new(limit));
        futures::stream::unfold(state, move |mut st| {
            let (size, limit) = (size.clone(), limit.clone());
            async move {
                if st.done {
                    return None;
                }
                let next = match st.ticket.deadline {
                    Some(deadline) => {
                        match tokio::time::timeout_at(deadline, st.stream.next()).await {
                            Ok(next) => next,
                            Err(_) => {
                                st.done = true;
                                let timeout = LimitExceeded::Timeout(st.ticket.timeout);
                                return Some((Err(limit(timeout)), st));
                            }
                        }
                    }
                    None => st.stream.next().await,
                };
                match next? {
                    Ok(item) => {
                        st.bytes = st.bytes.saturating_add(size(&item));
                        if st.bytes > st.ticket.max_result_bytes {
                            st.done = true;
                            let cap = LimitExceeded::ResultTooLarge(st.ticket.max_result_bytes);
                            return Some((Err(limit(cap)), st));
                        }
                        Some((Ok(item), st))
                    }
                    Err(e) => {
                        st.done = true;
                        Some((Err(e), st))
                    }
                }
            }
        })
    }
}

/// Makes every operator of a plan give its thread back now and then (each output batch
/// spends some of tokio's task budget, and an empty budget yields), so that a query
/// timed out or abandoned stops at its next batch. DataFusion's own rule does this for
/// the scans only: a join turning a few input rows into billions (a cross join) never
/// polls its input, so without this it would run on after its deadline, on a core.
#[derive(Debug)]
pub(crate) struct Interruptible;

impl datafusion::physical_optimizer::PhysicalOptimizerRule for Interruptible {
    fn optimize(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        _config: &datafusion::config::ConfigOptions,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::tree_node::{Transformed, TreeNode};
        use datafusion::physical_plan::coop::CooperativeExec;
        use datafusion::physical_plan::execution_plan::SchedulingType;
        plan.transform_up(|node| {
            let wrap = !node.children().is_empty()
                && node.properties().scheduling_type == SchedulingType::NonCooperative;
            Ok(if wrap {
                Transformed::yes(Arc::new(CooperativeExec::new(node)) as _)
            } else {
                Transformed::no(node)
            })
        })
        .map(|t| t.data)
    }

    fn name(&self) -> &str {
        "Interruptible"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(timeout_ms: u64, max_concurrent: usize, max_result_bytes: usize) -> QueryLimits {
        QueryLimits {
            max_memory_bytes: 1 << 30,
            max_spill_bytes: 1 << 30,
            timeout: Some(Duration::from_millis(timeout_ms)),
            max_concurrent,
            max_result_bytes,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_waits_for_a_place_within_its_timeout_then_is_told_busy() {
        let admission = Admission::new(limits(1_000, 1, usize::MAX));
        let first = admission.admit().await.unwrap();
        assert_eq!(admission.running(), 1);
        let started = Instant::now();
        assert_eq!(admission.admit().await.unwrap_err(), LimitExceeded::Busy(1));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(1_000),
            "it waited its timeout"
        );
        // A place that comes free in time is taken.
        let waiting = async { admission.admit().await.map(|_| ()) };
        let freeing = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(first);
        };
        let (admitted, ()) = tokio::join!(waiting, freeing);
        assert_eq!(admitted, Ok(()));
        assert_eq!(admission.running(), 0, "places are given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_comes_back_at_the_deadline_even_if_no_one_reads_the_result() {
        let admission = Admission::new(limits(1_000, 1, usize::MAX));
        let ticket = admission.admit().await.unwrap();
        let never_read = Arc::new(ticket).guard(
            futures::stream::pending::<Result<(), String>>(),
            |_| 0,
            |e| e.to_string(),
        );
        tokio::time::sleep(Duration::from_millis(1_001)).await;
        assert_eq!(admission.running(), 0);
        let next = admission.admit().await;
        assert!(next.is_ok(), "the place is free");
        drop(never_read);
        assert_eq!(admission.running(), 1, "the next query's place only");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_with_an_error_at_its_deadline_or_its_result_cap() {
        let admission = Admission::new(limits(1_000, 4, 10));
        // One item every 400 ms: the third would come after the deadline.
        let slow = futures::stream::iter(0..10)
            .then(|i| async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, String>(i)
            })
            .boxed();
        let ticket = admission.admit().await.unwrap();
        let got: Vec<_> = Arc::new(ticket)
            .guard(slow, |_| 1, |e| e.to_string())
            .collect()
            .await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[..2], [Ok(0), Ok(1)]);
        assert!(
            got[2].as_ref().unwrap_err().contains("query.timeout (1s)"),
            "{got:?}"
        );

        let ticket = admission.admit().await.unwrap();
        let big = futures::stream::iter((0..100).map(Ok::<usize, String>));
        let got: Vec<_> = Arc::new(ticket)
            .guard(big, |_| 4, |e| e.to_string())
            .collect()
            .await;
        assert_eq!(got.len(), 3, "8 bytes pass, the 12th is over 10");
        assert!(
            got[2]
                .as_ref()
                .unwrap_err()
                .contains("query.max_result_bytes (10 bytes)")
        );
        assert_eq!(admission.running(), 0);
    }
}
