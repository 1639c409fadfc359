//! sluice's side of rumqttd's router: links registered off the I/O threads, the feed
//! that hands client publishes to the router, and what sluice marks on them.
//!
//! The router is used for what it is good at: subscriptions, retained messages,
//! persistent sessions and delivery to MQTT subscribers. It is not on the path from a
//! device to the pipeline. Two kinds of links talk to it:
//! - **one feed link**, `sluice-feed`, through which every publish that some subscriber
//!   (or the retained store) needs is handed over, by one thread (`mqtt-router-feed`);
//! - **a link per subscribing connection**, registered when a client first subscribes
//!   or asks for a persistent session, never for a device that only publishes. A
//!   router link costs ~40 KiB (rumqttd preallocates its buffers); a device that only
//!   publishes costs none.
//!
//! `LinkBuilder::build` blocks on the router's reply and `LinkTx` on a bounded channel,
//! so registration and release run on their own thread (`mqtt-router-links`), and the
//! I/O threads never wait on the router.
//!
//! **Markers.** rumqttd forwards every message at the subscription's QoS (not the
//! minimum of the published and granted QoS), clears RETAIN on live messages, and
//! does not say who published a forward. Where a subscription needs one of those
//! facts, the publish carries it to the connection layer in a user property whose key
//! holds U+0000, which no valid MQTT string contains [MQTT-1.5.4-2]; it is taken off
//! every inbound publish and every outbound one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PubRel, PubRelReason, Publish, PublishProperties,
};
use rumqttd::{Notification, Router as RumqttdRouter, RouterConfig};

use crate::frame;
use crate::meters::MqttMeters;

/// The key of sluice's marker property.
pub(crate) const MARKER_KEY: &str = "\0sluice";

/// What a marker says about a routed publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Marker {
    /// QoS the publisher used, when it is below 2 (forwards go out at
    /// min(this, granted)).
    pub(crate) qos: Option<u8>,
    /// The publisher set RETAIN (for subscriptions with Retain As Published).
    pub(crate) retain: bool,
    /// The publishing session (for No Local subscriptions).
    pub(crate) origin: Option<u64>,
    /// The payload is empty: the router is given one byte instead, because it deletes
    /// the retained message of a topic on any empty payload, RETAIN or not
    /// [MQTT-3.3.1-12].
    pub(crate) empty: bool,
}

impl Marker {
    fn encode(&self) -> String {
        let mut s = String::new();
        if let Some(q) = self.qos {
            s.push_str(&format!("q{q};"));
        }
        if self.retain {
            s.push_str("r;");
        }
        if let Some(o) = self.origin {
            s.push_str(&format!("o{o};"));
        }
        if self.empty {
            s.push_str("e;");
        }
        s
    }

    fn decode(value: &str) -> Marker {
        let mut marker = Marker::default();
        for part in value.split(';') {
            if let Some(q) = part.strip_prefix('q') {
                marker.qos = q.parse().ok();
            } else if part == "r" {
                marker.retain = true;
            } else if part == "e" {
                marker.empty = true;
            } else if let Some(o) = part.strip_prefix('o') {
                marker.origin = o.parse().ok();
            }
        }
        marker
    }

    pub(crate) fn is_empty(&self) -> bool {
        *self == Marker::default()
    }
}

/// Adds `marker` to a publish's properties.
pub(crate) fn mark(properties: &mut Option<PublishProperties>, marker: &Marker) {
    if marker.is_empty() {
        return;
    }
    properties
        .get_or_insert_with(PublishProperties::default)
        .user_properties
        .push((MARKER_KEY.to_owned(), marker.encode()));
}

/// Takes sluice's marker (and anything posing as one) off a publish's properties;
/// properties left empty become `None`.
pub(crate) fn unmark(properties: &mut Option<PublishProperties>) -> Marker {
    let Some(props) = properties else {
        return Marker::default();
    };
    let mut marker = Marker::default();
    if props.user_properties.iter().any(|(k, _)| k == MARKER_KEY) {
        props.user_properties.retain(|(k, v)| {
            if k == MARKER_KEY {
                marker = Marker::decode(v);
                false
            } else {
                true
            }
        });
    }
    if *props == PublishProperties::default() {
        *properties = None;
    }
    marker
}

/// A publish on its way to the router.
pub(crate) struct Routed {
    pub(crate) publish: Publish,
    pub(crate) properties: Option<PublishProperties>,
    /// QoS from the wire (rumqttd keeps its own field private).
    pub(crate) qos: u8,
    pub(crate) pkid: u16,
}

/// A batch for the feed thread; `taken` is told once the router has it.
struct Feed {
    batch: Vec<Routed>,
    taken: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The pipeline or the router is gone: the process is stopping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouterGone;

/// A connection's own router link.
pub(crate) struct Link {
    pub(crate) tx: LinkTx,
    pub(crate) rx: LinkRx,
}

enum Request {
    Connect {
        client_id: String,
        clean: bool,
        reply: tokio::sync::oneshot::Sender<Result<Link, String>>,
    },
    Release(LinkTx, LinkRx),
    Wipe(String),
}

type Build = Box<dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, Notification), LinkError> + Send>;

/// Subscription filters that can see the direct topics (those that go to the pipeline
/// only), with how many subscriptions use each: a direct publish is handed to the
/// router only while one of them matches it.
pub(crate) struct Visibility {
    direct_filter: String,
    count: AtomicUsize,
    filters: RwLock<HashMap<String, usize>>,
}

impl Visibility {
    fn new(direct_filter: String) -> Visibility {
        Visibility {
            direct_filter,
            count: AtomicUsize::new(0),
            filters: RwLock::new(HashMap::new()),
        }
    }

    /// Whether `topic` is a direct topic.
    pub(crate) fn is_direct(&self, topic: &str) -> bool {
        frame::topic_matches(topic, &self.direct_filter)
    }

    /// Counts a subscription on `filter` if it can see direct topics; returns whether
    /// it was counted (and must be [`remove`](Self::remove)d later).
    pub(crate) fn add(&self, filter: &str) -> bool {
        if !frame::filters_overlap(filter, &self.direct_filter) {
            return false;
        }
        let mut filters = self.filters.write().unwrap_or_else(|p| p.into_inner());
        *filters.entry(filter.to_owned()).or_default() += 1;
        self.count.fetch_add(1, Ordering::Release);
        true
    }

    pub(crate) fn remove(&self, filter: &str) {
        let mut filters = self.filters.write().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = filters.get_mut(filter) {
            *n -= 1;
            if *n == 0 {
                filters.remove(filter);
            }
            self.count.fetch_sub(1, Ordering::Release);
        }
    }

    /// Whether the router needs a publish on `topic`: any topic but the direct ones and
    /// `$` topics, which no client subscription sees [MQTT-4.7.2-1]; a direct topic
    /// while a subscription sees it, or when it is to be retained.
    pub(crate) fn wanted(&self, topic: &str, retain: bool) -> bool {
        !topic.starts_with('$') && (!self.is_direct(topic) || retain || self.watched(topic))
    }

    /// Whether some subscription sees this direct topic.
    pub(crate) fn watched(&self, topic: &str) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let filters = self.filters.read().unwrap_or_else(|p| p.into_inner());
        filters.keys().any(|f| frame::topic_matches(topic, f))
    }
}

/// The router and the threads that talk to it.
pub(crate) struct Router {
    /// Orders subscription changes and routed publishes as they were read, across
    /// connections: a SUBSCRIBE holds it shared until the router has it, a routed batch
    /// takes it alone (so it waits for SUBSCRIBEs read before it, and SUBSCRIBEs read
    /// after it wait for it). Without it, a message published just after another client
    /// subscribed could reach the router first and miss the new subscriber.
    gate: Arc<tokio::sync::RwLock<()>>,
    requests: flume::Sender<Request>,
    feed: flume::Sender<Feed>,
    is_full: Box<dyn Fn() -> bool + Send + Sync>,
    pub(crate) visibility: Visibility,
    /// The highest QoS granted to any subscription so far: publishes below it carry
    /// their QoS in a marker.
    max_granted: AtomicU8,
    /// The broker is stopped: in-process publishes are refused.
    closed: AtomicBool,
}

/// Settings of the router's logs.
pub(crate) struct RouterSettings {
    pub(crate) max_links: usize,
    pub(crate) segment_bytes: usize,
    pub(crate) segments: usize,
    pub(crate) direct_filter: String,
}

impl Router {
    pub(crate) fn start(settings: RouterSettings) -> std::io::Result<Router> {
        let router = RumqttdRouter::new(
            0,
            RouterConfig {
                // The feed link and room for a registration being replaced.
                max_connections: settings.max_links + 2,
                max_outgoing_packet_count: 200,
                max_segment_size: settings.segment_bytes.max(1024),
                max_segment_count: settings.segments.max(1),
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        let build_tx = router_tx.clone();
        // rumqttd's `LinkError` is large (it can carry a router event); it is only ever
        // turned into a message.
        #[allow(clippy::result_large_err)]
        let build: Build = Box::new(move |client_id, clean| {
            rumqttd::local::LinkBuilder::new(client_id, build_tx.clone())
                .clean_session(clean)
                .build()
        });
        let (feed_link_tx, feed_link_rx, _) = build("sluice-feed", true)
            .map_err(|e| std::io::Error::other(format!("the router refused the feed link: {e}")))?;

        let (requests, requests_rx) = flume::bounded::<Request>(4096);
        std::thread::Builder::new()
            .name("mqtt-router-links".into())
            .spawn(move || {
                for request in requests_rx.iter() {
                    match request {
                        Request::Connect {
                            client_id,
                            clean,
                            reply,
                        } => {
                            let link = build(&client_id, clean)
                                .map(|(tx, rx, _)| Link { tx, rx })
                                .map_err(|e| e.to_string());
                            let _ = reply.send(link);
                        }
                        Request::Release(tx, rx) => disconnect(tx, rx),
                        Request::Wipe(client_id) => {
                            if let Ok((tx, rx, _)) = build(&client_id, true) {
                                disconnect(tx, rx);
                            }
                        }
                    }
                }
            })?;

        let (feed, feed_rx) = flume::bounded::<Feed>(1024);
        std::thread::Builder::new()
            .name("mqtt-router-feed".into())
            .spawn(move || run_feed(feed_link_tx, feed_link_rx, feed_rx))?;

        Ok(Router {
            gate: Arc::new(tokio::sync::RwLock::new(())),
            requests,
            feed,
            is_full: Box::new(move || router_tx.is_full()),
            visibility: Visibility::new(settings.direct_filter),
            max_granted: AtomicU8::new(0),
            closed: AtomicBool::new(false),
        })
    }

    /// Registers a link for `client_id` (rumqttd's session key).
    pub(crate) async fn connect(&self, client_id: String, clean: bool) -> Result<Link, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .send_async(Request::Connect {
                client_id,
                clean,
                reply,
            })
            .await
            .map_err(|_| "the router is stopping".to_owned())?;
        answer
            .await
            .map_err(|_| "the router is stopping".to_owned())?
    }

    /// Ends a link: the router keeps its session if it was registered persistent.
    pub(crate) fn release(&self, link: Link) {
        let _ = self
            .requests
            .try_send(Request::Release(link.tx, link.rx))
            .map_err(|e| {
                // Full: hand it over from a thread that may wait.
                let requests = self.requests.clone();
                let request = e.into_inner();
                std::thread::spawn(move || requests.send(request));
            });
    }

    /// Makes the router forget the persistent session of `client_id`.
    pub(crate) async fn wipe(&self, client_id: String) {
        let _ = self.requests.send_async(Request::Wipe(client_id)).await;
    }

    /// Hands publishes to the router (for subscribers and the retained store). Waits
    /// while the feed is full: back-pressure rather than loss.
    pub(crate) async fn route(&self, batch: Vec<Routed>) -> Result<(), RouterGone> {
        if batch.is_empty() {
            return Ok(());
        }
        let _alone = self.gate.write().await;
        let feed = Feed { batch, taken: None };
        self.feed.send_async(feed).await.map_err(|_| RouterGone)
    }

    /// Like [`route`](Self::route), and done only once the router itself has the
    /// publishes (not just the feed thread's queue).
    async fn route_confirmed(&self, batch: Vec<Routed>) -> Result<(), RouterGone> {
        let (taken, confirmed) = tokio::sync::oneshot::channel();
        {
            let _alone = self.gate.write().await;
            let feed = Feed {
                batch,
                taken: Some(taken),
            };
            self.feed.send_async(feed).await.map_err(|_| RouterGone)?;
        }
        confirmed.await.map_err(|_| RouterGone)
    }

    /// Held while a SUBSCRIBE or UNSUBSCRIBE goes to the router (see `gate`).
    pub(crate) async fn changing_subscriptions(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.gate.clone().read_owned().await
    }

    /// Sends packets on a connection's own link without blocking the I/O thread on the
    /// router's bounded channel.
    pub(crate) async fn send(
        &self,
        tx: &mut LinkTx,
        mut packets: Vec<Packet>,
    ) -> Result<(), RouterGone> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        while (self.is_full)() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tx.buffer().extend(packets);
        tx.send(last).await.map(drop).map_err(|_| RouterGone)
    }

    /// Refuses in-process publishes from now on (the broker is stopping).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Notes that a subscription was granted `qos`.
    pub(crate) fn granted(&self, qos: u8) {
        self.max_granted.fetch_max(qos, Ordering::Relaxed);
    }

    /// A publish sluice makes itself (a will, an in-process publish), ready for the
    /// router: no publishing session, packet id 1 when it has one.
    pub(crate) fn built(
        &self,
        topic: &[u8],
        payload: &[u8],
        qos: u8,
        retain: bool,
        mut properties: Option<PublishProperties>,
    ) -> Routed {
        let pkid = u16::from(qos > 0);
        let mut publish = build_publish(topic, payload, qos, retain, pkid);
        self.prepare(&mut publish, &mut properties, qos, None);
        Routed {
            publish,
            properties,
            qos,
            pkid,
        }
    }

    /// Prepares a publish for the router: the marker it needs (given its QoS, RETAIN
    /// flag and publisher), and the one-byte payload standing for an empty one that is
    /// not retained.
    pub(crate) fn prepare(
        &self,
        publish: &mut Publish,
        properties: &mut Option<PublishProperties>,
        qos: u8,
        origin: Option<u64>,
    ) {
        let retain = publish.retain;
        let empty = publish.payload.is_empty() && !retain;
        let marker = Marker {
            // A retained message keeps its QoS for every later subscriber.
            qos: (retain || qos < self.max_granted.load(Ordering::Relaxed))
                .then_some(qos)
                .filter(|q| *q < 2),
            retain,
            origin,
            empty,
        };
        if empty {
            publish.payload = Bytes::from_static(b"\0");
        }
        mark(properties, &marker);
    }
}

/// Publishes into the router from inside the process: no connection, no socket, and not
/// to the pipeline (what sluice publishes itself is not telemetry). The router delivers it
/// to every matching subscription, as it does a client's publish; it counts in
/// `sluice_mqtt_routed_messages_total`.
#[derive(Clone)]
pub struct Publisher {
    router: Arc<Router>,
    meters: MqttMeters,
}

/// Why an in-process publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("{0:?} is not a topic name to publish to (empty, a wildcard, '$' or over 65535 bytes)")]
    Topic(String),
    #[error("QoS {0} does not exist")]
    Qos(u8),
    #[error("the broker is stopped: no client is connected to receive it")]
    Stopped,
}

impl Publisher {
    pub(crate) fn new(router: Arc<Router>, meters: MqttMeters) -> Publisher {
        Publisher { router, meters }
    }

    /// Hands one message to the router; done once the router has it (its log holds it
    /// for the matching subscriptions). Waits while the router's feed is full.
    pub async fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
    ) -> Result<(), PublishError> {
        if qos > 2 {
            return Err(PublishError::Qos(qos));
        }
        if topic.is_empty()
            || topic.len() > usize::from(u16::MAX)
            || topic.starts_with('$')
            || !frame::valid_topic_name(topic.as_bytes())
        {
            return Err(PublishError::Topic(topic.to_owned()));
        }
        if self.router.closed.load(Ordering::SeqCst) {
            return Err(PublishError::Stopped);
        }
        if !self.router.visibility.wanted(topic, retain) {
            // No subscription can see it.
            return Ok(());
        }
        let routed = self
            .router
            .built(topic.as_bytes(), payload, qos, retain, None);
        self.router
            .route_confirmed(vec![routed])
            .await
            .map_err(|_| PublishError::Stopped)?;
        self.meters.routed.inc();
        Ok(())
    }
}

fn disconnect(mut tx: LinkTx, rx: LinkRx) {
    let disconnect = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    // `send` is async in signature only: it pushes and signals the router.
    let _ = futures::executor::block_on(tx.send(disconnect));
    drop(rx);
}

/// The feed thread: takes batches of publishes, hands them to the router through the
/// feed link, and reads the router's acknowledgements (discarded: the device was
/// acknowledged by sluice).
fn run_feed(mut tx: LinkTx, mut rx: LinkRx, feed: flume::Receiver<Feed>) {
    let mut packets: Vec<Packet> = Vec::new();
    let mut taken = Vec::new();
    loop {
        match feed.recv_timeout(Duration::from_millis(100)) {
            Ok(first) => {
                taken.extend(first.taken);
                collect(first.batch, &mut packets);
                while let Ok(more) = feed.try_recv() {
                    taken.extend(more.taken);
                    collect(more.batch, &mut packets);
                    if packets.len() >= 4096 {
                        break;
                    }
                }
                if let Some(last) = packets.pop() {
                    tx.buffer().extend(packets.drain(..));
                    if futures::executor::block_on(tx.send(last)).is_err() {
                        // Those waiting for confirmation learn it by their sender's drop.
                        tracing::error!(
                            "the MQTT router stopped; messages for subscribers are lost from now on"
                        );
                        return;
                    }
                }
                for t in taken.drain(..) {
                    let _ = t.send(());
                }
            }
            Err(flume::RecvTimeoutError::Timeout) => {}
            Err(flume::RecvTimeoutError::Disconnected) => return,
        }
        // The router's acks of what was fed.
        loop {
            match rx.recv_deadline(Instant::now()) {
                Ok(Some(Notification::Unschedule)) => {
                    if rx.ready().is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(LinkError::RecvTimeout(_)) => break,
                Err(_) => return,
            }
        }
    }
}

fn collect(batch: Vec<Routed>, packets: &mut Vec<Packet>) {
    for routed in batch {
        let (qos, pkid) = (routed.qos, routed.pkid);
        packets.push(Packet::Publish(routed.publish, routed.properties));
        // The router holds a QoS 2 publish until its PUBREL, then appends it; both go
        // in one push, so the router pairs them in order.
        if qos == 2 {
            packets.push(Packet::PubRel(
                PubRel {
                    pkid,
                    reason: PubRelReason::Success,
                },
                None,
            ));
        }
    }
}

/// A key for rumqttd's session maps: rumqttd refuses client ids containing `+ # / $`
/// (MQTT allows them), so those (and `%`) are percent-encoded.
pub(crate) fn session_key(client_id: &str) -> String {
    let mut key = String::with_capacity(client_id.len());
    for c in client_id.chars() {
        match c {
            '+' | '#' | '/' | '$' | '%' => key.push_str(&format!("%{:02X}", c as u32)),
            c => key.push(c),
        }
    }
    key
}

/// A PUBLISH built from parts, for the few cases sluice must set fields rumqttd keeps
/// private (QoS, DUP, packet id): a QoS downgrade, a cleared DUP, a will. Copies the
/// payload.
pub(crate) fn build_publish(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
) -> Publish {
    let mut raw = Vec::with_capacity(5 + topic.len() + payload.len());
    raw.push(0x30 | (qos << 1) | u8::from(retain));
    raw.extend_from_slice(&pkid.to_be_bytes());
    raw.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    raw.extend_from_slice(topic);
    raw.extend_from_slice(payload);
    Publish::deserialize(Bytes::from(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_survives_the_router_and_is_taken_off_again() {
        let mut props = None;
        let marker = Marker {
            qos: Some(0),
            retain: true,
            origin: Some(42),
            empty: true,
        };
        mark(&mut props, &marker);
        assert_eq!(unmark(&mut props), marker);
        assert_eq!(props, None, "nothing of it is left");

        let mut props = Some(PublishProperties {
            user_properties: vec![("a".into(), "1".into()), (MARKER_KEY.into(), "q1;".into())],
            ..Default::default()
        });
        assert_eq!(unmark(&mut props).qos, Some(1));
        assert_eq!(
            props.unwrap().user_properties,
            vec![("a".to_owned(), "1".to_owned())]
        );
        mark(&mut None, &Marker::default());
    }

    #[test]
    fn session_keys_escape_what_rumqttd_refuses() {
        assert_eq!(session_key("device-1"), "device-1");
        assert_eq!(session_key("a/b+c#d$e%f"), "a%2Fb%2Bc%23d%24e%25f");
        assert_ne!(session_key("a%2F"), session_key("a/"));
    }

    #[test]
    fn a_built_publish_keeps_what_it_was_given() {
        let p = build_publish(b"t/1", b"hello", 1, true, 7);
        let serialized = p.serialize();
        assert_eq!(serialized[0], 0x33);
        assert_eq!(&serialized[1..3], &[0, 7]);
        assert_eq!(
            (&p.topic[..], &p.payload[..], p.retain),
            (&b"t/1"[..], &b"hello"[..], true)
        );
    }

    #[test]
    fn visibility_counts_subscriptions_that_can_see_direct_topics() {
        let v = Visibility::new("devices/+/telemetry".into());
        assert!(v.is_direct("devices/d1/telemetry"));
        assert!(!v.is_direct("devices/d1/status"));
        assert!(!v.watched("devices/d1/telemetry"));
        assert!(!v.add("alerts/#"));
        assert!(v.add("devices/d1/+"));
        assert!(v.watched("devices/d1/telemetry"));
        assert!(!v.watched("devices/d2/telemetry"));
        assert!(v.add("devices/d1/+"));
        v.remove("devices/d1/+");
        assert!(v.watched("devices/d1/telemetry"));
        v.remove("devices/d1/+");
        assert!(!v.watched("devices/d1/telemetry"));
    }
}
