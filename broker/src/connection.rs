//! One MQTT connection, from its first byte to its close: one tokio task each.
//!
//! - **Handshake.** Within `mqtt.connect_timeout` (TLS and WebSocket handshakes
//!   included) the first packet must be a CONNECT. Its protocol level picks the codec
//!   (4: MQTT 3.1.1, 5: MQTT 5; 3.1 and unknown levels get return code 1 / reason
//!   0x84). Every refusal that MQTT gives a code for is answered with a CONNACK carrying
//!   it, then the socket is closed.
//! - **Publishes** go to the pipeline (every one of them: a telemetry reading becomes a
//!   row, anything else a reject) and, when an MQTT subscriber or the retained store
//!   needs them, to the router. The PUBACK (PUBREC) is written once the pipeline has
//!   taken the message. While the pipeline is full the task stops reading its socket:
//!   TCP back-pressure reaches the device, nothing is dropped.
//! - **Acknowledgements go out in the order of the packets they answer**
//!   [MQTT-4.6.0-2]: each is a slot in a queue, filled when the pipeline took the
//!   message or when the router answered a SUBSCRIBE/UNSUBSCRIBE.
//! - **Subscriptions** are the router's, through a link of this connection's own,
//!   registered the first time it is needed. Messages from the router go out through
//!   [`egress`](crate::egress).
//! - **Keep alive**: 0 is accepted (no timeout); otherwise nothing read for 1.5 × keep
//!   alive closes the connection [MQTT-3.1.2-24]. MQTT 5 clients asking for more than
//!   `mqtt.max_keep_alive` are told the maximum (Server Keep Alive).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectProperties, DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet,
    PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
    PublishProperties, RetainForwardRule, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::codec::{Codec, ReadError, Version};
use crate::egress::Egress;
use crate::frame::{self, Header, Protocol};
use crate::meters::{Attempt, Close, ListenerMeters, MqttMeters, Refused};
use crate::router::{self, Link, Routed, Router};
use crate::session::{Control, Expired, SessionState, Sessions, Stored, Sub, Will};
use crate::transport::{Listener, Transport};
use crate::{AuthOutcome, Authenticator, ConnectInfo, Identity, Inbound, NotTaken, Pipeline};

/// Connection limits and protocol settings.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) max_packet: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) receive_maximum: u16,
    pub(crate) topic_alias_max: u16,
    /// 0: any keep alive is accepted as asked.
    pub(crate) max_keep_alive: u16,
    pub(crate) max_session_expiry: u32,
    /// Filters refused at SUBSCRIBE.
    pub(crate) deny_subscribe: Vec<String>,
    pub(crate) rate: crate::RateLimits,
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) limits: Limits,
    pub(crate) router: Arc<Router>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) pipeline: Arc<dyn Pipeline>,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) meters: MqttMeters,
    pub(crate) listeners: HashMap<Listener, ListenerMeters>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Clients past their CONNACK, for `max_connections`.
    pub(crate) connected: AtomicUsize,
    pub(crate) next_id: AtomicU64,
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// Which name of a verified client certificate is the client's identity.
    pub(crate) client_identity: crate::ClientIdentity,
    pub(crate) ws_max_message: usize,
}

/// Serves one accepted socket until it closes.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: Listener,
    socket: TcpStream,
    peer: SocketAddr,
) {
    let _ = socket.set_nodelay(true);
    let deadline = Instant::now() + shared.limits.connect_timeout;
    let mut read = BytesMut::new();
    let opened = tokio::time::timeout_at(deadline, async {
        let mut transport = open(&shared, listener, socket).await?;
        let header = read_first(&shared, listener, &mut transport, &mut read).await?;
        Ok::<_, Attempt>((transport, header))
    })
    .await;
    let (transport, header) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(attempt)) => return shared.meters.attempt(listener, attempt),
        Err(_) => return shared.meters.attempt(listener, Attempt::Timeout),
    };
    let certificate = transport.certificate(shared.client_identity);
    let handshake = Handshake {
        shared: &shared,
        listener,
        transport,
        read,
        peer,
        certificate,
    };
    match handshake.connect(header).await {
        Ok(conn) => conn.run().await,
        Err(attempt) => shared.meters.attempt(listener, attempt),
    }
}

/// The TLS or WebSocket handshake, if the listener has one.
async fn open(
    shared: &Shared,
    listener: Listener,
    socket: TcpStream,
) -> Result<Transport, Attempt> {
    match listener {
        Listener::Tcp => Ok(Transport::Tcp(socket)),
        Listener::Tls => {
            let acceptor = shared.tls.as_ref().ok_or(Attempt::Closed)?;
            let stream = acceptor.accept(socket).await.map_err(|e| {
                tracing::debug!(error = %e, "TLS handshake failed");
                Attempt::Closed
            })?;
            Ok(Transport::Tls(Box::new(stream)))
        }
        Listener::Ws => {
            use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
            // tungstenite's callback signature fixes the (large) error type.
            #[allow(clippy::result_large_err)]
            let choose_mqtt = |request: &Request, mut response: Response| {
                // The subprotocol is "mqtt" [MQTT-6.0.0-3]; clients that offer none are
                // served too.
                let offered = request
                    .headers()
                    .get_all("sec-websocket-protocol")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .map(str::trim)
                    .find(|p| p.eq_ignore_ascii_case("mqtt") || p.eq_ignore_ascii_case("mqttv3.1"))
                    .map(str::to_owned);
                if let Some(protocol) = offered
                    && let Ok(value) = protocol.parse()
                {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", value);
                }
                Ok(response)
            };
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .max_message_size(Some(shared.ws_max_message))
                .max_frame_size(Some(shared.ws_max_message));
            let stream =
                tokio_tungstenite::accept_hdr_async_with_config(socket, choose_mqtt, Some(config))
                    .await
                    .map_err(|e| {
                        tracing::debug!(error = %e, "WebSocket handshake failed");
                        Attempt::Closed
                    })?;
            Ok(Transport::Ws(Box::new(stream)))
        }
    }
}

/// Reads until the first whole packet is buffered; returns its header.
async fn read_first(
    shared: &Shared,
    listener: Listener,
    transport: &mut Transport,
    read: &mut BytesMut,
) -> Result<Header, Attempt> {
    let max_packet = shared.limits.max_packet;
    loop {
        match frame::header(read, max_packet) {
            Ok(header) if read.len() >= header.frame_len() => return Ok(header),
            Ok(_) | Err(frame::FrameError::Incomplete) => {}
            Err(frame::FrameError::TooLarge(_)) => {
                // A CONNECT over the limit: MQTT 5 has a code for it, 3.1.1 does not. The
                // protocol level is in the first bytes.
                if read.len() >= 10
                    && read
                        .get(..10)
                        .is_some_and(|b| &b[4..8] == b"MQTT" && b[8] == 5)
                {
                    let _ = transport.write_all(&[0x20, 0x03, 0x00, 0x95, 0x00]).await;
                    linger(transport).await;
                    return Err(Attempt::Malformed);
                }
                if read.len() < 10 {
                    // Not enough to tell the version yet.
                } else {
                    return Err(Attempt::Malformed);
                }
            }
            Err(frame::FrameError::MalformedLength) => return Err(Attempt::Malformed),
        }
        let n = transport
            .read(read, 1024)
            .await
            .map_err(|_| Attempt::Closed)?;
        if n == 0 {
            return Err(Attempt::Closed);
        }
        if let Some(m) = shared.listeners.get(&listener) {
            m.bytes_in.inc_by(n as u64);
        }
        if read.len() > max_packet + 8 {
            return Err(Attempt::Malformed);
        }
    }
}

/// Half-closes after a refusal or a server DISCONNECT and reads what the client still
/// sends for a moment, so that the last packet reaches it instead of a reset.
async fn linger(transport: &mut Transport) {
    transport.shutdown().await;
    let mut sink = BytesMut::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            sink.clear();
            match transport.read(&mut sink, 4096).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

struct Handshake<'a> {
    shared: &'a Arc<Shared>,
    listener: Listener,
    transport: Transport,
    read: BytesMut,
    peer: SocketAddr,
    /// The identity of the client certificate the TLS handshake verified.
    certificate: Option<String>,
}

impl Handshake<'_> {
    async fn refuse(
        &mut self,
        version: Version,
        code: ConnectReturnCode,
        attempt: Attempt,
    ) -> Attempt {
        let mut buf = BytesMut::new();
        let ack = ConnAck {
            session_present: false,
            code,
        };
        if Codec::new(version)
            .write(Packet::ConnAck(ack, None), &mut buf)
            .is_ok()
        {
            let _ = self.transport.write_all(&buf).await;
        }
        linger(&mut self.transport).await;
        attempt
    }

    /// Reads and checks the CONNECT, sets up the session, writes the CONNACK.
    async fn connect(mut self, header: Header) -> Result<Conn, Attempt> {
        use ConnectReturnCode as Rc;
        if header.kind() != frame::kind::CONNECT {
            // [MQTT-3.1.0-1]: the first packet must be CONNECT; no CONNACK for anything else.
            return Err(Attempt::Closed);
        }
        let packet = &self.read[..header.frame_len()];
        let version = match frame::connect_protocol(&header, packet) {
            Protocol::V311 => Version::V311,
            Protocol::V5 => Version::V5,
            Protocol::Unsupported(_) => {
                return Err(self
                    .refuse(
                        Version::V311,
                        Rc::RefusedProtocolVersion,
                        Attempt::ProtocolVersion,
                    )
                    .await);
            }
            Protocol::UnsupportedV5(_) => {
                return Err(self
                    .refuse(
                        Version::V5,
                        Rc::UnsupportedProtocolVersion,
                        Attempt::ProtocolVersion,
                    )
                    .await);
            }
            Protocol::NotMqtt => return Err(Attempt::Closed),
        };
        let v5 = version == Version::V5;
        let flags = frame::connect_flags(&header, packet).unwrap_or(0);
        // Reserved flag [MQTT-3.1.2-3]; will QoS/retain without a will [MQTT-3.1.2-11..15];
        // in 3.1.1 a password needs a user name [MQTT-3.1.2-22].
        let malformed = flags & 0x01 != 0
            || (flags & 0x04 == 0 && flags & 0x38 != 0)
            || (flags >> 3) & 0x03 == 3
            || (!v5 && flags & 0x40 != 0 && flags & 0x80 == 0);
        let codec = Codec::new(version);
        let decoded = if malformed {
            Err(ReadError::Malformed("reserved connect flags".into()))
        } else {
            codec.read(&mut self.read, self.shared.limits.max_packet)
        };
        let (connect, props, will, will_props, login) = match decoded {
            Ok(Some(read)) => match read.packet {
                Packet::Connect(c, p, w, wp, l) => (c, p, w, wp, l),
                _ => return Err(Attempt::Malformed),
            },
            _ if v5 => {
                return Err(self
                    .refuse(version, Rc::MalformedPacket, Attempt::Malformed)
                    .await);
            }
            // [MQTT-3.1.4-1]: a CONNECT that breaks the rules is closed without CONNACK.
            _ => return Err(Attempt::Malformed),
        };
        if v5 && let Some(code) = connect_properties_error(props.as_ref()) {
            let attempt = if code == Rc::BadAuthenticationMethod {
                Attempt::NotAuthorized
            } else {
                Attempt::Malformed
            };
            return Err(self.refuse(version, code, attempt).await);
        }
        if let Some(will) = &will
            && (will.topic.is_empty() || !frame::valid_topic_name(&will.topic))
        {
            return Err(if v5 {
                self.refuse(version, Rc::TopicNameInvalid, Attempt::Malformed)
                    .await
            } else {
                Attempt::Malformed
            });
        }

        // Client identifier [MQTT-3.1.3-6..9]: an empty one is assigned one, except in
        // 3.1.1 with a persistent session.
        let clean = connect.clean_session;
        let mut assigned = None;
        let client_id: Arc<str> = if connect.client_id.is_empty() {
            if !v5 && !clean {
                return Err(self
                    .refuse(version, Rc::ClientIdentifierNotValid, Attempt::ClientId)
                    .await);
            }
            let id = format!("sluice-{:016x}", rand_id(&self.shared.next_id));
            assigned = v5.then(|| id.clone());
            id.into()
        } else {
            connect.client_id.as_str().into()
        };

        let info = ConnectInfo {
            client_id: &client_id,
            username: login.as_ref().map(|l| l.username.as_str()),
            password: login.as_ref().map(|l| l.password.as_bytes()),
            listener: self.listener.label(),
            peer: self.peer,
            certificate: self.certificate.as_deref(),
        };
        let (name, credentials_expire): (Option<Arc<str>>, _) =
            match self.shared.auth.authenticate(&info).await {
                AuthOutcome::Allow => (login.as_ref().map(|l| l.username.as_str().into()), None),
                AuthOutcome::AllowAs { name, expires } => (name, expires),
                AuthOutcome::BadCredentials => {
                    // 3.1.1's return code 4 and MQTT 5's 0x86 are one variant.
                    return Err(self
                        .refuse(version, Rc::BadUserNamePassword, Attempt::BadCredentials)
                        .await);
                }
                AuthOutcome::NotAuthorized => {
                    return Err(self
                        .refuse(version, Rc::NotAuthorized, Attempt::NotAuthorized)
                        .await);
                }
            };
        let identity = Identity {
            client_id: client_id.clone(),
            username: name,
        };
        // A will is a publish the client makes by leaving: refused where its publishes
        // would be (as Mosquitto does).
        if let Some(will) = &will
            && !self.shared.auth.may_publish(
                &identity,
                std::str::from_utf8(&will.topic).unwrap_or_default(),
            )
        {
            return Err(self
                .refuse(version, Rc::NotAuthorized, Attempt::NotAuthorized)
                .await);
        }
        if *self.shared.shutdown.borrow() {
            let code = if v5 {
                Rc::ServerUnavailable
            } else {
                Rc::ServiceUnavailable
            };
            return Err(self.refuse(version, code, Attempt::Unavailable).await);
        }
        let slot = ConnectionSlot::take(self.shared);
        let Some(slot) = slot else {
            let code = if v5 {
                Rc::QuotaExceeded
            } else {
                Rc::ServiceUnavailable
            };
            return Err(self.refuse(version, code, Attempt::ServerFull).await);
        };

        let limits = &self.shared.limits;
        // Keep alive: as asked, but an MQTT 5 client asking for more than the maximum
        // (or for none) while a maximum is set is told the maximum.
        let mut server_keep_alive = None;
        let mut keep_alive = connect.keep_alive;
        if v5 && limits.max_keep_alive > 0 && keep_alive > limits.max_keep_alive {
            keep_alive = limits.max_keep_alive;
            server_keep_alive = Some(keep_alive);
        }
        // Session expiry: MQTT 5 asks for it; a 3.1.1 persistent session gets the maximum.
        let asked_expiry = if v5 {
            props
                .as_ref()
                .and_then(|p| p.session_expiry_interval)
                .unwrap_or(0)
        } else if clean {
            0
        } else {
            u32::MAX
        };
        let expiry = asked_expiry.min(limits.max_session_expiry);
        let granted_expiry = (v5 && expiry != asked_expiry).then_some(expiry);

        // Takeover [MQTT-3.1.4-2]: the older connection closes before this one goes on.
        let conn_id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (control, done) = Control::new();
        if let Some(older) = self
            .shared
            .sessions
            .claim(&client_id, conn_id, control.clone())
        {
            older.kick();
            older.closed(Duration::from_secs(10)).await;
        }
        let stored = self.shared.sessions.take_stored(&client_id);
        if stored.is_some() {
            self.shared.meters.sessions_stored.dec();
        }
        let resume = !clean && stored.is_some();
        let persistent = expiry > 0;
        let key = router::session_key(&client_id);
        let mut session = match stored {
            Some(stored) if resume => {
                // A delayed will is not published if the client came back in time
                // [MQTT-3.1.3-9].
                let Stored { mut state, .. } = stored;
                // What the router sends again up to the last message sent before is a
                // redelivery (DUP) [MQTT-3.3.1-1].
                for sub in state.subs.values_mut() {
                    sub.redelivery_until = sub.last_offset;
                }
                state
            }
            Some(stored) => {
                // A clean start ends the old session: its will goes out now, the router
                // forgets it.
                end_session(self.shared, &client_id, stored).await;
                SessionState::new(conn_id)
            }
            None => SessionState::new(conn_id),
        };
        let mut link = None;
        // rumqttd resumes a persistent session's subscriptions but forgets their
        // identifiers: they are given again (an existing subscription is not made anew,
        // and gets no retained messages), their SUBACKs swallowed.
        let mut to_router = Vec::new();
        let mut expect = VecDeque::new();
        if resume || persistent {
            match self.shared.router.connect(key.clone(), false).await {
                Ok(l) => {
                    self.shared.meters.router_links.inc();
                    session.router_session = true;
                    link = Some(l);
                    for (filter, sub) in &session.subs {
                        to_router.push(router_subscribe(1, filter, sub.qos, sub.internal_id));
                        expect.push_back(Expect::SubAck {
                            slot: u64::MAX,
                            index: 0,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(client_id = %client_id, error = %e, "the router refused a session");
                    self.shared
                        .sessions
                        .release(&client_id, conn_id, None, on_timer(self.shared));
                    drop(slot);
                    let code = if v5 {
                        Rc::ServerBusy
                    } else {
                        Rc::ServiceUnavailable
                    };
                    return Err(self.refuse(version, code, Attempt::ServerFull).await);
                }
            }
        }

        let connack_props = v5.then(|| ConnAckProperties {
            session_expiry_interval: granted_expiry,
            receive_max: Some(limits.receive_maximum),
            max_packet_size: Some(limits.max_packet.min(u32::MAX as usize) as u32),
            assigned_client_identifier: assigned,
            topic_alias_max: (limits.topic_alias_max > 0).then_some(limits.topic_alias_max),
            server_keep_alive,
            ..ConnAckProperties::default()
        });
        let mut write = BytesMut::new();
        let ack = ConnAck {
            session_present: resume,
            code: Rc::Success,
        };
        let _ = codec.write(Packet::ConnAck(ack, connack_props), &mut write);
        let meters = &self.shared.listeners[&self.listener];
        meters.connected.inc();
        self.shared.meters.attempt(self.listener, Attempt::Ok);

        let client_props = props.unwrap_or_else(empty_connect_properties);
        let will = will.map(|will| Will {
            delay: Duration::from_secs(u64::from(
                will_props
                    .as_ref()
                    .and_then(|p| p.delay_interval)
                    .unwrap_or(0),
            )),
            will,
            properties: will_props,
        });
        let egress = Egress::new(
            codec,
            client_props.receive_maximum.unwrap_or(u16::MAX),
            client_props
                .max_packet_size
                .map_or(usize::MAX, |m| m as usize),
            client_props.topic_alias_max.unwrap_or(0),
        );
        let transport = self.transport;
        Ok(Conn {
            shared: self.shared.clone(),
            listener: self.listener,
            transport,
            codec,
            version,
            client_id,
            identity,
            throttle: crate::throttle::Throttle::new(&limits.rate, Instant::now()),
            conn_id,
            key,
            control,
            _done: done,
            _slot: slot,
            read: self.read,
            read_chunk: MIN_READ,
            write,
            keep_alive: (keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
            // (Beyond what an Instant holds: never.)
            credentials_expire: credentials_expire.and_then(|at| {
                Instant::now().checked_add(at.duration_since(SystemTime::now()).unwrap_or_default())
            }),
            expiry,
            connect_expiry: expiry,
            session,
            link,
            will,
            aliases_in: HashMap::new(),
            slots: VecDeque::new(),
            slot_base: 0,
            expect,
            pending: Vec::new(),
            routed: Vec::new(),
            batch_slots: Vec::new(),
            durable: futures::stream::FuturesOrdered::new(),
            to_router,
            egress,
            qos1_unacked: 0,
        })
    }
}

fn empty_connect_properties() -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: None,
        receive_maximum: None,
        max_packet_size: None,
        topic_alias_max: None,
        request_response_info: None,
        request_problem_info: None,
        user_properties: Vec::new(),
        authentication_method: None,
        authentication_data: None,
    }
}

/// MQTT 5 CONNECT properties that are protocol errors, or ask for what sluice does not
/// offer (enhanced authentication).
fn connect_properties_error(props: Option<&ConnectProperties>) -> Option<ConnectReturnCode> {
    let p = props?;
    if p.receive_maximum == Some(0)
        || p.max_packet_size == Some(0)
        || p.request_response_info.is_some_and(|v| v > 1)
        || p.request_problem_info.is_some_and(|v| v > 1)
        || (p.authentication_data.is_some() && p.authentication_method.is_none())
    {
        return Some(ConnectReturnCode::ProtocolError);
    }
    p.authentication_method
        .is_some()
        .then_some(ConnectReturnCode::BadAuthenticationMethod)
}

fn rand_id(seq: &AtomicU64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Unique in this process (the sequence) and unlikely to repeat across restarts.
    nanos.rotate_left(17)
        ^ seq
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A place among `mqtt.max_connections`, given back when dropped.
pub(crate) struct ConnectionSlot(Arc<Shared>);

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>) -> Option<ConnectionSlot> {
        let max = shared.limits.max_connections;
        shared
            .connected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(shared.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Read buffer sizes: start small, grow while reads fill the buffer.
const MIN_READ: usize = 2048;
const MAX_READ: usize = 64 * 1024;
/// Messages handed to the pipeline in one go at most.
const MAX_BATCH: usize = 1024;
/// A connection that wrote more than `BUSY_WRITES` times in a `BUSY_WINDOW` (2,000
/// writes a second) is busy: until it is not, it writes at most once per
/// `BUSY_WRITE_INTERVAL`, whatever is ready by then in one write. Acknowledgements of a
/// connection below that rate go out at once; above it, fewer and fuller writes save
/// both ends a syscall and a wake-up per packet (on loopback a write also runs the
/// receiver's TCP stack), which is what sustains the highest rates.
const BUSY_WINDOW: Duration = Duration::from_millis(100);
const BUSY_WRITES: u32 = 200;
const BUSY_WRITE_INTERVAL: Duration = Duration::from_millis(1);
/// A write buffer this full goes at once, busy or not.
const WRITE_NOW_BYTES: usize = 16 * 1024;

/// When a connection's next write may go: at once, unless the connection is busy (see
/// [`BUSY_WRITES`]).
struct WritePace {
    window_start: Instant,
    writes: u32,
    busy: bool,
    last_write: Instant,
    /// A write waits for the timer.
    deferred: bool,
}

impl WritePace {
    fn new() -> Self {
        let now = Instant::now();
        WritePace {
            window_start: now,
            writes: 0,
            busy: false,
            last_write: now,
            deferred: false,
        }
    }

    /// `Some(when)` if the write ready now is to wait until `when`.
    fn defer(&mut self, now: Instant) -> Option<Instant> {
        if now >= self.window_start + BUSY_WINDOW {
            self.busy = self.writes >= BUSY_WRITES;
            self.writes = 0;
            self.window_start = now;
        }
        let due = self.last_write + BUSY_WRITE_INTERVAL;
        self.deferred = self.busy && now < due;
        self.deferred.then_some(due)
    }

    fn wrote(&mut self, now: Instant) {
        self.writes += 1;
        self.last_write = now;
        self.deferred = false;
    }
}

/// One acknowledgement owed to the client, in the order of the packets it answers.
struct Slot {
    reply: Reply,
    /// Conditions still to be met: the pipeline took the message, the router answered.
    waiting: u16,
    /// Counted in the QoS 1 messages awaiting their PUBACK.
    qos1: bool,
}

/// What a slot sends once its conditions are met.
enum Reply {
    Nothing,
    /// A successful PUBACK, the packet nearly every slot holds: kept as its id (a
    /// `Packet` is a few hundred bytes, moved on every push and pop).
    PubAck(u16),
    Packet(Box<Packet>),
}

impl From<Packet> for Reply {
    fn from(packet: Packet) -> Reply {
        Reply::Packet(Box::new(packet))
    }
}

/// An answer awaited from the router on this connection's link, in the order the
/// router gives them.
pub(crate) enum Expect {
    /// The code of filter `index` of the SUBACK in slot `slot`.
    SubAck { slot: u64, index: usize },
    /// One filter of the UNSUBACK in slot `slot`.
    UnsubAck { slot: u64 },
    /// A PUBREL for a QoS 2 message sent to the client (goes to the client).
    PubRel,
    /// A PUBREL for a QoS 2 message the client never got (too large, no local…): sluice
    /// completes it with the router.
    SwallowPubRel,
}

/// Why the main loop ended.
struct Ending {
    close: Close,
    /// MQTT 5 DISCONNECT reason to send, if any.
    reason: Option<DisconnectReasonCode>,
    /// Whether the will is published.
    will: bool,
}

impl From<Close> for Ending {
    /// An end the client is not told of (the network, the pipeline): the will goes out.
    fn from(close: Close) -> Ending {
        Ending {
            close,
            reason: None,
            will: true,
        }
    }
}

impl Ending {
    fn server(close: Close, reason: DisconnectReasonCode) -> Ending {
        Ending {
            close,
            reason: Some(reason),
            will: true,
        }
    }
}

/// A delivery's end: durable (or not), with its slots and how many messages it held.
type Delivered = (Result<(), NotTaken>, Vec<u64>, u64);

/// Deliveries of one connection waiting to be durable at once; at this many the
/// connection waits for the oldest before it reads on.
const MAX_UNDURABLE: usize = 64;

pub(crate) struct Conn {
    shared: Arc<Shared>,
    listener: Listener,
    transport: Transport,
    codec: Codec,
    version: Version,
    client_id: Arc<str>,
    /// Who the access checks see.
    identity: Identity,
    /// `[mqtt.limits]`: reading pauses while this connection is over its rate.
    throttle: crate::throttle::Throttle,
    conn_id: u64,
    /// rumqttd's session key for this client id.
    key: String,
    control: Arc<Control>,
    /// Dropped when the connection is done: the taker-over waits for it.
    _done: tokio::sync::oneshot::Sender<()>,
    _slot: ConnectionSlot,
    read: BytesMut,
    read_chunk: usize,
    write: BytesMut,
    keep_alive: Option<Duration>,
    /// When the credentials it connected with expire (a JWT's `exp`): it is closed then.
    credentials_expire: Option<Instant>,
    /// Session expiry, seconds (may be changed by DISCONNECT).
    expiry: u32,
    connect_expiry: u32,
    session: SessionState,
    link: Option<Link>,
    will: Option<Will>,
    /// Topic aliases the client set (MQTT 5).
    aliases_in: HashMap<u16, Bytes>,
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`.
    slot_base: u64,
    expect: VecDeque<Expect>,
    /// Messages read, not yet handed to the pipeline.
    pending: Vec<Inbound>,
    /// Copies for the router.
    routed: Vec<Routed>,
    /// Slots waiting for `pending` to be taken.
    batch_slots: Vec<u64>,
    /// Deliveries taken, waiting to be durable, in order: each with its slots.
    durable: futures::stream::FuturesOrdered<crate::BoxFuture<Delivered>>,
    /// Packets for the router on this connection's link.
    to_router: Vec<Packet>,
    egress: Egress,
    /// QoS 1 publishes read whose PUBACK is not written yet.
    qos1_unacked: usize,
}

impl Conn {
    async fn run(mut self) {
        let mut ending = self.serve().await;
        // What was taken is durable in milliseconds: its acknowledgements still go out,
        // and every message is counted once.
        while let Err(e) = self.settle().await {
            ending = e;
        }
        self.finish(ending).await;
    }

    async fn serve(&mut self) -> Ending {
        // The CONNACK, and (on a resumed session) the subscriptions' identifiers.
        if let Err(close) = self.after_step().await {
            return Ending::from(close);
        }
        let mut shutdown = self.shared.shutdown.clone();
        let control = self.control.clone();
        // Keep alive: the timer is armed for the time since the last read, and moved
        // when it fires early, rather than reset on every read.
        let mut last_read = Instant::now();
        let idle = tokio::time::sleep(self.keep_alive.unwrap_or(Duration::from_secs(86400 * 365)));
        tokio::pin!(idle);
        let mut pace = WritePace::new();
        let write_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(write_timer);
        let resume_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(resume_timer);
        let credentials_expire = self.credentials_expire;
        let expired = tokio::time::sleep_until(
            credentials_expire.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365)),
        );
        tokio::pin!(expired);
        let throttled = self.shared.limits.rate.is_on();
        loop {
            if *shutdown.borrow() {
                return Ending::server(Close::Shutdown, DisconnectReasonCode::ServerShuttingDown);
            }
            let chunk = self.read_chunk;
            // Over its rate: nothing more is read until the buckets allow it (TCP slows
            // the client); an MQTT 5 client that stays over is told 0x96 and closed.
            let paused = if throttled {
                let now = Instant::now();
                let resume = self.throttle.resume_at(now);
                if let Some(at) = resume {
                    if self.version == Version::V5 && self.throttle.persistent(now) {
                        return Ending::server(
                            Close::RateTooHigh,
                            DisconnectReasonCode::MessageRateTooHigh,
                        );
                    }
                    if resume_timer.deadline() != at {
                        self.shared.meters.throttled.inc();
                        resume_timer.as_mut().reset(at);
                    }
                }
                resume.is_some()
            } else {
                false
            };
            tokio::select! {
                biased;
                _ = control.kicked() => {
                    return Ending::server(Close::TakenOver, DisconnectReasonCode::SessionTakenOver);
                }
                _ = shutdown.changed() => {}
                _ = &mut idle, if self.keep_alive.is_some() => {
                    let due = last_read + self.keep_alive.unwrap_or_default();
                    if Instant::now() >= due {
                        return Ending::server(Close::KeepAlive, DisconnectReasonCode::KeepAliveTimeout);
                    }
                    idle.as_mut().reset(due);
                    continue;
                }
                _ = &mut expired, if credentials_expire.is_some() => {
                    return Ending::server(Close::CredentialsExpired, DisconnectReasonCode::NotAuthorized);
                }
                _ = &mut write_timer, if pace.deferred => {}
                // The rate allows more: the packets read and waiting first.
                _ = &mut resume_timer, if paused => {
                    if let Err(ending) = self.on_bytes().await {
                        return ending;
                    }
                }
                Some(done) = self.durable.next(), if !self.durable.is_empty() => {
                    if let Err(ending) = self.on_durable(done) {
                        return ending;
                    }
                }
                notification = next_notification(&mut self.link) => {
                    if let Err(ending) = self.on_router(notification).await {
                        return ending;
                    }
                }
                read = self.transport.read(&mut self.read, chunk), if !paused => {
                    let n = match read {
                        Ok(0) | Err(_) => return Ending::from(Close::Network),
                        Ok(n) => n,
                    };
                    self.shared.listeners[&self.listener].bytes_in.inc_by(n as u64);
                    self.read_chunk = if n >= chunk { (chunk * 2).min(MAX_READ) } else { MIN_READ.max(chunk / 2) };
                    last_read = Instant::now();
                    if let Err(ending) = self.on_bytes().await {
                        return ending;
                    }
                    if self.read.is_empty() {
                        // An idle connection holds no read buffer.
                        self.read = BytesMut::new();
                    }
                }
            }
            if let Err(close) = self.flush_router().await {
                return Ending::from(close);
            }
            // Deliveries that became durable together (one WAL group) are acknowledged
            // in one write.
            if let Err(ending) = self.take_durable().await {
                return ending;
            }
            if self.write.is_empty() {
                continue;
            }
            let now = Instant::now();
            if self.write.len() < WRITE_NOW_BYTES
                && let Some(due) = pace.defer(now)
            {
                write_timer.as_mut().reset(due);
                continue;
            }
            if let Err(close) = self.flush().await {
                return Ending::from(close);
            }
            pace.wrote(now);
        }
    }

    /// Sends what the last step produced: packets for the router, then for the client.
    async fn after_step(&mut self) -> Result<(), Close> {
        self.flush_router().await?;
        self.flush().await
    }

    /// Decodes every whole packet read so far (with `[mqtt.limits]`, as many as the
    /// connection's rate allows: the rest wait in the buffer).
    async fn on_bytes(&mut self) -> Result<(), Ending> {
        let received_at_ns = now_ns();
        let throttled = self.shared.limits.rate.is_on();
        loop {
            if throttled {
                if self.throttle.resume_at(Instant::now()).is_some() {
                    break;
                }
                if let Ok(h) = frame::header(&self.read, self.shared.limits.max_packet)
                    && self.read.len() >= h.frame_len()
                {
                    self.throttle
                        .spend(u64::from(h.kind() == 3), h.frame_len() as u64);
                }
            }
            let read = match self
                .codec
                .read(&mut self.read, self.shared.limits.max_packet)
            {
                Ok(Some(read)) => read,
                Ok(None) => break,
                Err(ReadError::TooLarge(_)) => {
                    return Err(self
                        .protocol_end(Close::TooLarge, DisconnectReasonCode::PacketTooLarge)
                        .await);
                }
                Err(ReadError::NotAllowed(_)) | Err(ReadError::Malformed(_)) => {
                    return Err(self
                        .protocol_end(Close::Protocol, DisconnectReasonCode::MalformedPacket)
                        .await);
                }
            };
            match read.packet {
                Packet::Publish(publish, properties) => {
                    if let Err(ending) =
                        self.on_publish(read.header, read.pkid, publish, properties, received_at_ns)
                    {
                        return Err(self.end_with_pending(ending).await);
                    }
                    if self.pending.len() >= MAX_BATCH {
                        self.deliver().await?;
                    }
                }
                Packet::PubAck(ack, _) => self.egress.client_puback(ack.pkid),
                Packet::PubRec(rec, _) => self.egress.client_pubrec(rec.pkid, rec.reason),
                Packet::PubComp(comp, _) => self.egress.client_pubcomp(comp.pkid),
                Packet::PubRel(rel, _) => {
                    // The end of a QoS 2 publish of the client's [MQTT-4.3.3-2].
                    let reason = if self.session.qos2_in.remove(&rel.pkid)
                        || self.version == Version::V311
                    {
                        PubCompReason::Success
                    } else {
                        PubCompReason::PacketIdentifierNotFound
                    };
                    self.slot(
                        Packet::PubComp(
                            PubComp {
                                pkid: rel.pkid,
                                reason,
                            },
                            None,
                        )
                        .into(),
                        0,
                        false,
                    );
                }
                Packet::Subscribe(subscribe, props) => {
                    self.deliver().await?;
                    let _ordered = self.shared.router.changing_subscriptions().await;
                    self.on_subscribe(subscribe, props).await?;
                    self.send_to_router_now().await?;
                }
                Packet::Unsubscribe(unsubscribe, _) => {
                    self.deliver().await?;
                    let _ordered = self.shared.router.changing_subscriptions().await;
                    self.on_unsubscribe(unsubscribe).await?;
                    self.send_to_router_now().await?;
                }
                Packet::PingReq(_) => {
                    // Never behind other acknowledgements.
                    let _ = self
                        .codec
                        .write(Packet::PingResp(PingResp), &mut self.write);
                }
                Packet::Disconnect(disconnect, props) => {
                    self.deliver().await?;
                    return Err(self.on_disconnect(disconnect, props).await);
                }
                Packet::Connect(..) => {
                    // A second CONNECT is a protocol violation [MQTT-3.1.0-2].
                    return Err(self
                        .protocol_end(Close::Protocol, DisconnectReasonCode::ProtocolError)
                        .await);
                }
                _ => {
                    return Err(self
                        .protocol_end(Close::Protocol, DisconnectReasonCode::ProtocolError)
                        .await);
                }
            }
        }
        self.deliver().await?;
        self.egress
            .release(&mut self.write, &mut self.to_router, &mut self.expect);
        Ok(())
    }

    fn on_publish(
        &mut self,
        header: Header,
        pkid: u16,
        mut publish: rumqttd::protocol::Publish,
        mut properties: Option<PublishProperties>,
        received_at_ns: i64,
    ) -> Result<(), Ending> {
        let (qos, _dup, retain) = frame::publish_flags(header.byte1);
        let meters = &self.shared.listeners[&self.listener];
        meters.qos[usize::from(qos.min(2))].inc();
        let v5 = self.version == Version::V5;
        // Topic aliases (MQTT 5) are resolved here: nothing behind sees one.
        if let Some(alias) = properties.as_mut().and_then(|p| p.topic_alias.take()) {
            if alias == 0 || alias > self.shared.limits.topic_alias_max {
                self.shared.meters.refused(Refused::Topic, 1);
                return Err(Ending::server(
                    Close::Protocol,
                    DisconnectReasonCode::TopicAliasInvalid,
                ));
            }
            if publish.topic.is_empty() {
                match self.aliases_in.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => {
                        self.shared.meters.refused(Refused::Topic, 1);
                        return Err(Ending::server(
                            Close::Protocol,
                            DisconnectReasonCode::ProtocolError,
                        ));
                    }
                }
            } else {
                self.aliases_in.insert(alias, publish.topic.clone());
            }
        }
        if publish.topic.is_empty() || !frame::valid_topic_name(&publish.topic) {
            self.shared.meters.refused(Refused::Topic, 1);
            let reason = if publish.topic.is_empty() {
                DisconnectReasonCode::ProtocolError
            } else {
                DisconnectReasonCode::TopicNameInvalid
            };
            return Err(Ending::server(Close::Protocol, reason));
        }
        if let Some(p) = &properties
            && !p.subscription_identifiers.is_empty()
        {
            // A client may not send one [MQTT-3.3.4-6].
            self.shared.meters.refused(Refused::Topic, 1);
            return Err(Ending::server(
                Close::Protocol,
                DisconnectReasonCode::ProtocolError,
            ));
        }
        if let Some(response) = properties.as_ref().and_then(|p| p.response_topic.as_ref())
            && (response.is_empty() || !frame::valid_topic_name(response.as_bytes()))
        {
            // A Response Topic is a topic name [MQTT-3.3.2-13/14].
            self.shared.meters.refused(Refused::Topic, 1);
            return Err(Ending::server(
                Close::Protocol,
                DisconnectReasonCode::ProtocolError,
            ));
        }
        // Whatever poses as sluice's marker goes.
        router::unmark(&mut properties);

        // Receive Maximum (MQTT 5): QoS 1 and 2 publishes not yet acknowledged.
        if v5 && qos > 0 {
            let in_flight = self.qos1_unacked + self.session.qos2_in.len() + usize::from(qos == 1);
            let in_flight = if qos == 2 { in_flight + 1 } else { in_flight };
            if in_flight > usize::from(self.shared.limits.receive_maximum) {
                self.shared.meters.refused(Refused::ReceiveMaximum, 1);
                return Err(Ending::server(
                    Close::ReceiveMaximum,
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                ));
            }
        }
        if qos == 2 && !self.session.qos2_in.insert(pkid) {
            // Sent again before its PUBREL: acknowledged again, not delivered twice
            // [MQTT-4.3.3-2].
            self.shared.meters.refused(Refused::Qos2Duplicate, 1);
            let rec = PubRec {
                pkid,
                reason: PubRecReason::Success,
            };
            self.slot(Packet::PubRec(rec, None).into(), 0, false);
            return Ok(());
        }

        let topic = std::str::from_utf8(&publish.topic).unwrap_or_default();
        let denied = !self.shared.auth.may_publish(&self.identity, topic);
        self.pending.push(Inbound {
            topic: publish.topic.clone(),
            payload: publish.payload.clone(),
            received_at_ns,
            qos,
            denied,
        });
        if denied {
            self.shared.meters.denied("publish");
        }
        // A copy for the router, when someone may want it (never of a refused one).
        if !denied && self.shared.router.visibility.wanted(topic, retain) {
            let origin = self.session.has_no_local().then_some(self.session.origin);
            self.shared
                .router
                .prepare(&mut publish, &mut properties, qos, origin);
            self.routed.push(Routed {
                publish,
                properties,
                qos,
                pkid,
            });
        }
        // A refused publish is acknowledged like any other (3.1.1 has no code for it:
        // the client would only send it again), with 0x87 in MQTT 5.
        let refused = denied && v5;
        if refused && qos == 2 {
            // No PUBREL follows a PUBREC that reports an error [MQTT-4.3.3].
            self.session.qos2_in.remove(&pkid);
        }
        let ack = match qos {
            1 if refused => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::NotAuthorized,
                },
                None,
            )
            .into(),
            1 => Reply::PubAck(pkid),
            2 => Packet::PubRec(
                PubRec {
                    pkid,
                    reason: if refused {
                        PubRecReason::NotAuthorized
                    } else {
                        PubRecReason::Success
                    },
                },
                None,
            )
            .into(),
            _ => Reply::Nothing,
        };
        let seq = self.slot(ack, 1, qos == 1);
        if qos == 1 {
            self.qos1_unacked += 1;
        }
        self.batch_slots.push(seq);
        Ok(())
    }

    /// Hands the messages read so far to the pipeline (waiting while it is full), and
    /// their copies to the router; their acknowledgements go once they are durable
    /// ([`on_durable`](Self::on_durable)), while the connection reads on.
    async fn deliver(&mut self) -> Result<(), Ending> {
        let mut durable = None;
        let mut n = 0;
        if !self.pending.is_empty() {
            let batch = std::mem::take(&mut self.pending);
            n = batch.len() as u64;
            let mut delivery = self.shared.pipeline.deliver(batch);
            // Taken at once, as long as there is room; otherwise what is owed to the
            // client already goes out before the wait.
            let delivered = match futures::poll!(&mut delivery) {
                std::task::Poll::Ready(delivered) => delivered.map_err(|e| self.not_taken(e)),
                std::task::Poll::Pending => {
                    self.flush().await.map_err(Ending::from)?;
                    let mut shutdown = self.shared.shutdown.clone();
                    let control = self.control.clone();
                    tokio::select! {
                        delivered = delivery => delivered.map_err(|e| self.not_taken(e)),
                        _ = control.kicked() => Err(Close::TakenOver),
                        _ = shutdown.wait_for(|stop| *stop) => Err(Close::Shutdown),
                    }
                }
            };
            match delivered {
                Ok(done) => durable = Some(done),
                Err(close) => {
                    // Not taken, so not acknowledged: the client sends them again.
                    return Err(self.refuse(close, n));
                }
            }
        }
        if !self.routed.is_empty() {
            let routed = std::mem::take(&mut self.routed);
            self.shared.meters.routed.inc_by(routed.len() as u64);
            if self.shared.router.route(routed).await.is_err() {
                return Err(Ending::server(
                    Close::Internal,
                    DisconnectReasonCode::UnspecifiedError,
                ));
            }
        }
        let slots = std::mem::take(&mut self.batch_slots);
        match durable {
            Some(durable) if !slots.is_empty() => {
                self.durable
                    .push_back(Box::pin(async move { (durable.await, slots, n) }));
                while self.durable.len() >= MAX_UNDURABLE {
                    if let Some(done) = self.durable.next().await {
                        self.on_durable(done)?;
                    }
                }
            }
            _ => {
                // Nothing to acknowledge waits for the log (QoS 0).
                self.shared.listeners[&self.listener].publishes.inc_by(n);
                for seq in slots {
                    self.fulfil(seq);
                }
            }
        }
        Ok(())
    }

    /// A delivery is durable: its acknowledgements can go. Not stored (a full disk):
    /// none of them goes, and the connection is closed (the client sends them again).
    fn on_durable(&mut self, (durable, slots, n): Delivered) -> Result<(), Ending> {
        match durable {
            Ok(()) => {
                self.shared.listeners[&self.listener].publishes.inc_by(n);
                for seq in slots {
                    self.fulfil(seq);
                }
                Ok(())
            }
            Err(e) => {
                let close = self.not_taken(e);
                Err(self.refuse(close, n))
            }
        }
    }

    /// Takes every delivery that is durable by now, without waiting.
    async fn take_durable(&mut self) -> Result<(), Ending> {
        while !self.durable.is_empty() {
            match futures::poll!(self.durable.next()) {
                std::task::Poll::Ready(Some(done)) => self.on_durable(done)?,
                _ => break,
            }
        }
        Ok(())
    }

    /// Waits until every delivery is durable (or the first that cannot be).
    async fn settle(&mut self) -> Result<(), Ending> {
        while let Some(done) = self.durable.next().await {
            self.on_durable(done)?;
        }
        Ok(())
    }

    /// Why the pipeline did not take (or store) messages, as a close; logged.
    fn not_taken(&self, e: NotTaken) -> Close {
        match e {
            NotTaken::Closed => Close::Internal,
            NotTaken::NotStored(why) => {
                tracing::warn!(client = %self.client_id, error = %why, "publishes not stored: connection closed without acknowledging them");
                Close::NotStored
            }
        }
    }

    /// `n` messages neither taken nor stored, closing the connection: counted by why,
    /// the connection's end.
    fn refuse(&self, close: Close, n: u64) -> Ending {
        let refused = match close {
            Close::NotStored => Refused::NotStored,
            _ => Refused::Closed,
        };
        self.shared.meters.refused(refused, n);
        let reason = match close {
            Close::TakenOver => DisconnectReasonCode::SessionTakenOver,
            Close::Shutdown => DisconnectReasonCode::ServerShuttingDown,
            // 0x89 Server busy: the client may come back later, when there is room on
            // the disk again.
            Close::NotStored => DisconnectReasonCode::ServerBusy,
            _ => DisconnectReasonCode::UnspecifiedError,
        };
        Ending::server(close, reason)
    }

    /// Ends the connection after a protocol error, first handing on what was read
    /// before the bad packet (it was well-formed and is acknowledged).
    async fn end_with_pending(&mut self, ending: Ending) -> Ending {
        if let Err(e) = self.deliver().await {
            return e;
        }
        if let Err(e) = self.settle().await {
            return e;
        }
        self.drain_slots();
        let _ = self.flush().await;
        ending
    }

    async fn protocol_end(&mut self, close: Close, reason: DisconnectReasonCode) -> Ending {
        self.end_with_pending(Ending::server(close, reason)).await
    }

    async fn on_subscribe(
        &mut self,
        subscribe: Subscribe,
        props: Option<SubscribeProperties>,
    ) -> Result<(), Ending> {
        let v5 = self.version == Version::V5;
        let client_sub_id = props.as_ref().and_then(|p| p.id);
        if client_sub_id == Some(0) || subscribe.filters.is_empty() || subscribe.pkid == 0 {
            // [MQTT-3.8.3-2]: at least one filter; a subscription identifier is not 0;
            // a packet identifier is not 0 [MQTT-2.3.1-1].
            return Err(self
                .protocol_end(Close::Protocol, DisconnectReasonCode::ProtocolError)
                .await);
        }
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut packets = Vec::new();
        let mut expects = Vec::new();
        let seq = self.slot_base + self.slots.len() as u64;
        for (index, filter) in subscribe.filters.iter().enumerate() {
            let path = filter.path.as_str();
            if !frame::valid_filter(path) {
                codes.push(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let shared_sub = frame::shared_filter(path).is_some();
            if shared_sub && filter.nolocal {
                // [MQTT-3.8.3-4]
                return Err(self
                    .protocol_end(Close::Protocol, DisconnectReasonCode::ProtocolError)
                    .await);
            }
            if self.shared.limits.deny_subscribe.iter().any(|d| d == path) {
                codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            if !self.shared.auth.may_subscribe(&self.identity, path) {
                self.shared.meters.denied("subscribe");
                codes.push(if v5 {
                    SubscribeReasonCode::NotAuthorized
                } else {
                    SubscribeReasonCode::Failure
                });
                continue;
            }
            let qos = filter.qos as u8;
            if path.starts_with('$') && !shared_sub {
                // No client may publish to a `$` topic, and sluice publishes none: the
                // subscription is granted and never gets a message.
                codes.push(granted(qos));
                continue;
            }
            if self.link.is_none() {
                match self.shared.router.connect(self.key.clone(), true).await {
                    Ok(link) => {
                        self.shared.meters.router_links.inc();
                        self.link = Some(link);
                    }
                    Err(e) => {
                        tracing::warn!(client_id = %self.client_id, error = %e, "the router refused a subscription link");
                        codes.push(if v5 {
                            SubscribeReasonCode::QuotaExceeded
                        } else {
                            SubscribeReasonCode::Failure
                        });
                        continue;
                    }
                }
            }
            let retain_handling = match filter.retain_forward_rule {
                RetainForwardRule::OnEverySubscribe => 0,
                RetainForwardRule::OnNewSubscribe => 1,
                RetainForwardRule::Never => 2,
            };
            let existing = self.session.subs.get(path).cloned();
            let internal_id = existing.as_ref().map_or_else(
                || {
                    let id = self.session.next_internal_id;
                    self.session.next_internal_id += 1;
                    id
                },
                |s| s.internal_id,
            );
            let visible = match &existing {
                Some(s) => s.visible,
                None => self.shared.router.visibility.add(path),
            };
            // rumqttd keeps an existing subscription as it was (QoS included) and sends
            // retained messages only for new ones: a replacement that changes the QoS or
            // asks for retained messages again [MQTT-3.8.4-3] is made anew.
            let renew = existing
                .as_ref()
                .is_some_and(|s| s.qos != qos || retain_handling == 0);
            if renew {
                packets.push(Packet::Unsubscribe(
                    Unsubscribe {
                        pkid: subscribe.pkid,
                        filters: vec![path.to_owned()],
                    },
                    None,
                ));
                expects.push(Expect::UnsubAck { slot: u64::MAX });
            }
            self.session.subs.insert(
                path.to_owned(),
                Sub {
                    internal_id,
                    qos,
                    no_local: filter.nolocal,
                    retain_as_published: filter.preserve_retain,
                    retain_handling,
                    client_id: client_sub_id,
                    visible,
                    last_offset: existing
                        .as_ref()
                        .and_then(|s| s.last_offset)
                        .filter(|_| !renew),
                    redelivery_until: existing.and_then(|s| s.redelivery_until).filter(|_| !renew),
                },
            );
            self.session.by_id.insert(internal_id, path.to_owned());
            self.shared.router.granted(qos);
            packets.push(router_subscribe(subscribe.pkid, path, qos, internal_id));
            expects.push(Expect::SubAck { slot: seq, index });
            codes.push(granted(qos));
        }
        let waiting = expects
            .iter()
            .filter(|e| matches!(e, Expect::SubAck { .. }))
            .count() as u16;
        let suback = SubAck {
            pkid: subscribe.pkid,
            return_codes: codes,
        };
        let at = self.slot(Packet::SubAck(suback, None).into(), waiting, false);
        debug_assert_eq!(at, seq);
        self.expect.extend(expects);
        self.to_router.extend(packets);
        Ok(())
    }

    async fn on_unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), Ending> {
        if unsubscribe.filters.is_empty() || unsubscribe.pkid == 0 {
            return Err(self
                .protocol_end(Close::Protocol, DisconnectReasonCode::ProtocolError)
                .await);
        }
        let seq = self.slot_base + self.slots.len() as u64;
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        let mut waiting = 0;
        for filter in &unsubscribe.filters {
            match self.session.subs.remove(filter) {
                Some(sub) => {
                    self.session.by_id.remove(&sub.internal_id);
                    if sub.visible {
                        self.shared.router.visibility.remove(filter);
                    }
                    self.to_router.push(Packet::Unsubscribe(
                        Unsubscribe {
                            pkid: unsubscribe.pkid,
                            filters: vec![filter.clone()],
                        },
                        None,
                    ));
                    self.expect.push_back(Expect::UnsubAck { slot: seq });
                    waiting += 1;
                    reasons.push(UnsubAckReason::Success);
                }
                // [MQTT-3.10.4-5]: an UNSUBACK even if nothing was deleted.
                None => reasons.push(UnsubAckReason::NoSubscriptionExisted),
            }
        }
        let unsuback = UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        };
        let at = self.slot(Packet::UnsubAck(unsuback, None).into(), waiting, false);
        debug_assert_eq!(at, seq);
        Ok(())
    }

    async fn on_disconnect(
        &mut self,
        disconnect: Disconnect,
        props: Option<DisconnectProperties>,
    ) -> Ending {
        if let Some(expiry) = props.as_ref().and_then(|p| p.session_expiry_interval) {
            if self.connect_expiry == 0 && expiry != 0 {
                // A session that ends at disconnect cannot be made to outlive it.
                return self
                    .protocol_end(Close::Protocol, DisconnectReasonCode::ProtocolError)
                    .await;
            }
            self.expiry = expiry.min(self.shared.limits.max_session_expiry);
        }
        self.drain_slots();
        let _ = self.flush().await;
        Ending {
            close: Close::Client,
            reason: None,
            // Only a normal disconnection discards the will [MQTT-3.14.4-3].
            will: disconnect.reason_code != DisconnectReasonCode::NormalDisconnection,
        }
    }

    /// Handles what the router sent on this connection's link.
    async fn on_router(
        &mut self,
        first: Result<Option<rumqttd::Notification>, ()>,
    ) -> Result<(), Ending> {
        let mut next = Some(first);
        while let Some(notification) = next.take() {
            match notification {
                Err(()) => {
                    tracing::warn!(client_id = %self.client_id, "the router closed this connection's link");
                    return Err(Ending::server(
                        Close::Internal,
                        DisconnectReasonCode::UnspecifiedError,
                    ));
                }
                Ok(None) => {}
                Ok(Some(rumqttd::Notification::Forward(forward))) => {
                    self.egress.forward(
                        forward,
                        &mut self.session,
                        &mut self.write,
                        &self.shared.meters,
                    );
                }
                Ok(Some(rumqttd::Notification::Unschedule)) => {
                    if let Some(link) = &self.link
                        && link.rx.wake().await.is_err()
                    {
                        return Err(Ending::server(
                            Close::Internal,
                            DisconnectReasonCode::UnspecifiedError,
                        ));
                    }
                }
                Ok(Some(rumqttd::Notification::Disconnect(..))) => {
                    return Err(Ending::server(
                        Close::Internal,
                        DisconnectReasonCode::UnspecifiedError,
                    ));
                }
                Ok(Some(other)) => {
                    if let Some(packet) = Option::<Packet>::from(other) {
                        self.on_router_ack(packet);
                    }
                }
            }
            // Whatever else is already there, without waiting.
            if let Some(link) = &mut self.link {
                match link.rx.recv_deadline(std::time::Instant::now()) {
                    Ok(n) => next = Some(Ok(n)),
                    Err(rumqttd::local::LinkError::RecvTimeout(_)) => {}
                    Err(_) => next = Some(Err(())),
                }
            }
        }
        self.egress
            .release(&mut self.write, &mut self.to_router, &mut self.expect);
        Ok(())
    }

    fn on_router_ack(&mut self, packet: Packet) {
        match (packet, self.expect.pop_front()) {
            (Packet::SubAck(suback, _), Some(Expect::SubAck { slot, index })) => {
                let code = suback
                    .return_codes
                    .first()
                    .copied()
                    .unwrap_or(SubscribeReasonCode::Failure);
                // The router grants what it is asked, or fails.
                let failed = matches!(
                    code,
                    SubscribeReasonCode::Failure | SubscribeReasonCode::Unspecified
                );
                if let Some(s) = self.slot_mut(slot)
                    && let Reply::Packet(packet) = &mut s.reply
                    && let Packet::SubAck(ack, _) = &mut **packet
                    && let Some(c) = ack.return_codes.get_mut(index)
                    && failed
                {
                    *c = code;
                }
                self.fulfil(slot);
            }
            (Packet::UnsubAck(..), Some(Expect::UnsubAck { slot })) => {
                if slot != u64::MAX {
                    self.fulfil(slot);
                }
            }
            (Packet::PubRel(rel, _), Some(Expect::SwallowPubRel)) => {
                self.egress.router_pubrel(rel.pkid, false);
            }
            (Packet::PubRel(rel, _), expected) => {
                // Expected, or the router resending the PUBREL of a QoS 2 message the
                // client received in its session's last connection [MQTT-4.4.0-1].
                if let Some(other) = expected.filter(|e| !matches!(e, Expect::PubRel)) {
                    self.expect.push_front(other);
                }
                self.egress.router_pubrel(rel.pkid, true);
                let _ = self.codec.write(Packet::PubRel(rel, None), &mut self.write);
            }
            (packet, expected) => {
                tracing::debug!(client_id = %self.client_id, ?packet, "unexpected answer from the router");
                if let Some(expected) = expected {
                    self.expect.push_front(expected);
                }
            }
        }
    }

    /// Appends an acknowledgement slot; returns its sequence number.
    fn slot(&mut self, reply: Reply, waiting: u16, qos1: bool) -> u64 {
        self.slots.push_back(Slot {
            reply,
            waiting,
            qos1,
        });
        let seq = self.slot_base + self.slots.len() as u64 - 1;
        self.drain_slots();
        seq
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let index = seq.checked_sub(self.slot_base)?;
        self.slots.get_mut(usize::try_from(index).ok()?)
    }

    /// One condition of slot `seq` is met.
    fn fulfil(&mut self, seq: u64) {
        if let Some(slot) = self.slot_mut(seq) {
            slot.waiting = slot.waiting.saturating_sub(1);
        }
        self.drain_slots();
    }

    /// Writes the acknowledgements that are ready, in order.
    fn drain_slots(&mut self) {
        while self.slots.front().is_some_and(|s| s.waiting == 0) {
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            self.slot_base += 1;
            if slot.qos1 {
                self.qos1_unacked = self.qos1_unacked.saturating_sub(1);
            }
            match slot.reply {
                Reply::Nothing => {}
                Reply::PubAck(pkid) => self.codec.write_puback(pkid, &mut self.write),
                Reply::Packet(packet) => {
                    let _ = self.codec.write(*packet, &mut self.write);
                }
            }
        }
    }

    /// Sends what is queued for the router now (a subscription change is in the
    /// router before any publish read after it is routed).
    async fn send_to_router_now(&mut self) -> Result<(), Ending> {
        self.flush_router().await.map_err(Ending::from)
    }

    async fn flush_router(&mut self) -> Result<(), Close> {
        if self.to_router.is_empty() {
            return Ok(());
        }
        let packets = std::mem::take(&mut self.to_router);
        let Some(link) = &mut self.link else {
            return Ok(());
        };
        self.shared
            .router
            .send(&mut link.tx, packets)
            .await
            .map_err(|_| Close::Internal)
    }

    /// Writes what is buffered for the client.
    async fn flush(&mut self) -> Result<(), Close> {
        if self.write.is_empty() {
            return Ok(());
        }
        let n = self.write.len() as u64;
        let control = self.control.clone();
        let write_timeout = self.shared.limits.write_timeout;
        tokio::select! {
            written = tokio::time::timeout(write_timeout, self.transport.write_all(&self.write)) => match written {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Close::Network),
                Err(_) => return Err(Close::WriteTimeout),
            },
            _ = control.kicked() => return Err(Close::TakenOver),
        }
        self.shared.listeners[&self.listener].bytes_out.inc_by(n);
        if self.write.capacity() > MAX_READ {
            self.write = BytesMut::new();
        } else {
            self.write.clear();
        }
        Ok(())
    }

    /// Closes the connection: DISCONNECT (MQTT 5), will, session, router link.
    async fn finish(mut self, ending: Ending) {
        if !self.pending.is_empty() {
            self.shared
                .meters
                .refused(Refused::Closed, self.pending.len() as u64);
            self.pending.clear();
        }
        if let (Version::V5, Some(reason)) = (self.version, ending.reason) {
            let disconnect = Disconnect {
                reason_code: reason,
            };
            let _ = self
                .codec
                .write(Packet::Disconnect(disconnect, None), &mut self.write);
        }
        let _ = self.flush().await;
        if ending.reason.is_some() {
            linger(&mut self.transport).await;
        } else {
            self.transport.shutdown().await;
        }
        let shared = self.shared.clone();
        shared.listeners[&self.listener].connected.dec();
        shared.meters.closed(ending.close);

        // No will at sluice's own shutdown: the client did nothing wrong, and its will
        // would only fill the pipeline with "went offline" messages at every restart.
        let mut will = if ending.will && ending.close != Close::Shutdown {
            self.will.take()
        } else {
            None
        };
        let persistent = self.expiry > 0;
        let expiry = Duration::from_secs(u64::from(self.expiry));
        if let Some(w) = &will
            && (!persistent || w.delay.is_zero())
        {
            publish_will(&shared, w).await;
            will = None;
        }
        if let Some(link) = self.link.take() {
            shared.meters.router_links.dec();
            shared.router.release(link);
        }
        let session = std::mem::take(&mut self.session);
        if persistent {
            shared.meters.sessions_stored.inc();
            shared.sessions.release(
                &self.client_id,
                self.conn_id,
                Some((session, expiry, will)),
                on_timer(&shared),
            );
        } else {
            if session.router_session {
                shared.router.wipe(self.key.clone()).await;
            }
            forget_visibility(&shared, &session);
            shared
                .sessions
                .release(&self.client_id, self.conn_id, None, on_timer(&shared));
        }
        // `_done` drops last: a connection taking this client id over goes on now.
    }
}

/// The next notification of the router on `link`, or never (no link).
async fn next_notification(link: &mut Option<Link>) -> Result<Option<rumqttd::Notification>, ()> {
    match link {
        Some(link) => link.rx.next().await.map_err(drop),
        None => std::future::pending().await,
    }
}

/// A SUBSCRIBE for the router: one filter, with sluice's internal subscription
/// identifier (rumqttd applies the subscription options itself only in part: sluice does).
fn router_subscribe(pkid: u16, filter: &str, qos: u8, internal_id: usize) -> Packet {
    Packet::Subscribe(
        Subscribe {
            pkid,
            filters: vec![Filter {
                path: filter.to_owned(),
                qos: rumqttd::protocol::qos(qos).unwrap_or(rumqttd::protocol::QoS::AtMostOnce),
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: RetainForwardRule::OnEverySubscribe,
            }],
        },
        Some(SubscribeProperties {
            id: Some(internal_id),
            user_properties: Vec::new(),
        }),
    )
}

fn granted(qos: u8) -> SubscribeReasonCode {
    match qos {
        0 => SubscribeReasonCode::QoS0,
        1 => SubscribeReasonCode::QoS1,
        _ => SubscribeReasonCode::QoS2,
    }
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// The subscriptions of a session that ends stop counting toward direct-topic
/// visibility.
fn forget_visibility(shared: &Shared, session: &SessionState) {
    for (filter, sub) in &session.subs {
        if sub.visible {
            shared.router.visibility.remove(filter);
        }
    }
}

/// A stored session ends (expiry or a clean start): its pending will is published, the
/// router forgets it.
async fn end_session(shared: &Arc<Shared>, client_id: &str, stored: Stored) {
    if let Some(will) = &stored.will {
        publish_will(shared, will).await;
    }
    if stored.state.router_session {
        shared.router.wipe(router::session_key(client_id)).await;
    }
    forget_visibility(shared, &stored.state);
}

/// What the session timers do when they fire.
fn on_timer(shared: &Arc<Shared>) -> impl Fn(Arc<str>, Expired) + Send + Sync + Clone + 'static {
    let shared = Arc::downgrade(shared);
    move |client_id, expired| {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            match expired {
                Expired::Will(will) => publish_will(&shared, &will).await,
                Expired::Session(stored) => {
                    shared.meters.sessions_stored.dec();
                    end_session(&shared, &client_id, stored).await;
                }
            }
        });
    }
}

/// Publishes a will on its client's behalf: to the pipeline like any message, and to
/// the router for its subscribers.
pub(crate) async fn publish_will(shared: &Shared, will: &Will) {
    let LastWill {
        topic,
        message,
        qos,
        retain,
    } = &will.will;
    let qos = *qos as u8;
    let delivered = shared
        .pipeline
        .deliver(vec![Inbound {
            topic: topic.clone(),
            payload: message.clone(),
            received_at_ns: now_ns(),
            qos,
            // Checked when the client connected.
            denied: false,
        }])
        .await;
    if delivered.is_err() {
        tracing::warn!("a will could not be handed to the pipeline: it is stopping");
        return;
    }
    shared.meters.will();
    let topic_str = std::str::from_utf8(topic).unwrap_or_default();
    if !shared.router.visibility.wanted(topic_str, *retain) {
        return;
    }
    let properties = will.properties.as_ref().map(will_publish_properties);
    let routed = shared
        .router
        .built(topic, message, qos, *retain, properties);
    shared.meters.routed.inc();
    let _ = shared.router.route(vec![routed]).await;
}

fn will_publish_properties(p: &LastWillProperties) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_writes_at_once_until_it_is_busy() {
        let mut pace = WritePace::new();
        let start = pace.window_start;
        // 150 writes in the first window: below the line, nothing waits.
        for i in 0..150u32 {
            let now = start + Duration::from_micros(u64::from(i) * 500);
            assert_eq!(pace.defer(now), None);
            pace.wrote(now);
        }
        // The next window starts quiet, then 250 writes: still at once (the rate is
        // judged per window, when it ends).
        let mut now = start + BUSY_WINDOW;
        for _ in 0..250 {
            assert_eq!(pace.defer(now), None);
            pace.wrote(now);
            now += Duration::from_micros(300);
        }
        // Busy from the window after: a write 300 µs after the last waits until a
        // millisecond after it; one a millisecond after goes at once.
        let now = start + 2 * BUSY_WINDOW + Duration::from_millis(1);
        pace.wrote(now);
        let soon = now + Duration::from_micros(300);
        assert_eq!(pace.defer(soon), Some(now + BUSY_WRITE_INTERVAL));
        assert!(pace.deferred);
        assert_eq!(pace.defer(now + BUSY_WRITE_INTERVAL), None);
        pace.wrote(now + BUSY_WRITE_INTERVAL);
        // A quiet window ends the busy spell.
        let later = now + 3 * BUSY_WINDOW;
        assert_eq!(pace.defer(later), None);
        pace.wrote(later);
        assert_eq!(pace.defer(later + Duration::from_micros(10)), None);
    }
}
