//! Who is connected under which client id, and what a session keeps while its client is
//! away.
//!
//! - **Takeover** (MQTT 3.1.1 [MQTT-3.1.4-2], MQTT 5 [MQTT-3.1.4-3]): a CONNECT with the
//!   client id of a live connection claims the id at once, tells the older connection
//!   to close, and waits until it has (its will is published, its session handed over).
//! - **Persistent sessions**: subscriptions (mirrored in rumqttd's router, which queues
//!   their messages) and unreleased QoS 2 packet ids survive a disconnect until the
//!   session expiry interval passes ([MQTT-4.1.0-2]), then the router is told to forget
//!   them.
//! - **Delayed wills** (MQTT 5 will delay): published when the delay passes or the
//!   session ends, whichever comes first, unless the client comes back first
//!   ([MQTT-3.1.2-8], [MQTT-3.1.3-9]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttd::protocol::{LastWill, LastWillProperties};
use tokio::sync::Notify;

/// One subscription of a session.
#[derive(Debug, Clone)]
pub(crate) struct Sub {
    /// The subscription identifier sluice gives the router, so that each forward says
    /// which subscription it is for.
    pub(crate) internal_id: usize,
    pub(crate) qos: u8,
    pub(crate) no_local: bool,
    pub(crate) retain_as_published: bool,
    /// Retain handling: 0 send retained messages at subscribe, 1 only for a new
    /// subscription, 2 never.
    pub(crate) retain_handling: u8,
    /// The client's own subscription identifier (MQTT 5).
    pub(crate) client_id: Option<usize>,
    /// Counted in the router's visibility of direct topics.
    pub(crate) visible: bool,
    /// The last log offset forwarded for it: the next must follow it, or the router
    /// dropped messages.
    pub(crate) last_offset: Option<u64>,
    /// After a session resumed: messages up to this offset were sent before, so the
    /// router sending them again is a redelivery.
    pub(crate) redelivery_until: Option<u64>,
}

/// A will message, with when to publish it.
#[derive(Debug, Clone)]
pub(crate) struct Will {
    pub(crate) will: LastWill,
    pub(crate) properties: Option<LastWillProperties>,
    pub(crate) delay: Duration,
}

/// What a session keeps across connections.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    /// Subscriptions by filter.
    pub(crate) subs: HashMap<String, Sub>,
    /// Filter of each internal subscription id.
    pub(crate) by_id: HashMap<usize, String>,
    pub(crate) next_internal_id: usize,
    /// The router holds a persistent session under this client id.
    pub(crate) router_session: bool,
    /// QoS 2 packet ids received and acknowledged with PUBREC, awaiting PUBREL.
    pub(crate) qos2_in: HashSet<u16>,
    /// Identifies the session's own publishes to its No Local subscriptions.
    pub(crate) origin: u64,
}

impl SessionState {
    pub(crate) fn new(origin: u64) -> SessionState {
        SessionState {
            next_internal_id: 1,
            origin,
            ..SessionState::default()
        }
    }

    pub(crate) fn has_no_local(&self) -> bool {
        self.subs.values().any(|s| s.no_local)
    }
}

/// A live connection's handle, held by the registry.
pub(crate) struct Control {
    kick: Notify,
    /// Resolves (with an error) when the connection has finished closing.
    done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl Control {
    /// A handle, and the sender the connection drops when it is done.
    pub(crate) fn new() -> (Arc<Control>, tokio::sync::oneshot::Sender<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (
            Arc::new(Control {
                kick: Notify::new(),
                done: Mutex::new(Some(rx)),
            }),
            tx,
        )
    }

    /// Tells the connection to close: another one takes its client id over.
    pub(crate) fn kick(&self) {
        self.kick.notify_one();
    }

    /// Completes when the connection is told to close (a kick sent before this is
    /// called is not lost).
    pub(crate) async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// Waits until the connection has closed, at most `within`.
    pub(crate) async fn closed(&self, within: Duration) {
        let rx = self.done.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(rx) = rx {
            let _ = tokio::time::timeout(within, rx).await;
        }
    }
}

/// A session whose client is away.
pub(crate) struct Stored {
    pub(crate) state: SessionState,
    /// The will still to publish (MQTT 5 will delay).
    pub(crate) will: Option<Will>,
    generation: u64,
    timers: Vec<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct Entry {
    live: Option<(u64, Arc<Control>)>,
    stored: Option<Stored>,
}

/// What a timer found when it fired.
pub(crate) enum Expired {
    /// The session ended: forget it (and publish its will, if still pending).
    Session(Stored),
    /// The will's delay passed: publish it; the session lives on.
    Will(Will),
}

/// The registry of client ids.
#[derive(Default)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<Arc<str>, Entry>>,
    generation: AtomicU64,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes connection `conn` the live one for `client_id`; returns the connection it
    /// replaces, which must be told to close.
    pub(crate) fn claim(
        &self,
        client_id: &Arc<str>,
        conn: u64,
        control: Arc<Control>,
    ) -> Option<Arc<Control>> {
        let mut map = self.lock();
        let entry = map.entry(client_id.clone()).or_default();
        entry.live.replace((conn, control)).map(|(_, c)| c)
    }

    /// Takes the stored session of `client_id` (its timers stop).
    pub(crate) fn take_stored(&self, client_id: &str) -> Option<Stored> {
        let mut map = self.lock();
        let stored = map.get_mut(client_id)?.stored.take()?;
        for timer in &stored.timers {
            timer.abort();
        }
        Some(stored)
    }

    /// Connection `conn` has closed: it stops being the live one (unless it was taken
    /// over), and its session is kept if `stored` is given.
    pub(crate) fn release(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        conn: u64,
        stored: Option<(SessionState, Duration, Option<Will>)>,
        on_timer: impl Fn(Arc<str>, Expired) + Send + Sync + Clone + 'static,
    ) {
        let mut map = self.lock();
        let Some(entry) = map.get_mut(client_id) else {
            return;
        };
        if entry.live.as_ref().is_some_and(|(c, _)| *c == conn) {
            entry.live = None;
        }
        if let Some((state, expiry, will)) = stored {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let mut timers = Vec::new();
            if let Some(delay) = will.as_ref().map(|w| w.delay).filter(|d| *d < expiry) {
                timers.push(self.timer(
                    client_id.clone(),
                    generation,
                    delay,
                    false,
                    on_timer.clone(),
                ));
            }
            timers.push(self.timer(client_id.clone(), generation, expiry, true, on_timer));
            entry.stored = Some(Stored {
                state,
                will,
                generation,
                timers,
            });
        }
        if entry.live.is_none() && entry.stored.is_none() {
            map.remove(client_id);
        }
    }

    fn timer(
        self: &Arc<Self>,
        client_id: Arc<str>,
        generation: u64,
        after: Duration,
        ends_session: bool,
        on_timer: impl Fn(Arc<str>, Expired) + Send + 'static,
    ) -> tokio::task::AbortHandle {
        let sessions = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let Some(sessions) = sessions.upgrade() else {
                return;
            };
            let expired = {
                let mut map = sessions.lock();
                let Some(entry) = map.get_mut(&*client_id) else {
                    return;
                };
                let Some(stored) = entry.stored.as_mut().filter(|s| s.generation == generation)
                else {
                    return;
                };
                if ends_session {
                    let stored = entry.stored.take();
                    if entry.live.is_none() {
                        map.remove(&*client_id);
                    }
                    stored.map(Expired::Session)
                } else {
                    stored.will.take().map(Expired::Will)
                }
            };
            if let Some(expired) = expired {
                on_timer(client_id, expired);
            }
        })
        .abort_handle()
    }
}
