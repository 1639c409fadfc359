//! Messages from the router to one client: what MQTT requires of them on the way out,
//! and the acknowledgements the router is owed back.
//!
//! rumqttd's router hands over one `Forward` per matching subscription, at the
//! subscription's QoS, with RETAIN cleared on live messages and sluice's internal
//! subscription identifier attached. Here:
//! - **One copy per message** for overlapping subscriptions, from the subscription with
//!   the highest QoS, carrying every matching subscription identifier the client gave
//!   [MQTT-3.3.4-4] (shared subscriptions and retained messages keep their own copy);
//! - **No Local** [MQTT-3.8.3-3], **Retain Handling 2** [MQTT-3.3.1-11] and **Retain As
//!   Published** [MQTT-3.3.1-12/13], from the subscription's options and the marker;
//! - **QoS = min(published, granted)** [MQTT-3.8.4-8]: a message published at QoS 0 goes
//!   out at QoS 0 (a QoS 1 message to a QoS 2 subscription goes out at QoS 2);
//! - **Maximum Packet Size** of the client: larger packets are not sent, as if they had
//!   been [MQTT-3.1.2-25]; **topic aliases** up to the client's maximum
//!   [MQTT-3.1.2-26]; **Receive Maximum**: at most that many QoS 1/2 messages
//!   unacknowledged [MQTT-3.3.4-9], the rest wait in order (acknowledgements and other
//!   packets never do);
//! - the router requires its acknowledgements in the order it sent the messages, so
//!   PUBACK/PUBREC/PUBCOMP go back in that order, sluice's own (for messages it did not
//!   send) among the client's.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};
use rumqttd::Forward;
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PublishProperties,
};

use crate::codec::{Codec, Version};
use crate::connection::Expect;
use crate::frame;
use crate::meters::{Dropped, MqttMeters};
use crate::router;
use crate::session::SessionState;

/// An acknowledgement the router is owed, in its order.
struct RouterAck {
    pkid: u16,
    qos: u8,
    /// The client's answer (or sluice's, for a message not sent); `None` while awaited.
    done: Option<PubRecReason>,
    /// sluice answers the PUBREL that will follow (the client never got the message).
    own: bool,
}

/// An encoded PUBLISH waiting for the client's receive quota.
struct Held {
    bytes: Bytes,
    /// QoS 0 messages wait too when something is held before them (a topic alias
    /// they use may be set by one that waits), but take no quota.
    takes_quota: bool,
}

pub(crate) struct Egress {
    codec: Codec,
    receive_max: u16,
    max_packet: usize,
    alias_max: u16,
    aliases: HashMap<Bytes, u16>,
    in_flight: u16,
    held: VecDeque<Held>,
    /// PUBACK/PUBREC owed to the router.
    acks: VecDeque<RouterAck>,
    /// PUBCOMP owed to the router.
    rels: VecDeque<RouterAck>,
}

impl Egress {
    pub(crate) fn new(codec: Codec, receive_max: u16, max_packet: usize, alias_max: u16) -> Egress {
        Egress {
            codec,
            receive_max: receive_max.max(1),
            max_packet,
            alias_max: if codec.version == Version::V5 {
                alias_max
            } else {
                0
            },
            aliases: HashMap::new(),
            in_flight: 0,
            held: VecDeque::new(),
            acks: VecDeque::new(),
            rels: VecDeque::new(),
        }
    }

    /// One message from the router for this client.
    pub(crate) fn forward(
        &mut self,
        forward: Forward,
        session: &mut SessionState,
        write: &mut BytesMut,
        meters: &MqttMeters,
    ) {
        let Forward {
            cursor,
            mut publish,
            mut properties,
            ..
        } = forward;
        let marker = router::unmark(&mut properties);
        if marker.empty {
            publish.payload = Bytes::new();
        }
        let ids = properties
            .as_mut()
            .map(|p| std::mem::take(&mut p.subscription_identifiers))
            .unwrap_or_default();
        let topic = std::str::from_utf8(&publish.topic)
            .unwrap_or_default()
            .to_owned();
        // The subscription the router sent it for. rumqttd forgets the identifiers of a
        // persistent session's subscriptions when it resumes (sluice gives them back
        // right away, but what the router sends before that has none): then the best
        // of the client's subscriptions that match stands for it.
        let filter = ids
            .first()
            .and_then(|id| session.by_id.get(id))
            .cloned()
            .or_else(|| {
                session
                    .subs
                    .iter()
                    .filter(|(f, _)| {
                        frame::shared_filter(f).is_none() && frame::topic_matches(&topic, f)
                    })
                    .max_by_key(|(_, s)| (s.qos, std::cmp::Reverse(s.internal_id)))
                    .map(|(f, _)| f.clone())
            });
        let retained = cursor.is_none();

        // The router's log offsets rise by one per message of a filter: a jump is a
        // message it dropped (or that expired) before this subscription got it.
        let mut redelivered = false;
        if let (Some(sub), Some((_, offset))) = (
            filter.as_ref().and_then(|f| session.subs.get_mut(f)),
            cursor,
        ) {
            match sub.redelivery_until {
                Some(until) if offset <= until => redelivered = true,
                Some(_) => sub.redelivery_until = None,
                None => {}
            }
            if let Some(last) = sub.last_offset
                && offset > last + 1
            {
                meters.skipped.inc_by(offset - last - 1);
            }
            sub.last_offset = Some(sub.last_offset.map_or(offset, |last| last.max(offset)));
        }

        let sub = filter.as_ref().and_then(|f| session.subs.get(f));
        let own = marker.origin.is_some() && marker.origin == Some(session.origin);
        let mut drop_reason = None;
        let mut client_ids = Vec::new();
        if let Some(sub) = sub {
            let shared = filter.as_deref().and_then(frame::shared_filter).is_some();
            if sub.no_local && own {
                drop_reason = Some(Dropped::NoLocal);
            } else if retained && sub.retain_handling == 2 {
                drop_reason = Some(Dropped::RetainHandling);
            } else if retained || shared {
                client_ids.extend(sub.client_id);
            } else {
                // Every non-shared subscription of this client that matches gets the
                // same message from the router; the one with the highest QoS sends it.
                let matching: Vec<_> = session
                    .subs
                    .iter()
                    .filter(|(f, s)| {
                        frame::shared_filter(f).is_none()
                            && frame::topic_matches(&topic, f)
                            && !(s.no_local && own)
                    })
                    .map(|(_, s)| s)
                    .collect();
                let best = matching
                    .iter()
                    .max_by_key(|s| (s.qos, std::cmp::Reverse(s.internal_id)))
                    .map(|s| s.internal_id);
                if best.is_some_and(|b| b != sub.internal_id) {
                    drop_reason = Some(Dropped::Overlap);
                } else {
                    client_ids.extend(matching.iter().filter_map(|s| s.client_id));
                    client_ids.sort_unstable();
                    client_ids.dedup();
                }
            }
            if !retained {
                // The router clears RETAIN on live messages; Retain As Published keeps
                // the publisher's.
                publish.retain = sub.retain_as_published && marker.retain;
            }
        } else if !retained {
            publish.retain = false;
        }
        if !client_ids.is_empty() {
            properties
                .get_or_insert_with(PublishProperties::default)
                .subscription_identifiers = client_ids;
        }

        let original_topic = publish.topic.clone();
        let payload = publish.payload.clone();
        let retain = publish.retain;
        let alias = self.alias_for(&publish.topic);
        if let Some((alias, new)) = alias {
            properties
                .get_or_insert_with(PublishProperties::default)
                .topic_alias = Some(alias);
            if !new {
                publish.topic = Bytes::new();
            }
        }
        let start = write.len();
        if self
            .codec
            .write(
                rumqttd::protocol::Packet::Publish(publish, properties.clone()),
                write,
            )
            .is_err()
        {
            return;
        }
        // What the router chose (rumqttd keeps these fields private): read off the wire.
        let Ok(header) = frame::header(&write[start..], usize::MAX) else {
            write.truncate(start);
            return;
        };
        let (router_qos, ..) = frame::publish_flags(header.byte1);
        let pkid = frame::publish_pkid(&header, &write[start..]);

        if drop_reason.is_none() && write.len() - start > self.max_packet {
            drop_reason = Some(Dropped::TooLarge);
        }
        if let Some(reason) = drop_reason {
            write.truncate(start);
            meters.dropped(reason);
            self.answer_router(router_qos, pkid);
            return;
        }
        // QoS = min(published, granted): the router sent the granted one.
        let qos = marker
            .qos
            .map_or(router_qos, |published| published.min(router_qos));
        if qos < router_qos {
            write.truncate(start);
            if qos == 0 {
                // Nothing for the client to acknowledge: sluice answers the router.
                self.answer_router(router_qos, pkid);
            }
            // A QoS 1 copy of the router's QoS 2 message keeps its packet id: the
            // client's PUBACK stands for the PUBREC the router waits for, so the id is
            // not the router's to reuse before the client is done with it.
            let pkid = if qos == 0 { 0 } else { pkid };
            let mut downgraded =
                router::build_publish(&original_topic, &payload, qos, retain, pkid);
            if let Some((_, false)) = alias {
                downgraded.topic = Bytes::new();
            }
            let encoded = self.codec.write(
                rumqttd::protocol::Packet::Publish(downgraded, properties),
                write,
            );
            if encoded.is_err() || write.len() - start > self.max_packet {
                write.truncate(start);
                if qos > 0 {
                    self.answer_router(router_qos, pkid);
                }
                if encoded.is_ok() {
                    meters.dropped(Dropped::TooLarge);
                }
                return;
            }
        }
        // DUP is the server's own [MQTT-3.3.1-3]: the publisher's does not pass; a
        // message sent again after a session resumed has it [MQTT-3.3.1-1].
        if redelivered && qos > 0 {
            write[start] |= 0x08;
        } else {
            write[start] &= !0x08;
        }
        if let Some((alias, true)) = alias {
            self.aliases.insert(original_topic, alias);
        }
        meters.forwarded.inc();
        if qos > 0 {
            self.acks.push_back(RouterAck {
                pkid,
                qos: router_qos,
                done: None,
                own: false,
            });
        }
        if !self.held.is_empty() || (qos > 0 && self.in_flight >= self.receive_max) {
            self.held.push_back(Held {
                bytes: write.split_off(start).freeze(),
                takes_quota: qos > 0,
            });
        } else if qos > 0 {
            self.in_flight += 1;
        }
    }

    /// The alias for `topic`, and whether it is new (the topic goes with it once).
    fn alias_for(&self, topic: &Bytes) -> Option<(u16, bool)> {
        if self.alias_max == 0 || topic.is_empty() {
            return None;
        }
        if let Some(&alias) = self.aliases.get(topic) {
            return Some((alias, false));
        }
        let next = self.aliases.len() as u16 + 1;
        (next <= self.alias_max).then_some((next, true))
    }

    /// A message the client will not get: sluice acknowledges it to the router itself.
    fn answer_router(&mut self, qos: u8, pkid: u16) {
        if qos > 0 {
            self.acks.push_back(RouterAck {
                pkid,
                qos,
                done: Some(PubRecReason::Success),
                own: true,
            });
        }
    }

    pub(crate) fn client_puback(&mut self, pkid: u16) {
        if let Some(ack) = self
            .acks
            .iter_mut()
            .find(|a| a.pkid == pkid && a.done.is_none() && !a.own)
        {
            ack.done = Some(PubRecReason::Success);
            // A QoS 1 copy of a QoS 2 message: sluice completes the rest with the router.
            ack.own = ack.qos == 2;
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    pub(crate) fn client_pubrec(&mut self, pkid: u16, reason: PubRecReason) {
        if let Some(ack) = self
            .acks
            .iter_mut()
            .find(|a| a.pkid == pkid && a.done.is_none() && !a.own)
        {
            // A refusal (0x80 and up) ends the exchange and frees the quota
            // [MQTT-4.3.3-9]; otherwise it lasts until PUBCOMP.
            if !matches!(
                reason,
                PubRecReason::Success | PubRecReason::NoMatchingSubscribers
            ) {
                ack.own = true;
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            ack.done = Some(reason);
        }
    }

    pub(crate) fn client_pubcomp(&mut self, pkid: u16) {
        if let Some(rel) = self
            .rels
            .iter_mut()
            .find(|r| r.pkid == pkid && r.done.is_none())
        {
            rel.done = Some(PubRecReason::Success);
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// The router sent PUBREL `pkid`: it went to the client (`to_client`), or sluice
    /// completes it.
    pub(crate) fn router_pubrel(&mut self, pkid: u16, to_client: bool) {
        self.rels.push_back(RouterAck {
            pkid,
            qos: 2,
            done: (!to_client).then_some(PubRecReason::Success),
            own: !to_client,
        });
    }

    /// Sends what is due: acknowledgements to the router in its order, held messages
    /// the quota now allows.
    pub(crate) fn release(
        &mut self,
        write: &mut BytesMut,
        to_router: &mut Vec<Packet>,
        expect: &mut VecDeque<Expect>,
    ) {
        while self.acks.front().is_some_and(|a| a.done.is_some()) {
            let Some(ack) = self.acks.pop_front() else {
                break;
            };
            let reason = ack.done.unwrap_or(PubRecReason::Success);
            if ack.qos == 1 {
                to_router.push(Packet::PubAck(
                    PubAck {
                        pkid: ack.pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ));
            } else {
                to_router.push(Packet::PubRec(
                    PubRec {
                        pkid: ack.pkid,
                        reason,
                    },
                    None,
                ));
                expect.push_back(if ack.own {
                    Expect::SwallowPubRel
                } else {
                    Expect::PubRel
                });
            }
        }
        while self.rels.front().is_some_and(|r| r.done.is_some()) {
            let Some(rel) = self.rels.pop_front() else {
                break;
            };
            to_router.push(Packet::PubComp(
                PubComp {
                    pkid: rel.pkid,
                    reason: PubCompReason::Success,
                },
                None,
            ));
        }
        while let Some(front) = self.held.front() {
            if front.takes_quota {
                if self.in_flight >= self.receive_max {
                    break;
                }
                self.in_flight += 1;
            }
            if let Some(held) = self.held.pop_front() {
                write.extend_from_slice(&held.bytes);
            }
        }
    }
}
