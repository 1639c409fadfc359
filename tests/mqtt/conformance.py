#!/usr/bin/env python3
"""MQTT 3.1.1 and MQTT 5.0 conformance checks for sluice's broker.

Each check exercises one normative statement of the OASIS specifications (MQTT
Version 3.1.1, 29 October 2014; MQTT Version 5.0, 7 March 2019) against a running
broker, with the real third-party client paho-mqtt 2.x where it can express what
the check needs and with raw sockets where it cannot (malformed packets, reserved
flags, exact packet identifiers, exact timing, properties paho hides).

Labels: ``[MQTT-x.y.z-n]`` is a statement of MQTT 3.1.1, ``[v5 MQTT-x.y.z-n]`` one
of MQTT 5.0 (the same identifier means different things in the two versions);
``[v5 §3.2.2.3]`` names a section of MQTT 5.0 and ``[§4.7.1.2]`` a section of both
versions where the statement has no identifier. A label in a description names a
further statement the same check covers.

Usage:
    python3 tests/mqtt/conformance.py --host 127.0.0.1 --port 1883 [--only SUBSTRING]

Prints ``PASS [label] description`` or ``FAIL [label] description: what happened``
for every check and a summary line; exits 0 only if every check that ran passed.
Every check uses its own client ids and topics (prefixed with a per-run random
token) and removes the retained messages and persistent sessions it creates.
"""

import argparse
import queue
import random
import socket
import struct
import sys
import threading
import time
import traceback

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

HOST = "127.0.0.1"
PORT = 1883
RUN = "%05x" % random.randrange(16**5)
VERBOSE = False

# ----------------------------------------------------------------------------------
# Wire format
# ----------------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP = 8, 9, 10, 11, 12, 13
DISCONNECT, AUTH = 14, 15
NAMES = {0: "RESERVED0", 1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK",
         5: "PUBREC", 6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK",
         10: "UNSUBSCRIBE", 11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP",
         14: "DISCONNECT", 15: "AUTH"}

# MQTT 5 property identifiers
P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_CONTENT_TYPE = 0x01, 0x02, 0x03
P_RESPONSE_TOPIC, P_CORRELATION, P_SUB_ID, P_SESSION_EXPIRY = 0x08, 0x09, 0x0B, 0x11
P_ASSIGNED_CID, P_SERVER_KEEP_ALIVE, P_AUTH_METHOD, P_AUTH_DATA = 0x12, 0x13, 0x15, 0x16
P_WILL_DELAY, P_REASON_STRING, P_RECEIVE_MAX, P_TOPIC_ALIAS_MAX = 0x18, 0x1F, 0x21, 0x22
P_TOPIC_ALIAS, P_MAX_QOS, P_RETAIN_AVAILABLE, P_USER = 0x23, 0x24, 0x25, 0x26
P_MAX_PACKET = 0x27

# B: byte, H: two byte integer, I: four byte integer, V: variable byte integer,
# S: UTF-8 string, D: binary data, P: UTF-8 string pair
PROP_TYPES = {0x01: "B", 0x02: "I", 0x03: "S", 0x08: "S", 0x09: "D", 0x0B: "V",
              0x11: "I", 0x12: "S", 0x13: "H", 0x15: "S", 0x16: "D", 0x17: "B",
              0x18: "I", 0x19: "B", 0x1A: "S", 0x1C: "S", 0x1F: "S", 0x21: "H",
              0x22: "H", 0x23: "H", 0x24: "B", 0x25: "B", 0x26: "P", 0x27: "I",
              0x28: "B", 0x29: "B", 0x2A: "B"}
MULTI_PROPS = (P_SUB_ID, P_USER)


def vbi(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def utf8(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return u16(len(b)) + b


def binary(b):
    return u16(len(b)) + bytes(b)


def enc_props(plist):
    body = b""
    for pid, val in plist or []:
        t = PROP_TYPES[pid]
        body += vbi(pid)
        if t == "B":
            body += bytes([val])
        elif t == "H":
            body += u16(val)
        elif t == "I":
            body += u32(val)
        elif t == "V":
            body += vbi(val)
        elif t == "S":
            body += utf8(val)
        elif t == "D":
            body += binary(val)
        elif t == "P":
            body += utf8(val[0]) + utf8(val[1])
    return vbi(len(body)) + body


def read_vbi(b, i):
    mult, val = 1, 0
    for _ in range(4):
        if i >= len(b):
            raise IndexError("truncated variable byte integer")
        d = b[i]
        i += 1
        val += (d & 127) * mult
        mult *= 128
        if not d & 128:
            return val, i
    raise ValueError("variable byte integer longer than 4 bytes")


def dec_props(b, i):
    n, i = read_vbi(b, i)
    end = i + n
    out = {}
    while i < end:
        pid, i = read_vbi(b, i)
        t = PROP_TYPES.get(pid)
        if t is None:
            raise ValueError("unknown property 0x%02x" % pid)
        if t == "B":
            v = b[i]
            i += 1
        elif t == "H":
            v = struct.unpack_from(">H", b, i)[0]
            i += 2
        elif t == "I":
            v = struct.unpack_from(">I", b, i)[0]
            i += 4
        elif t == "V":
            v, i = read_vbi(b, i)
        elif t in "SD":
            ln = struct.unpack_from(">H", b, i)[0]
            v = bytes(b[i + 2:i + 2 + ln])
            i += 2 + ln
            if t == "S":
                v = v.decode("utf-8", "replace")
        else:
            kl = struct.unpack_from(">H", b, i)[0]
            k = bytes(b[i + 2:i + 2 + kl]).decode("utf-8", "replace")
            i += 2 + kl
            vl = struct.unpack_from(">H", b, i)[0]
            v = (k, bytes(b[i + 2:i + 2 + vl]).decode("utf-8", "replace"))
            i += 2 + vl
        if pid in MULTI_PROPS:
            out.setdefault(pid, []).append(v)
        else:
            out[pid] = v
    return out, end


def packet(first, body=b""):
    return bytes([first]) + vbi(len(body)) + body


def connect_pkt(v, cid, clean=True, keepalive=0, will=None, user=None, password=None,
                props=None, raw_props=None, flags_or=0, level=None, name="MQTT"):
    """CONNECT; will = dict(topic, payload, qos=0, retain=False, props=[...])."""
    flags = 0x02 if clean else 0
    if will is not None:
        flags |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
    if user is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    flags |= flags_or
    vh = utf8(name) + bytes([level if level is not None else v, flags]) + u16(keepalive)
    if v == 5:
        vh += raw_props if raw_props is not None else enc_props(props)
    pl = utf8(cid)
    if will is not None:
        if v == 5:
            pl += enc_props(will.get("props"))
        pl += utf8(will["topic"]) + binary(will.get("payload", b""))
    if user is not None:
        pl += utf8(user)
    if password is not None:
        pl += binary(password)
    return packet(0x10, vh + pl)


def publish_pkt(v, topic, payload=b"", qos=0, pid=None, retain=False, dup=False, props=None):
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = utf8(topic)
    if qos:
        body += u16(pid if pid is not None else 1)
    if v == 5:
        body += enc_props(props)
    return packet(first, body + bytes(payload))


def subscribe_pkt(v, pid, filters, props=None, first=0x82):
    """filters: [(filter, options byte)]"""
    body = u16(pid)
    if v == 5:
        body += enc_props(props)
    for f, opts in filters:
        body += utf8(f) + bytes([opts])
    return packet(first, body)


def unsubscribe_pkt(v, pid, filters, first=0xA2):
    body = u16(pid)
    if v == 5:
        body += enc_props(None)
    for f in filters:
        body += utf8(f)
    return packet(first, body)


def ack_pkt(ptype, pid):
    return packet((ptype << 4) | (0x02 if ptype == PUBREL else 0), u16(pid))


def disconnect_pkt(v, reason=0, props=None):
    if v == 5 and (reason or props):
        return packet(0xE0, bytes([reason]) + enc_props(props))
    return packet(0xE0)


PINGREQ_PKT = b"\xc0\x00"


class Pkt:
    """A packet received from the server, decoded for the connection's version."""

    def __init__(self, first, body, v):
        self.type = first >> 4
        self.flags = first & 0x0F
        self.body = body
        self.v = v
        self.size = 1 + len(vbi(len(body))) + len(body)
        self.props = {}
        self.pid = None
        self.reason = 0
        b = body
        t = self.type
        if t == CONNACK:
            self.sp = b[0] & 1 if b else None
            self.ack_flags = b[0] if b else None
            self.rc = b[1] if len(b) > 1 else None
            if len(b) > 2:
                self.props, _ = dec_props(b, 2)
        elif t == PUBLISH:
            self.qos = (self.flags >> 1) & 3
            self.dup = (self.flags >> 3) & 1
            self.retain = self.flags & 1
            ln = struct.unpack_from(">H", b, 0)[0]
            self.topic = bytes(b[2:2 + ln]).decode("utf-8", "replace")
            i = 2 + ln
            if self.qos:
                self.pid = struct.unpack_from(">H", b, i)[0]
                i += 2
            if v == 5:
                self.props, i = dec_props(b, i)
            self.payload = bytes(b[i:])
        elif t in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            self.pid = struct.unpack_from(">H", b, 0)[0]
            self.reason = b[2] if len(b) > 2 else 0
        elif t in (SUBACK, UNSUBACK):
            self.pid = struct.unpack_from(">H", b, 0)[0]
            i = 2
            if v == 5:
                self.props, i = dec_props(b, i)
            self.codes = list(b[i:])
        elif t == DISCONNECT:
            self.reason = b[0] if b else 0
            if len(b) > 1:
                self.props, _ = dec_props(b, 1)

    def __repr__(self):
        n = NAMES.get(self.type, str(self.type))
        if self.type == CONNACK:
            return "CONNACK(rc=0x%02x, sp=%s)" % (self.rc or 0, self.sp)
        if self.type == PUBLISH:
            return "PUBLISH(topic=%r, qos=%d, pid=%s, retain=%d, dup=%d, %dB)" % (
                self.topic, self.qos, self.pid, self.retain, self.dup, len(self.payload))
        if self.type in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            return "%s(pid=%d, reason=0x%02x)" % (n, self.pid, self.reason)
        if self.type in (SUBACK, UNSUBACK):
            return "%s(pid=%d, codes=%s)" % (n, self.pid, ["0x%02x" % x for x in self.codes])
        if self.type == DISCONNECT:
            return "DISCONNECT(0x%02x)" % self.reason
        return n


class Fail(Exception):
    pass


class Closed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise Fail(msg)


class Raw:
    """A raw MQTT connection: exact bytes out, decoded packets in."""

    def __init__(self, ctx, v=4):
        self.v = v
        self.buf = bytearray()
        self.eof = False
        self.sock = socket.create_connection((HOST, PORT), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx.closers.append(self.close)

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.eof = True
            return False

    def _take(self):
        if len(self.buf) < 2:
            return None
        try:
            n, i = read_vbi(self.buf, 1)
        except IndexError:
            return None
        except ValueError:
            raise Fail("server sent a malformed Remaining Length")
        if len(self.buf) < i + n:
            return None
        first = self.buf[0]
        body = bytes(self.buf[i:i + n])
        del self.buf[:i + n]
        p = Pkt(first, body, self.v)
        if VERBOSE:
            print("      <- %r" % p)
        return p

    def recv(self, timeout=2.0):
        """Next packet, None on timeout; raises Closed once the server has closed."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._take()
            if p is not None:
                return p
            if self.eof:
                raise Closed()
            rem = deadline - time.monotonic()
            if rem <= 0:
                return None
            self.sock.settimeout(rem)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            except OSError:
                self.eof = True
                continue
            if not data:
                self.eof = True
            else:
                self.buf += data

    def expect(self, ptype, timeout=3.0):
        try:
            p = self.recv(timeout)
        except Closed:
            raise Fail("connection closed while waiting for %s" % NAMES[ptype])
        if p is None:
            raise Fail("no %s within %.1fs" % (NAMES[ptype], timeout))
        if p.type != ptype:
            raise Fail("expected %s, got %r" % (NAMES[ptype], p))
        return p

    def until_closed(self, timeout=3.0):
        """(closed, packets received meanwhile)."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                p = self.recv(max(0.0, deadline - time.monotonic()))
            except Closed:
                return True, got
            if p is None:
                return False, got
            got.append(p)

    def ping(self, timeout=2.0):
        """True if a PINGREQ is answered by a PINGRESP (other packets are kept aside)."""
        if not self.send(PINGREQ_PKT):
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                p = self.recv(max(0.0, deadline - time.monotonic()))
            except Closed:
                return False
            if p is None:
                return False
            if p.type == PINGRESP:
                return True

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def expect_closed(r, timeout=3.0, forbid=(), disconnect=None, what="connection"):
    """The server must close r within timeout, without sending a forbidden packet type;
    with disconnect=code, a DISCONNECT with that reason code must come first."""
    closed, got = r.until_closed(timeout)
    bad = [p for p in got if p.type in forbid]
    if bad:
        raise Fail("server answered with %r%s" % (bad[0], "" if closed else " and kept the %s open" % what))
    if not closed:
        raise Fail("%s still open after %.1fs (received %s)" % (what, timeout, got or "nothing"))
    if disconnect is not None:
        ds = [p for p in got if p.type == DISCONNECT]
        if not ds:
            raise Fail("closed without a DISCONNECT 0x%02x (received %s)" % (disconnect, got or "nothing"))
        if ds[0].reason != disconnect:
            raise Fail("DISCONNECT reason 0x%02x instead of 0x%02x" % (ds[0].reason, disconnect))
    return got


def expect_refused(r, code, timeout=3.0, codes=None):
    """CONNECT refused: connection closed; a CONNACK, if sent, has session present 0 and
    the given reason code (or one of codes)."""
    got = expect_closed(r, timeout)
    acks = [p for p in got if p.type == CONNACK]
    if acks:
        a = acks[0]
        ok = (a.rc in codes) if codes else (a.rc == code)
        expect(ok, "CONNACK reason 0x%02x instead of 0x%02x" % (a.rc, code))
        expect(a.sp == 0, "refusing CONNACK with session present 1")
    return got


# ----------------------------------------------------------------------------------
# paho-mqtt wrapper
# ----------------------------------------------------------------------------------


class P:
    """A paho client on its own network thread, with queues for what it receives."""

    def __init__(self, ctx, cid, v5=False, clean=True):
        kw = dict(client_id=cid, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                  reconnect_on_failure=False)
        if not v5:
            kw["clean_session"] = clean
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
        self.cid = cid
        self.v5 = v5
        self.msgs = queue.Queue()
        self.cond = threading.Condition()
        self.connack = None
        self.disconnected = None
        self.subacks = {}
        self.unsubacks = {}
        self.started = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_message = lambda c, u, m: self.msgs.put(m)
        ctx.closers.append(self.close)

    def _on_connect(self, c, u, flags, rc, props):
        with self.cond:
            self.connack = (bool(flags.session_present), rc.value, props)
            self.cond.notify_all()

    def _on_disconnect(self, c, u, flags, rc, props):
        with self.cond:
            self.disconnected = rc
            self.cond.notify_all()

    def _on_subscribe(self, c, u, mid, codes, props):
        with self.cond:
            self.subacks[mid] = [x.value for x in codes]
            self.cond.notify_all()

    def _on_unsubscribe(self, c, u, mid, codes, props):
        with self.cond:
            self.unsubacks[mid] = [x.value for x in codes]
            self.cond.notify_all()

    def connect(self, keepalive=30, clean_start=True, props=None, timeout=5.0):
        """(session present, CONNACK properties); fails unless accepted."""
        with self.cond:
            self.connack = None
            self.disconnected = None
        if self.v5:
            self.c.connect(HOST, PORT, keepalive, clean_start=clean_start, properties=props)
        else:
            self.c.connect(HOST, PORT, keepalive)
        if not self.started:
            self.c.loop_start()
            self.started = True
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.disconnected is not None, timeout)
            ca = self.connack
        if ca is None:
            raise Fail("paho %s: no CONNACK (disconnect: %s)" % (self.cid, self.disconnected))
        expect(ca[1] == 0, "paho %s: CONNACK reason 0x%02x" % (self.cid, ca[1]))
        return ca[0], ca[2]

    def sub(self, topic, qos=0, options=None, props=None, timeout=3.0):
        """Subscribe and wait for the SUBACK; returns its codes. topic may be a list of
        (filter, qos or SubscribeOptions)."""
        if isinstance(topic, list):
            if self.v5:
                topic = [(f, o if isinstance(o, SubscribeOptions) else SubscribeOptions(qos=o)) for f, o in topic]
            rc, mid = self.c.subscribe(topic, properties=props)
        elif self.v5:
            rc, mid = self.c.subscribe(topic, options=options or SubscribeOptions(qos=qos), properties=props)
        else:
            rc, mid = self.c.subscribe(topic, qos)
        expect(rc == mqtt.MQTT_ERR_SUCCESS, "paho subscribe failed: %s" % rc)
        with self.cond:
            self.cond.wait_for(lambda: mid in self.subacks, timeout)
            codes = self.subacks.get(mid)
        expect(codes is not None, "no SUBACK within %.1fs" % timeout)
        return codes

    def unsub(self, topic, timeout=3.0):
        rc, mid = self.c.unsubscribe(topic)
        with self.cond:
            self.cond.wait_for(lambda: mid in self.unsubacks, timeout)
            codes = self.unsubacks.get(mid)
        expect(codes is not None, "no UNSUBACK within %.1fs" % timeout)
        return codes

    def pub(self, topic, payload=b"", qos=0, retain=False, props=None, timeout=3.0):
        """Publish and wait until it is sent (QoS 0) or acknowledged (QoS 1, 2)."""
        info = self.c.publish(topic, payload, qos, retain, properties=props)
        try:
            info.wait_for_publish(timeout)
            ok = info.is_published()
        except (RuntimeError, ValueError) as e:
            raise Fail("paho publish to %s failed: %s" % (topic, e))
        expect(ok, "paho publish to %s (QoS %d) not acknowledged within %.1fs" % (topic, qos, timeout))

    def get(self, timeout=3.0):
        try:
            return self.msgs.get(timeout=timeout)
        except queue.Empty:
            return None

    def take(self, n, timeout=3.0, topic=None):
        """Exactly n messages (optionally only those on topic) within timeout."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            m = self.get(max(0.0, deadline - time.monotonic()))
            if m is None:
                raise Fail("%s received %d of %d messages%s within %.1fs" % (
                    self.cid, len(got), n, "" if topic is None else " on %s" % topic, timeout))
            if topic is None or m.topic == topic:
                got.append(m)
        return got

    def wait(self, topic, timeout=3.0, payload=None):
        """The first message on topic (and with payload, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.get(max(0.0, deadline - time.monotonic()))
            if m is None:
                raise Fail("%s: no message on %s within %.1fs" % (self.cid, topic, timeout))
            if m.topic == topic and (payload is None or m.payload == payload):
                return m

    def quiet(self, wait=0.5):
        """Everything received until nothing arrives for `wait` seconds."""
        got = []
        while True:
            m = self.get(wait)
            if m is None:
                return got
            got.append(m)

    def close(self):
        try:
            if self.started:
                self.c.disconnect()
                self.c.loop_stop()
                self.started = False
        except Exception:
            pass


def props_of(m, name, default=None):
    p = getattr(m, "properties", None)
    if p is None:
        return default
    return getattr(p, name, default)


def pprops(ptype, **kw):
    p = Properties(ptype)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


# ----------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------

CHECKS = []


def check(label, desc):
    def deco(fn):
        CHECKS.append(([(label, desc)], fn))
        return fn
    return deco


def multi(*pairs):
    """A check reporting several statements from one scenario: fn returns one error
    string (or None) per (label, description) pair."""
    def deco(fn):
        CHECKS.append((list(pairs), fn))
        return fn
    return deco


class Ctx:
    def __init__(self, idx):
        self.idx = idx
        self.prefix = "%s/%03d" % (RUN, idx)
        self.closers = []
        self.retained = set()
        self.sessions = []

    def topic(self, s=""):
        return "%s/%s" % (self.prefix, s) if s else self.prefix

    def cid(self, s=""):
        return "c%s%03d%s" % (RUN, self.idx, s)

    def raw(self, v=4):
        return Raw(self, v)

    def raw_connect(self, v, cid, **kw):
        r = Raw(self, v)
        r.send(connect_pkt(v, cid, **kw))
        a = r.expect(CONNACK)
        expect(a.rc == 0, "CONNACK return code 0x%02x for %r" % (a.rc, cid))
        return r, a

    def paho(self, s, v5=False, clean=True):
        return P(self, self.cid(s), v5=v5, clean=clean)

    def retain(self, topic):
        self.retained.add(topic)

    def session(self, v, cid):
        self.sessions.append((v, cid))

    def cleanup(self):
        for fn in reversed(self.closers):
            try:
                fn()
            except Exception:
                pass
        self.closers = []
        try:
            if self.retained:
                r, _ = self.raw_connect(4, self.cid("zclean"))
                for i, t in enumerate(sorted(self.retained)):
                    r.send(publish_pkt(4, t, b"", qos=1, pid=i + 1, retain=True))
                    r.expect(PUBACK)
                r.send(disconnect_pkt(4))
                r.close()
            for v, cid in self.sessions:
                r, _ = self.raw_connect(v, cid, clean=True)
                r.send(disconnect_pkt(v))
                r.close()
        except Exception as e:
            print("      (cleanup of check %d failed: %s)" % (self.idx, e))


# ---------------------------------------------------------------- CONNECT / CONNACK


@check("MQTT-3.2.2-1", "3.1.1 CONNECT from paho (clean session 1) accepted: return code 0, session present 0")
def _(c):
    p = c.paho("a")
    sp, _ = p.connect()
    expect(not sp, "session present 1 for a clean session")


@check("v5 MQTT-3.2.2-2", "MQTT 5 CONNECT from paho (clean start 1) accepted: reason 0x00, session present 0")
def _(c):
    p = c.paho("a", v5=True)
    sp, _ = p.connect()
    expect(not sp, "session present 1 for a clean start")


@check("MQTT-3.1.0-1", "first packet not a CONNECT (SUBSCRIBE): connection closed with no reply")
def _(c):
    r = c.raw(4)
    r.send(subscribe_pkt(4, 1, [(c.topic("x"), 0)]))
    expect_closed(r, forbid=(CONNACK, SUBACK))


@check("MQTT-3.1.0-2", "3.1.1: second CONNECT on a connection is a protocol violation: connection closed")
def _(c):
    r, _ = c.raw_connect(4, c.cid("a"))
    r.send(connect_pkt(4, c.cid("a")))
    expect_closed(r, forbid=(CONNACK,))


@check("v5 MQTT-3.1.0-2", "MQTT 5: second CONNECT is a Protocol Error: DISCONNECT 0x82, connection closed")
def _(c):
    r, _ = c.raw_connect(5, c.cid("a"))
    r.send(connect_pkt(5, c.cid("a")))
    expect_closed(r, forbid=(CONNACK,), disconnect=0x82)


@check("MQTT-3.1.2-2", "unsupported protocol level 3 (MQIsdp/3 and MQTT/3): CONNACK return code 0x01, then close")
def _(c):
    for i, (name, level) in enumerate((("MQIsdp", 3), ("MQTT", 3))):
        r = c.raw(4)
        r.send(connect_pkt(4, c.cid("l%d" % i), name=name, level=level))
        a = r.expect(CONNACK)
        expect(a.rc == 1, "%s level %d: CONNACK return code 0x%02x" % (name, level, a.rc))
        expect(a.sp == 0, "%s level %d: session present 1 in a refusal [MQTT-3.2.2-4]" % (name, level))
        expect_closed(r)


@check("v5 MQTT-3.1.2-2", "unsupported protocol version 6: CONNACK 0x84 (Unsupported Protocol Version), then close")
def _(c):
    r = c.raw(5)
    r.send(connect_pkt(5, c.cid("a"), level=6))
    a = r.expect(CONNACK)
    expect(a.rc == 0x84, "CONNACK reason 0x%02x" % a.rc)
    expect_closed(r)


@check("MQTT-3.1.2-3", "3.1.1 CONNECT with the reserved flag set: closed without CONNACK [MQTT-3.1.4-1]")
def _(c):
    r = c.raw(4)
    r.send(connect_pkt(4, c.cid("a"), flags_or=0x01))
    expect_closed(r, forbid=(CONNACK,))


@check("v5 MQTT-3.1.2-3", "MQTT 5 CONNECT with the reserved flag set: closed (CONNACK, if any, 0x81 Malformed Packet)")
def _(c):
    r = c.raw(5)
    r.send(connect_pkt(5, c.cid("a"), flags_or=0x01))
    expect_refused(r, 0x81)


@check("MQTT-3.1.2-14", "3.1.1 CONNECT with Will QoS 3: closed without CONNACK [MQTT-3.1.4-1]")
def _(c):
    r = c.raw(4)
    r.send(connect_pkt(4, c.cid("a"), will=dict(topic=c.topic("w"), payload=b"x", qos=3)))
    expect_closed(r, forbid=(CONNACK,))


@check("MQTT-3.1.2-22", "3.1.1 CONNECT with a password but no user name: closed without CONNACK [MQTT-3.1.4-1]")
def _(c):
    r = c.raw(4)
    r.send(connect_pkt(4, c.cid("a"), password=b"secret"))
    expect_closed(r, forbid=(CONNACK,))


@check("MQTT-3.1.3-8", "3.1.1 zero-byte client id with clean session 0: CONNACK 0x02, session present 0, close")
def _(c):
    r = c.raw(4)
    r.send(connect_pkt(4, "", clean=False))
    a = r.expect(CONNACK)
    expect(a.rc == 2, "CONNACK return code 0x%02x" % a.rc)
    expect(a.sp == 0, "session present 1 in a refusal [MQTT-3.2.2-4]")
    expect_closed(r)


@check("MQTT-3.1.3-6", "3.1.1 zero-byte client id with clean session 1: accepted, each such client distinct and usable")
def _(c):
    t = c.topic("t")
    r1, _ = c.raw_connect(4, "")
    r2, _ = c.raw_connect(4, "")
    r1.send(subscribe_pkt(4, 1, [(t, 1)]))
    expect(r1.expect(SUBACK).codes == [1], "SUBACK refused")
    r2.send(publish_pkt(4, t, b"hello", qos=1, pid=1))
    r2.expect(PUBACK)
    m = r1.expect(PUBLISH)
    expect(m.topic == t and m.payload == b"hello", "got %r" % m)
    r1.send(ack_pkt(PUBACK, m.pid))
    expect(r1.ping() and r2.ping(), "one of the two empty-id clients was disconnected")


@check("v5 MQTT-3.2.2-16", "MQTT 5 zero-length client id: CONNACK carries a unique Assigned Client Identifier")
def _(c):
    r1, a1 = c.raw_connect(5, "")
    r2, a2 = c.raw_connect(5, "")
    i1, i2 = a1.props.get(P_ASSIGNED_CID), a2.props.get(P_ASSIGNED_CID)
    expect(i1 and i2, "no Assigned Client Identifier (props %s / %s)" % (a1.props, a2.props))
    expect(i1 != i2, "both clients were assigned %r" % i1)
    expect(r1.ping() and r2.ping(), "one of the two clients was disconnected")


@check("v5 §3.1.2.11.3", "Receive Maximum 0 in CONNECT is a Protocol Error: closed (CONNACK, if any, 0x82)")
def _(c):
    r = c.raw(5)
    r.send(connect_pkt(5, c.cid("a"), props=[(P_RECEIVE_MAX, 0)]))
    expect_refused(r, 0x82)


@check("v5 MQTT-4.12.0-1", "unsupported Authentication Method: closed (CONNACK, if any, 0x8C or 0x87)")
def _(c):
    r = c.raw(5)
    r.send(connect_pkt(5, c.cid("a"), props=[(P_AUTH_METHOD, "SCRAM-SHA-1"), (P_AUTH_DATA, b"x")]))
    expect_refused(r, 0x8C, codes=(0x8C, 0x87))


@check("v5 MQTT-3.1.4-1", "malformed MQTT 5 CONNECT (unknown property 0x7F): closed (CONNACK, if any, 0x81)")
def _(c):
    r = c.raw(5)
    r.send(connect_pkt(5, c.cid("a"), raw_props=b"\x02\x7f\x00"))
    expect_refused(r, 0x81)


@check("v5 §3.2.2.3", "CONNACK: reserved flags 0; Receive Maximum 1024, Maximum Packet Size 2097152, Topic Alias Maximum 64")
def _(c):
    r, a = c.raw_connect(5, c.cid("a"), keepalive=30)
    expect(a.ack_flags & 0xFE == 0, "reserved CONNACK flag bits set [v5 MQTT-3.2.2-1]: 0x%02x" % a.ack_flags)
    want = {P_RECEIVE_MAX: 1024, P_MAX_PACKET: 2097152, P_TOPIC_ALIAS_MAX: 64}
    for pid, v in want.items():
        expect(a.props.get(pid) == v, "property 0x%02x = %s, expected %d (all: %s)" % (pid, a.props.get(pid), v, a.props))
    expect(P_SERVER_KEEP_ALIVE not in a.props,
           "Server Keep Alive %s sent for keep alive 30" % a.props.get(P_SERVER_KEEP_ALIVE))


@check("v5 §3.2.2.3.14", "keep alive 120 asked: CONNACK Server Keep Alive 60 (server maximum)")
def _(c):
    r, a = c.raw_connect(5, c.cid("a"), keepalive=120)
    expect(a.props.get(P_SERVER_KEEP_ALIVE) == 60, "Server Keep Alive = %s" % a.props.get(P_SERVER_KEEP_ALIVE))


@check("v5 §3.2.2.3.2", "Session Expiry 0xFFFFFFFF asked: CONNACK Session Expiry Interval 3600 (server maximum)")
def _(c):
    cid = c.cid("a")
    c.session(5, cid)
    r, a = c.raw_connect(5, cid, props=[(P_SESSION_EXPIRY, 0xFFFFFFFF)])
    expect(a.props.get(P_SESSION_EXPIRY) == 3600, "Session Expiry Interval = %s" % a.props.get(P_SESSION_EXPIRY))


def rejected_then_publish(c, v, connect):
    t = c.topic("t")
    s = c.paho("s", v5=(v == 5))
    s.connect()
    s.sub(t, 1)
    c.retain(t)
    r = c.raw(v)
    r.send(connect + publish_pkt(v, t, b"after-refusal", qos=1, pid=1, retain=True)
           + subscribe_pkt(v, 2, [(t, 1)]))
    got = expect_closed(r)
    expect(len(got) <= 1 and all(x.type == CONNACK and x.rc != 0 for x in got),
           "server sent %s after refusing the CONNECT" % got)
    p = c.paho("p", v5=(v == 5))
    p.connect()
    p.pub(t, b"sentinel", 1)
    msgs = [m.payload for m in [s.get(3)] + s.quiet(0.3) if m is not None]
    expect(msgs == [b"sentinel"], "subscriber received %s" % msgs)


@check("MQTT-3.1.4-5", "3.1.1 CONNECT refused (0x02): the PUBLISH and SUBSCRIBE sent right after it are not processed")
def _(c):
    rejected_then_publish(c, 4, connect_pkt(4, "", clean=False))


@check("v5 MQTT-3.1.4-6", "MQTT 5 CONNECT refused (Receive Maximum 0): the PUBLISH and SUBSCRIBE sent right after it are not processed")
def _(c):
    rejected_then_publish(c, 5, connect_pkt(5, c.cid("r"), props=[(P_RECEIVE_MAX, 0)]))


@check("MQTT-3.1.3-5", "23-byte ClientId of 0-9a-zA-Z accepted")
def _(c):
    cid = (c.cid("Z") + "aZ09" * 6)[:23]
    r, _ = c.raw_connect(4, cid)
    expect(r.ping(), "connection not usable")


# ---------------------------------------------------------------- takeover


@check("MQTT-3.1.4-2", "3.1.1 takeover: second CONNECT with the same client id closes the first, whose will is published")
def _(c):
    wt = c.topic("will")
    s = c.paho("s")
    s.connect()
    s.sub(wt, 1)
    cid = c.cid("dup")
    r1, _ = c.raw_connect(4, cid, keepalive=60, will=dict(topic=wt, payload=b"first-gone", qos=1))
    r2, _ = c.raw_connect(4, cid, keepalive=60)
    closed, got = r1.until_closed(3)
    expect(closed, "first connection still open (received %s)" % got)
    s.wait(wt, 3, payload=b"first-gone")
    expect(r2.ping(), "second connection not usable")


@check("v5 MQTT-3.1.4-3", "MQTT 5 takeover: first connection gets DISCONNECT 0x8E and is closed; its will is published")
def _(c):
    wt = c.topic("will")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(wt, 1)
    cid = c.cid("dup")
    r1, _ = c.raw_connect(5, cid, keepalive=60, will=dict(topic=wt, payload=b"first-gone", qos=1))
    r2, _ = c.raw_connect(5, cid, keepalive=60)
    expect_closed(r1, disconnect=0x8E, what="first connection")
    s.wait(wt, 3, payload=b"first-gone")
    expect(r2.ping(), "second connection not usable")


# ---------------------------------------------------------------- PUBLISH / QoS


@check("MQTT-4.5.0-1", "QoS 0, 1 and 2 messages (binary payloads) reach a matching subscriber intact, at their QoS")
def _(c):
    t = c.topic("q")
    s = c.paho("s")
    s.connect()
    expect(s.sub(t, 2) == [2], "SUBACK did not grant QoS 2")
    p = c.paho("p")
    p.connect()
    payloads = {0: b"\x00zero\xff", 1: b"one", 2: bytes(range(256))}
    for q in (0, 1, 2):
        p.pub(t, payloads[q], q)
    got = s.take(3)
    for m in got:
        expect(m.topic == t, "topic %r" % m.topic)
        q = [k for k, v in payloads.items() if v == m.payload]
        expect(q, "unexpected payload %r" % m.payload[:20])
        expect(m.qos == q[0], "QoS %d message delivered at QoS %d" % (q[0], m.qos))
    expect(sorted(m.qos for m in got) == [0, 1, 2], "QoS delivered: %s" % [m.qos for m in got])


@check("MQTT-2.3.1-6", "PUBACK carries the Packet Identifier of the QoS 1 PUBLISH (ids 1, 0x1234, 0xFFFF)")
def _(c):
    r, _ = c.raw_connect(4, c.cid("a"))
    for pid in (1, 0x1234, 0xFFFF):
        r.send(publish_pkt(4, c.topic("t"), b"x", qos=1, pid=pid))
        a = r.expect(PUBACK)
        expect(a.pid == pid, "PUBACK pid %d for PUBLISH pid %d" % (a.pid, pid))


def both(s, a, b, timeout=3.0):
    """Messages received until payloads a and b have both arrived, then 0.3 s more."""
    got = []
    deadline = time.monotonic() + timeout
    while not ({a, b} <= {m.payload for m in got}):
        m = s.get(max(0.0, deadline - time.monotonic()))
        if m is None:
            raise Fail("received only %s within %.1fs" % ([x.payload for x in got], timeout))
        got.append(m)
    return got + s.quiet(0.3)


@check("MQTT-4.3.3-2", "3.1.1 QoS 2 from a client: PUBREC, PUBREL → PUBCOMP with the same id; delivered once")
def _(c):
    t = c.topic("q2")
    s = c.paho("s")
    s.connect()
    s.sub(t, 2)
    r, _ = c.raw_connect(4, c.cid("p"))
    r.send(publish_pkt(4, t, b"exactly-once", qos=2, pid=7))
    rec = r.expect(PUBREC)
    expect(rec.pid == 7 and rec.flags == 0, "PUBREC %r flags %d" % (rec, rec.flags))
    r.send(ack_pkt(PUBREL, 7))
    comp = r.expect(PUBCOMP)
    expect(comp.pid == 7, "PUBCOMP pid %d" % comp.pid)
    r.send(publish_pkt(4, t, b"sentinel", qos=2, pid=8))
    r.expect(PUBREC)
    r.send(ack_pkt(PUBREL, 8))
    r.expect(PUBCOMP)
    got = both(s, b"exactly-once", b"sentinel")
    n = sum(1 for m in got if m.payload == b"exactly-once")
    expect(n == 1, "QoS 2 message delivered %d times" % n)
    expect([m.qos for m in got if m.payload == b"exactly-once"] == [2], "not delivered at QoS 2")


@check("v5 MQTT-4.3.3-10", "QoS 2 PUBLISH resent (DUP=1, same id) before PUBREL: PUBREC again, delivered once")
def _(c):
    t = c.topic("q2")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(t, 2)
    r, _ = c.raw_connect(5, c.cid("p"))
    r.send(publish_pkt(5, t, b"dup-test", qos=2, pid=9))
    a = r.expect(PUBREC)
    expect(a.pid == 9 and a.reason < 0x80, "first PUBREC %r" % a)
    r.send(publish_pkt(5, t, b"dup-test", qos=2, pid=9, dup=True))
    a = r.expect(PUBREC)
    expect(a.pid == 9 and a.reason < 0x80, "second PUBREC %r" % a)
    r.send(ack_pkt(PUBREL, 9))
    comp = r.expect(PUBCOMP)
    expect(comp.pid == 9 and comp.reason == 0, "PUBCOMP %r [v5 MQTT-4.3.3-11]" % comp)
    r.send(publish_pkt(5, t, b"sentinel", qos=2, pid=10))
    r.expect(PUBREC)
    r.send(ack_pkt(PUBREL, 10))
    r.expect(PUBCOMP)
    got = both(s, b"dup-test", b"sentinel")
    n = sum(1 for m in got if m.payload == b"dup-test")
    expect(n == 1, "message delivered %d times" % n)


@check("MQTT-4.3.3-1", "server as QoS 2 sender: PUBLISH with DUP 0 and non-zero id, PUBREL (flags 0010) after PUBREC, no resend")
def _(c):
    t = c.topic("q2")
    r, _ = c.raw_connect(4, c.cid("s"))
    r.send(subscribe_pkt(4, 1, [(t, 2)]))
    expect(r.expect(SUBACK).codes == [2], "QoS 2 not granted")
    p = c.paho("p")
    p.connect()
    p.pub(t, b"q2-out", 2)
    m = r.expect(PUBLISH)
    expect(m.qos == 2 and m.pid and not m.dup, "got %r" % m)
    r.send(ack_pkt(PUBREC, m.pid))
    rel = r.expect(PUBREL)
    expect(rel.pid == m.pid, "PUBREL pid %d for PUBLISH pid %d" % (rel.pid, m.pid))
    expect(rel.flags == 2, "PUBREL fixed header flags %d [MQTT-3.6.1-1]" % rel.flags)
    r.send(ack_pkt(PUBCOMP, m.pid))
    extra = r.recv(0.5)
    expect(extra is None, "unexpected %r after PUBCOMP" % extra)


@check("MQTT-4.6.0-2", "PUBACKs sent in the order the QoS 1 PUBLISHes were received (20 back-to-back, random ids)")
def _(c):
    r, _ = c.raw_connect(4, c.cid("a"))
    pids = random.sample(range(1, 65536), 20)
    r.send(b"".join(publish_pkt(4, c.topic("t"), b"%d" % i, 1, pid=pid) for i, pid in enumerate(pids)))
    got = [r.expect(PUBACK).pid for _ in pids]
    expect(got == pids, "PUBACK order %s for PUBLISH order %s" % (got, pids))


@check("MQTT-4.6.0-3", "PUBRECs sent in the order the QoS 2 PUBLISHes were received (20 back-to-back, random ids)")
def _(c):
    r, _ = c.raw_connect(4, c.cid("a"))
    pids = random.sample(range(1, 65536), 20)
    r.send(b"".join(publish_pkt(4, c.topic("t"), b"%d" % i, 2, pid=pid) for i, pid in enumerate(pids)))
    got = [r.expect(PUBREC).pid for _ in pids]
    expect(got == pids, "PUBREC order %s for PUBLISH order %s" % (got, pids))
    r.send(b"".join(ack_pkt(PUBREL, pid) for pid in pids))
    got = [r.expect(PUBCOMP).pid for _ in pids]
    expect(sorted(got) == sorted(pids), "PUBCOMPs %s" % got)


@check("MQTT-4.6.0-6", "ordered topic: 30 messages from one client reach a subscriber in publish order, at QoS 0, 1 and 2")
def _(c):
    s = c.paho("s")
    s.connect()
    n = 30
    ts = {q: c.topic("o%d" % q) for q in (0, 1, 2)}
    s.sub([(t, 2) for t in ts.values()])
    r, _ = c.raw_connect(4, c.cid("p"))
    for q, t in ts.items():
        r.send(b"".join(publish_pkt(4, t, b"%d" % i, q, pid=i + 1) for i in range(n)))
        if q == 1:
            for _ in range(n):
                r.expect(PUBACK)
        if q == 2:
            for _ in range(n):
                r.expect(PUBREC)
            r.send(b"".join(ack_pkt(PUBREL, i + 1) for i in range(n)))
            for _ in range(n):
                r.expect(PUBCOMP)
    got = {q: [] for q in ts}
    for m in s.take(3 * n, timeout=5):
        got[[q for q, t in ts.items() if t == m.topic][0]].append(int(m.payload))
    bad = ["QoS %d order %s" % (q, g) for q, g in got.items() if g != list(range(n))]
    expect(not bad, "; ".join(bad))


@check("MQTT-3.8.4-6", "delivered QoS = min(published QoS, granted QoS) for subscriptions at QoS 0 and QoS 1")
def _(c):
    t = c.topic("m")
    s1 = c.paho("s1")
    s1.connect()
    g1 = s1.sub(t, 1)[0]
    s0 = c.paho("s0")
    s0.connect()
    g0 = s0.sub(t, 0)[0]
    p = c.paho("p")
    p.connect()
    for q in (0, 1, 2):
        p.pub(t, b"%d" % q, q)
    for s, g in ((s1, g1), (s0, g0)):
        got = {int(m.payload): m.qos for m in s.take(3)}
        want = {q: min(q, g) for q in (0, 1, 2)}
        expect(got == want, "subscription granted QoS %d: published→delivered %s, expected %s" % (g, got, want))


@check("MQTT-3.3.5-1", "3.1.1 overlapping subscriptions (QoS 0 and QoS 2): message delivered at the maximum QoS, 2")
def _(c):
    s = c.paho("s")
    s.connect()
    codes = s.sub([(c.topic("#"), 0), (c.topic("+"), 2)])
    expect(codes == [0, 2], "SUBACK %s" % codes)
    p = c.paho("p")
    p.connect()
    p.pub(c.topic("x"), b"overlap", 2)
    got = [m for m in [s.get(3)] + s.quiet(0.5) if m is not None]
    expect(got, "message not delivered")
    expect(max(m.qos for m in got) == 2, "delivered at QoS %s" % [m.qos for m in got])


@check("v5 MQTT-3.3.4-4", "overlapping subscriptions with ids 1 and 2: a single copy carries both ids, at max QoS [v5 MQTT-3.3.4-2]")
def _(c):
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(c.topic("#"), options=SubscribeOptions(qos=0), props=pprops(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=1))
    s.sub(c.topic("+"), options=SubscribeOptions(qos=2), props=pprops(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=2))
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(c.topic("x"), b"overlap", 2)
    got = [m for m in [s.get(3)] + s.quiet(0.5) if m is not None]
    expect(got, "message not delivered")
    ids = [sorted(props_of(m, "SubscriptionIdentifier", [])) for m in got]
    expect(max(m.qos for m in got) == 2, "delivered at QoS %s" % [m.qos for m in got])
    if len(got) == 1:
        expect(ids[0] == [1, 2], "single copy with Subscription Identifiers %s" % ids[0])
    else:
        expect(all(len(i) == 1 for i in ids) and sorted(i[0] for i in ids) == [1, 2],
               "%d copies with Subscription Identifiers %s [v5 MQTT-3.3.4-5]" % (len(got), ids))


# ---------------------------------------------------------------- malformed packets


def closes_after(c, v, data, forbid=(), setup=None, timeout=3.0, disconnect=None):
    r, _ = c.raw_connect(v, c.cid("m"))
    if setup:
        setup(r)
    r.send(data)
    expect_closed(r, timeout, forbid=forbid, disconnect=disconnect)


@check("MQTT-3.3.1-4", "PUBLISH with both QoS bits set (QoS 3): connection closed")
def _(c):
    body = utf8(c.topic("t")) + u16(1) + b"x"
    closes_after(c, 4, packet(0x36, body), forbid=(PUBACK, PUBREC))


def zero_pid(c, v):
    t = c.topic("t")
    cases = [("QoS 1 PUBLISH", publish_pkt(v, t, b"x", qos=1, pid=0)),
             ("QoS 2 PUBLISH", publish_pkt(v, t, b"x", qos=2, pid=0)),
             ("SUBSCRIBE", subscribe_pkt(v, 0, [(t, 1)])),
             ("UNSUBSCRIBE", unsubscribe_pkt(v, 0, [t]))]
    bad = []
    for i, (name, data) in enumerate(cases):
        r, _ = c.raw_connect(v, c.cid("z%d" % i))
        r.send(data)
        closed, got = r.until_closed(2)
        if not closed:
            bad.append("%s with id 0 answered with %s, connection kept open" % (name, got or "nothing"))
    expect(not bad, "; ".join(bad))


@check("MQTT-2.3.1-1", "3.1.1 PUBLISH (QoS 1, 2), SUBSCRIBE, UNSUBSCRIBE with Packet Identifier 0: each closes the connection")
def _(c):
    zero_pid(c, 4)


@check("v5 MQTT-2.2.1-3", "MQTT 5 PUBLISH (QoS 1, 2), SUBSCRIBE, UNSUBSCRIBE with Packet Identifier 0: each closes the connection")
def _(c):
    zero_pid(c, 5)


@check("MQTT-3.3.2-2", "3.1.1 PUBLISH whose Topic Name contains a wildcard (+): connection closed")
def _(c):
    closes_after(c, 4, publish_pkt(4, c.topic("+/x"), b"x", qos=1, pid=1), forbid=(PUBACK,))


@check("v5 MQTT-3.3.2-2", "MQTT 5 PUBLISH whose Topic Name contains a wildcard (#): connection closed")
def _(c):
    closes_after(c, 5, publish_pkt(5, c.topic("#"), b"x", qos=1, pid=1), forbid=(PUBACK,))


@check("MQTT-1.5.3-2", "Topic Name containing U+0000: connection closed")
def _(c):
    topic = c.topic("a").encode() + b"\x00b"
    closes_after(c, 4, publish_pkt(4, topic, b"x", qos=1, pid=1), forbid=(PUBACK,))


@check("MQTT-1.5.3-1", "3.1.1 Topic Name with ill-formed UTF-8 (encoded surrogate U+D800): connection closed")
def _(c):
    topic = c.topic("a").encode() + b"\xed\xa0\x80"
    closes_after(c, 4, publish_pkt(4, topic, b"x", qos=1, pid=1), forbid=(PUBACK,))


@check("v5 MQTT-1.5.4-1", "MQTT 5 Topic Filter with ill-formed UTF-8 (overlong C0 AF): connection closed")
def _(c):
    f = c.topic("a").encode() + b"\xc0\xaf"
    closes_after(c, 5, subscribe_pkt(5, 1, [(f, 1)]), forbid=(SUBACK,))


@check("MQTT-3.6.1-1", "PUBREL with fixed header flags 0000 instead of 0010: connection closed")
def _(c):
    def setup(r):
        r.send(publish_pkt(4, c.topic("t"), b"x", qos=2, pid=5))
        r.expect(PUBREC)
    closes_after(c, 4, packet(0x60, u16(5)), forbid=(PUBCOMP,), setup=setup)


@check("MQTT-3.8.1-1", "SUBSCRIBE with fixed header flags 0000 instead of 0010: connection closed")
def _(c):
    closes_after(c, 4, subscribe_pkt(4, 1, [(c.topic("t"), 0)], first=0x80), forbid=(SUBACK,))


@check("MQTT-3.10.1-1", "UNSUBSCRIBE with fixed header flags 0000 instead of 0010: connection closed")
def _(c):
    closes_after(c, 4, unsubscribe_pkt(4, 1, [c.topic("t")], first=0xA0), forbid=(UNSUBACK,))


@check("MQTT-2.2.2-2", "PINGREQ with a reserved flag bit set (0xC1): connection closed")
def _(c):
    closes_after(c, 4, b"\xc1\x00", forbid=(PINGRESP,))


SERVER_ONLY_311 = [("CONNACK", b"\x20\x02\x00\x00"), ("SUBACK", b"\x90\x03\x00\x01\x00"),
                   ("UNSUBACK", b"\xb0\x02\x00\x01"), ("PINGRESP", b"\xd0\x00"),
                   ("reserved type 0", b"\x00\x00"), ("reserved type 15", b"\xf0\x00")]
SERVER_ONLY_5 = [("CONNACK", b"\x20\x03\x00\x00\x00"), ("SUBACK", b"\x90\x04\x00\x01\x00\x00"),
                 ("UNSUBACK", b"\xb0\x04\x00\x01\x00\x00"), ("PINGRESP", b"\xd0\x00"),
                 ("reserved type 0", b"\x00\x00"),
                 ("AUTH without Authentication Method [v5 MQTT-4.12.0-7]", b"\xf0\x00")]


def server_only(c, v, cases):
    bad = []
    for i, (name, data) in enumerate(cases):
        r, _ = c.raw_connect(v, c.cid("k%d" % i))
        r.send(data)
        closed, got = r.until_closed(3)
        if not closed:
            bad.append("%s: still open" % name)
    expect(not bad, "; ".join(bad))


@check("MQTT-4.8.0-1", "3.1.1 client sends CONNACK, SUBACK, UNSUBACK, PINGRESP, type 0, type 15: each closes the connection")
def _(c):
    server_only(c, 4, SERVER_ONLY_311)


@check("v5 MQTT-4.13.1-1", "MQTT 5 client sends CONNACK, SUBACK, UNSUBACK, PINGRESP, type 0, AUTH: each closes the connection")
def _(c):
    server_only(c, 5, SERVER_ONLY_5)


@check("MQTT-3.8.3-3", "3.1.1 SUBSCRIBE with no Topic Filter: connection closed")
def _(c):
    closes_after(c, 4, b"\x82\x02\x00\x01", forbid=(SUBACK,))


@check("v5 MQTT-3.8.3-2", "MQTT 5 SUBSCRIBE with no Topic Filter: connection closed")
def _(c):
    closes_after(c, 5, b"\x82\x03\x00\x01\x00", forbid=(SUBACK,))


@check("MQTT-3-8.3-4", "3.1.1 SUBSCRIBE requesting QoS 3: connection closed")
def _(c):
    closes_after(c, 4, subscribe_pkt(4, 1, [(c.topic("t"), 3)]))


@check("v5 MQTT-3.8.3-5", "MQTT 5 SUBSCRIBE with reserved Subscription Options bits 6-7 set: connection closed")
def _(c):
    closes_after(c, 5, subscribe_pkt(5, 1, [(c.topic("t"), 0xC1)]))


@check("v5 §3.8.3.1", "MQTT 5 Subscription Options with Retain Handling 3, or with QoS 3: connection closed")
def _(c):
    bad = []
    for i, (name, opts) in enumerate((("Retain Handling 3", 0x31), ("QoS 3", 0x03))):
        r, _ = c.raw_connect(5, c.cid("o%d" % i))
        r.send(subscribe_pkt(5, 1, [(c.topic("t"), opts)]))
        closed, got = r.until_closed(2)
        if not closed:
            bad.append("%s: answered with %s, connection kept open" % (name, got or "nothing"))
    expect(not bad, "; ".join(bad))


@check("v5 MQTT-3.3.4-6", "PUBLISH from a client containing a Subscription Identifier: connection closed")
def _(c):
    closes_after(c, 5, publish_pkt(5, c.topic("t"), b"x", qos=1, pid=1, props=[(P_SUB_ID, 3)]))


@check("v5 MQTT-3.3.2-14", "PUBLISH whose Response Topic contains a wildcard: refused (PUBACK ≥ 0x80) or connection closed")
def _(c):
    r, _ = c.raw_connect(5, c.cid("m"))
    r.send(publish_pkt(5, c.topic("t"), b"x", qos=1, pid=1, props=[(P_RESPONSE_TOPIC, c.topic("resp/#"))]))
    closed, got = r.until_closed(1.5)
    acks = [x for x in got if x.type == PUBACK]
    expect(closed or (acks and acks[0].reason >= 0x80), "answered with %s, connection kept open" % (got or "nothing"))


@check("MQTT-3.10.3-2", "3.1.1 UNSUBSCRIBE with no Topic Filter: connection closed")
def _(c):
    closes_after(c, 4, b"\xa2\x02\x00\x01", forbid=(UNSUBACK,))


@check("v5 MQTT-1.5.5-1", "Remaining Length encoded in 5 bytes (malformed variable byte integer): connection closed")
def _(c):
    closes_after(c, 5, b"\x30\xff\xff\xff\xff\x7f")


@check("MQTT-3.12.4-1", "PINGREQ answered with PINGRESP (3.1.1 and MQTT 5)")
def _(c):
    for v in (4, 5):
        r, _ = c.raw_connect(v, c.cid("v%d" % v))
        r.send(PINGREQ_PKT)
        p = r.expect(PINGRESP)
        expect(p.flags == 0 and p.body == b"", "malformed PINGRESP")


# ---------------------------------------------------------------- SUBSCRIBE / UNSUBSCRIBE


@check("MQTT-3.9.3-1", "SUBACK: same Packet Identifier, one return code per filter in order, multiple filters all active")
def _(c):
    r, _ = c.raw_connect(4, c.cid("s"))
    fs = [(c.topic("a"), 0), (c.topic("b"), 1), (c.topic("c"), 2)]
    r.send(subscribe_pkt(4, 0x4242, fs))
    a = r.expect(SUBACK)
    expect(a.pid == 0x4242, "SUBACK pid 0x%04x [MQTT-3.8.4-2]" % a.pid)
    expect(len(a.codes) == 3, "%d return codes for 3 filters [MQTT-3.8.4-5]" % len(a.codes))
    expect(all(code <= q for code, (_, q) in zip(a.codes, fs)), "return codes %s for requested QoS 0,1,2" % a.codes)
    p = c.paho("p")
    p.connect()
    for f, _ in fs:
        p.pub(f, b"m", 0)
    got = set()
    for _ in fs:
        got.add(r.expect(PUBLISH).topic)
    expect(got == {f for f, _ in fs}, "received on %s [MQTT-3.8.4-4]" % sorted(got))


def invalid_filters(c, v):
    """SUBSCRIBE with malformed filters between valid ones: each malformed one gets a
    failure code (≥ 0x80) and each valid one is granted, or the connection is closed
    (a Protocol Error); anything else fails."""
    r, _ = c.raw_connect(v, c.cid("s"))
    fs = [c.topic("ok1"), c.topic("#/b"), c.topic("a+"), c.topic("b#"), c.topic("+x/y"), c.topic("ok2")]
    valid = [True, False, False, False, False, True]
    r.send(subscribe_pkt(v, 3, [(f, 1) for f in fs]))
    try:
        a = r.recv(3)
    except Closed:
        return
    expect(a is not None, "neither SUBACK nor close")
    expect(a.type == SUBACK, "got %r" % a)
    codes = a.codes
    ok = len(codes) == len(fs) and all((code in (0, 1)) if good else code >= 0x80 for code, good in zip(codes, valid))
    expect(ok, "return codes %s for %s" % (["0x%02x" % x for x in codes], [f.split("/", 2)[-1] for f in fs]))


@check("MQTT-4.7.1-2", "3.1.1 SUBSCRIBE with malformed filters (a/#/b, a+, b#, +x/y): 0x80 for each, valid ones granted (or close)")
def _(c):
    invalid_filters(c, 4)


@check("v5 MQTT-4.7.1-1", "MQTT 5 SUBSCRIBE with malformed filters (a/#/b, a+, b#, +x/y): code ≥ 0x80 for each, in order (or close)")
def _(c):
    invalid_filters(c, 5)


@check("MQTT-3.8.4-5", "3.1.1 SUBSCRIBE to a denied filter (test/nosubscribe): failure 0x80, nothing delivered from it")
def _(c):
    s = c.paho("s")
    s.connect()
    codes = s.sub([("test/nosubscribe", 1), (c.topic("ok"), 1)])
    expect(codes[0] == 0x80 and codes[1] in (0, 1), "return codes %s" % codes)
    p = c.paho("p")
    p.connect()
    p.pub("test/nosubscribe", b"secret", 1)
    p.pub(c.topic("ok"), b"fine", 1)
    got = [m for m in [s.get(3)] + s.quiet(0.4) if m is not None]
    expect([m.topic for m in got] == [c.topic("ok")], "received on %s" % [m.topic for m in got])


@check("v5 MQTT-3.8.4-7", "MQTT 5 SUBSCRIBE to a denied filter (test/nosubscribe): reason code ≥ 0x80")
def _(c):
    s = c.paho("s", v5=True)
    s.connect()
    codes = s.sub([("test/nosubscribe", 1), (c.topic("ok"), 1)])
    expect(codes[0] >= 0x80 and codes[1] in (0, 1), "reason codes %s" % ["0x%02x" % x for x in codes])


@check("MQTT-3.8.4-3", "re-SUBSCRIBE to the same filter replaces the subscription (new QoS, retained re-sent, one copy)")
def _(c):
    t = c.topic("r")
    p = c.paho("p")
    p.connect()
    c.retain(t)
    p.pub(t, b"retained", 1, retain=True)
    s = c.paho("s")
    s.connect()
    s.sub(t, 0)
    m = s.wait(t)
    expect(m.payload == b"retained" and m.retain and m.qos == 0, "first retained delivery: qos %d retain %d" % (m.qos, m.retain))
    expect(s.sub(t, 1) == [1], "re-SUBSCRIBE not granted QoS 1")
    m = s.wait(t)
    expect(m.payload == b"retained" and m.retain and m.qos == 1,
           "retained message not re-sent at the new QoS (qos %d, retain %d)" % (m.qos, m.retain))
    p.pub(t, b"live1", 1)
    p.pub(t, b"live2", 1)
    got = s.take(2) + s.quiet(0.3)
    expect([(m.payload, m.qos) for m in got] == [(b"live1", 1), (b"live2", 1)],
           "after re-SUBSCRIBE received %s" % [(m.payload, m.qos) for m in got])


@check("MQTT-3.10.4-4", "UNSUBACK carries the Packet Identifier of the UNSUBSCRIBE")
def _(c):
    r, _ = c.raw_connect(4, c.cid("s"))
    r.send(subscribe_pkt(4, 1, [(c.topic("a"), 1)]))
    r.expect(SUBACK)
    r.send(unsubscribe_pkt(4, 0x5151, [c.topic("a")]))
    a = r.expect(UNSUBACK)
    expect(a.pid == 0x5151, "UNSUBACK pid 0x%04x" % a.pid)


@check("MQTT-3.10.4-5", "UNSUBACK sent even when no subscription matched the filter")
def _(c):
    r, _ = c.raw_connect(4, c.cid("s"))
    r.send(unsubscribe_pkt(4, 0x5152, [c.topic("never")]))
    a = r.expect(UNSUBACK)
    expect(a.pid == 0x5152, "UNSUBACK pid 0x%04x" % a.pid)


@check("MQTT-3.10.4-2", "after UNSUBACK no new messages are delivered for the removed filter; others continue")
def _(c):
    s = c.paho("s")
    s.connect()
    s.sub([(c.topic("a"), 1), (c.topic("b"), 1)])
    s.unsub(c.topic("a"))
    p = c.paho("p")
    p.connect()
    p.pub(c.topic("a"), b"after", 1)
    p.pub(c.topic("b"), b"other", 1)
    got = [m for m in [s.get(3)] + s.quiet(0.4) if m is not None]
    expect([m.topic for m in got] == [c.topic("b")], "received on %s" % [m.topic for m in got])


@check("MQTT-3.10.4-1", "UNSUBSCRIBE compares filters character by character: 'x/a' does not remove 'x/+'")
def _(c):
    s = c.paho("s")
    s.connect()
    s.sub(c.topic("+"), 1)
    s.unsub(c.topic("a"))
    p = c.paho("p")
    p.connect()
    p.pub(c.topic("a"), b"still", 1)
    s.wait(c.topic("a"), payload=b"still")


@check("v5 MQTT-3.11.3-1", "MQTT 5 UNSUBACK: one reason code per filter in order (0x00 Success, 0x11 No subscription existed)")
def _(c):
    r, _ = c.raw_connect(5, c.cid("s"))
    r.send(subscribe_pkt(5, 1, [(c.topic("a"), 1), (c.topic("b"), 1)]))
    r.expect(SUBACK)
    r.send(unsubscribe_pkt(5, 2, [c.topic("a"), c.topic("none"), c.topic("b")]))
    a = r.expect(UNSUBACK)
    expect(a.pid == 2, "UNSUBACK pid %d [v5 MQTT-3.10.4-5]" % a.pid)
    expect(a.codes == [0x00, 0x11, 0x00], "reason codes %s" % ["0x%02x" % x for x in a.codes])


# ---------------------------------------------------------------- keep alive


@multi(("MQTT-3.1.2-24", "3.1.1 keep alive 2 s, client silent: closed after 1.5 × keep alive (3 s), will published"),
       ("v5 MQTT-3.1.2-22", "MQTT 5 keep alive 2 s, client silent: DISCONNECT 0x8D, closed after 3 s, will published"),
       ("MQTT-3.1.2-23", "keep alive 2 s with a PINGREQ every second: connection kept open past 1.5 × keep alive"),
       ("§3.1.2.10", "keep alive 0: connection never timed out (open after 4 s of silence)"))
def _(c):
    s = c.paho("s")
    s.connect()
    s.sub(c.topic("#"), 1)
    a4, _ = c.raw_connect(4, c.cid("a4"), keepalive=2, will=dict(topic=c.topic("w4"), payload=b"ka4", qos=1))
    t4 = time.monotonic()
    a5, _ = c.raw_connect(5, c.cid("a5"), keepalive=2, will=dict(topic=c.topic("w5"), payload=b"ka5", qos=1))
    t5 = time.monotonic()
    b, _ = c.raw_connect(4, c.cid("b"), keepalive=0)
    pinger, _ = c.raw_connect(4, c.cid("c"), keepalive=2)
    closed = {}
    got5 = []
    ping_ok = True
    next_ping = time.monotonic() + 1.0
    # run until both silent connections are closed and 4 s have passed (so the keep
    # alive 0 and the pinging connection have outlived 1.5 x 2 s), at most 6 s
    while time.monotonic() < t4 + 6.0 and (len(closed) < 2 or time.monotonic() < t4 + 4.0):
        for name, r, t0 in (("a4", a4, t4), ("a5", a5, t5)):
            if name in closed:
                continue
            try:
                p = r.recv(0.05)
                if p is not None and name == "a5":
                    got5.append(p)
            except Closed:
                closed[name] = time.monotonic() - t0
        if len(closed) == 2:
            time.sleep(0.05)
        if time.monotonic() >= next_ping:
            ping_ok = ping_ok and pinger.ping(1.0)
            next_ping += 1.0
    wills = {m.topic: m.payload for m in s.quiet(0.5)}
    res = []
    for name, wt, payload in (("a4", "w4", b"ka4"), ("a5", "w5", b"ka5")):
        err = None
        if name not in closed:
            err = "still open after 6 s"
        elif not 2.0 <= closed[name] <= 5.0:
            err = "closed after %.2f s (expected about 3 s)" % closed[name]
        elif name == "a5" and not [p for p in got5 if p.type == DISCONNECT and p.reason == 0x8D]:
            err = "closed after %.2f s without DISCONNECT 0x8D (received %s)" % (closed[name], got5)
        elif wills.get(c.topic(wt)) != payload:
            err = "closed after %.2f s but the will was not published" % closed[name]
        res.append(err)
    res.append(None if ping_ok and pinger.ping() else "pinging connection was closed")
    res.append(None if b.ping() else "keep-alive-0 connection was closed")
    return res


# ---------------------------------------------------------------- wills


@check("MQTT-3.1.2-8", "3.1.1 will published when the connection closes without DISCONNECT (QoS 1, RETAIN 0) [MQTT-3.1.2-16]")
def _(c):
    wt = c.topic("will")
    s = c.paho("s")
    s.connect()
    s.sub(wt, 1)
    r, _ = c.raw_connect(4, c.cid("w"), keepalive=60, will=dict(topic=wt, payload=b"gone", qos=1))
    r.close()
    m = s.wait(wt)
    expect(m.payload == b"gone" and m.qos == 1 and not m.retain, "will: %r qos %d retain %d" % (m.payload, m.qos, m.retain))


@check("MQTT-3.1.2-17", "3.1.1 will with Will Retain 1 is published as a retained message")
def _(c):
    wt = c.topic("will")
    c.retain(wt)
    s = c.paho("s")
    s.connect()
    s.sub(wt, 1)
    r, _ = c.raw_connect(4, c.cid("w"), keepalive=60, will=dict(topic=wt, payload=b"kept", qos=1, retain=True))
    r.close()
    s.wait(wt, payload=b"kept")
    s2 = c.paho("s2")
    s2.connect()
    s2.sub(wt, 1)
    m = s2.wait(wt)
    expect(m.payload == b"kept" and m.retain, "new subscriber got %r retain %d" % (m.payload, m.retain))


@check("MQTT-3.14.4-3", "3.1.1 will discarded when the client sends DISCONNECT [MQTT-3.1.2-10]")
def _(c):
    wt = c.topic("will")
    s = c.paho("s")
    s.connect()
    s.sub(wt, 1)
    r, _ = c.raw_connect(4, c.cid("w"), keepalive=60, will=dict(topic=wt, payload=b"should-not", qos=1))
    r.send(disconnect_pkt(4))
    r.until_closed(2)
    r.close()
    time.sleep(0.2)
    p = c.paho("p")
    p.connect()
    p.pub(wt, b"sentinel", 1)
    got = [m.payload for m in [s.get(3)] + s.quiet(0.3) if m is not None]
    expect(got == [b"sentinel"], "received %s" % got)


@check("v5 MQTT-3.14.4-3", "MQTT 5 will discarded on DISCONNECT with reason 0x00")
def _(c):
    wt = c.topic("will")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(wt, 1)
    r, _ = c.raw_connect(5, c.cid("w"), keepalive=60, will=dict(topic=wt, payload=b"should-not", qos=1))
    r.send(disconnect_pkt(5, 0))
    r.until_closed(2)
    r.close()
    time.sleep(0.2)
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(wt, b"sentinel", 1)
    got = [m.payload for m in [s.get(3)] + s.quiet(0.3) if m is not None]
    expect(got == [b"sentinel"], "received %s" % got)


@check("v5 §3.14.2.1", "MQTT 5 DISCONNECT with reason 0x04 (Disconnect with Will Message): will published")
def _(c):
    wt = c.topic("will")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(wt, 1)
    r, _ = c.raw_connect(5, c.cid("w"), keepalive=60, will=dict(topic=wt, payload=b"bye-with-will", qos=1))
    r.send(disconnect_pkt(5, 0x04))
    s.wait(wt, payload=b"bye-with-will")


@check("v5 MQTT-3.1.3-10", "will properties forwarded: User Properties in order, Content Type, Response Topic, Correlation Data, Payload Format")
def _(c):
    wt = c.topic("will")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(wt, 1)
    ups = [("b", "1"), ("a", "2"), ("b", "3"), ("z", "")]
    wprops = [(P_USER, kv) for kv in ups[:2]] + [(P_CONTENT_TYPE, "text/plain"), (P_PAYLOAD_FORMAT, 1),
                                                  (P_RESPONSE_TOPIC, c.topic("resp")), (P_CORRELATION, b"\x00\x01corr")]
    wprops += [(P_USER, kv) for kv in ups[2:]]
    r, _ = c.raw_connect(5, c.cid("w"), keepalive=60,
                         will=dict(topic=wt, payload=b"will-props", qos=1, props=wprops))
    r.close()
    m = s.wait(wt)
    got = props_of(m, "UserProperty", [])
    expect(got == ups, "User Properties %s, expected %s" % (got, ups))
    expect(props_of(m, "ContentType") == "text/plain", "Content Type %r" % props_of(m, "ContentType"))
    expect(props_of(m, "PayloadFormatIndicator") == 1, "Payload Format Indicator %r" % props_of(m, "PayloadFormatIndicator"))
    expect(props_of(m, "ResponseTopic") == c.topic("resp"), "Response Topic %r" % props_of(m, "ResponseTopic"))
    expect(props_of(m, "CorrelationData") == b"\x00\x01corr", "Correlation Data %r" % props_of(m, "CorrelationData"))


@multi(("v5 MQTT-3.1.2-8", "Will Delay 2 s: will not published at close, published once the delay has elapsed"),
       ("v5 MQTT-3.1.3-9", "reconnect to the session before the Will Delay elapsed: will never published"),
       ("v5 §3.1.3.2.2", "Session Expiry 1 s < Will Delay 30 s: will published when the session ends (~1 s)"),
       ("v5 MQTT-3.1.2-4", "pending delayed will published at once when a new connection starts a clean session"))
def _(c):
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(c.topic("#"), 1)
    arrivals = {}
    lock = threading.Lock()

    def on_message(cl, u, m):
        with lock:
            arrivals.setdefault(m.topic, time.monotonic())
    s.c.on_message = on_message

    def conn(name, delay, expiry):
        cid = c.cid(name)
        c.session(5, cid)
        r, _ = c.raw_connect(5, cid, keepalive=60, props=[(P_SESSION_EXPIRY, expiry)],
                             will=dict(topic=c.topic(name), payload=name.encode(), qos=1,
                                       props=[(P_WILL_DELAY, delay)]))
        return r
    ra = conn("delay", 2, 60)
    rb = conn("back", 2, 60)
    rc = conn("expiry", 30, 1)
    rd = conn("clean", 30, 60)
    t0 = time.monotonic()
    for r in (ra, rb, rc, rd):
        r.close()
    time.sleep(0.5)
    c.raw_connect(5, c.cid("back"), clean=False, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    t_clean = time.monotonic()
    c.raw_connect(5, c.cid("clean"), clean=True, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    deadline = t0 + 4.5
    while time.monotonic() < deadline:
        with lock:
            if c.topic("delay") in arrivals and c.topic("expiry") in arrivals and c.topic("clean") in arrivals \
                    and time.monotonic() > t0 + 3.0:
                break
        time.sleep(0.05)
    with lock:
        at = {k.rsplit("/", 1)[1]: v for k, v in arrivals.items()}
    res = []
    if "delay" not in at:
        res.append("not published within 4.5 s")
    else:
        d = at["delay"] - t0
        res.append(None if 1.5 <= d <= 4.0 else "published %.2f s after the close (delay 2 s)" % d)
    res.append(None if "back" not in at else "published %.2f s after the close despite the reconnect" % (at["back"] - t0))
    if "expiry" not in at:
        res.append("not published within 4.5 s")
    else:
        d = at["expiry"] - t0
        res.append(None if 0.6 <= d <= 2.5 else "published %.2f s after the close (session expiry 1 s)" % d)
    if "clean" not in at:
        res.append("not published within 4 s of the clean start")
    else:
        d = at["clean"] - t_clean
        res.append(None if d <= 1.0 else "published %.2f s after the clean start" % d)
    return res


# ---------------------------------------------------------------- retained messages


@check("MQTT-3.3.1-8", "retained message stored (also after its publisher left) and sent with RETAIN 1 on subscribe [MQTT-3.3.1-5, -3.1.2-7]")
def _(c):
    t = c.topic("r")
    c.retain(t)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"state", 1, retain=True)
    p.close()
    s = c.paho("s")
    s.connect()
    s.sub(t, 1)
    m = s.wait(t)
    expect(m.payload == b"state" and m.retain == 1, "got %r retain %d" % (m.payload, m.retain))


@check("MQTT-3.3.1-9", "RETAIN 1 publish forwarded to an established subscription with RETAIN 0")
def _(c):
    t = c.topic("r")
    c.retain(t)
    s = c.paho("s")
    s.connect()
    s.sub(t, 1)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"live-retained", 1, retain=True)
    m = s.wait(t)
    expect(m.payload == b"live-retained" and m.retain == 0, "got %r retain %d" % (m.payload, m.retain))


@check("MQTT-3.3.1-6", "wildcard subscription receives the retained message of every matching topic")
def _(c):
    p = c.paho("p")
    p.connect()
    topics = [c.topic("w/a"), c.topic("w/b/c"), c.topic("w/d")]
    for i, t in enumerate(topics):
        c.retain(t)
        p.pub(t, b"r%d" % i, 1, retain=True)
    s = c.paho("s")
    s.connect()
    s.sub(c.topic("w/#"), 1)
    got = {m.topic: (m.payload, m.retain) for m in s.take(3)}
    want = {t: (b"r%d" % i, 1) for i, t in enumerate(topics)}
    expect(got == want, "got %s" % got)


@check("MQTT-3.3.1-7", "newer retained message (QoS 0) replaces the previous one: new subscriber gets only the latest")
def _(c):
    t = c.topic("r")
    c.retain(t)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"old", 1, retain=True)
    p.pub(t, b"new", 0, retain=True)
    time.sleep(0.1)
    s = c.paho("s")
    s.connect()
    s.sub(t, 1)
    got = [m.payload for m in [s.get(3)] + s.quiet(0.3) if m is not None]
    expect(got == [b"new"], "retained messages received: %s" % got)


@check("MQTT-3.3.1-10", "zero-byte RETAIN publish is forwarded normally and removes the retained message [MQTT-3.3.1-11]")
def _(c):
    t = c.topic("r")
    c.retain(t)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"doomed", 1, retain=True)
    s = c.paho("s")
    s.connect()
    s.sub(t, 1)
    s.wait(t, payload=b"doomed")
    p.pub(t, b"", 1, retain=True)
    m = s.wait(t)
    expect(m.payload == b"", "live subscriber got %r instead of the empty message" % m.payload)
    s2 = c.paho("s2")
    s2.connect()
    s2.sub(t, 1)
    p.pub(c.topic("r2"), b"x", 1)
    got = s2.quiet(0.5)
    expect(not got, "retained message still delivered after deletion: %s" % [(m.payload, m.retain) for m in got])


@check("MQTT-3.3.1-12", "RETAIN 0 publish neither stores nor replaces/removes the retained message")
def _(c):
    t = c.topic("r")
    c.retain(t)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"kept", 1, retain=True)
    for i, payload in enumerate((b"not-retained", b"")):
        p.pub(t, payload, 1, retain=False)
        s = c.paho("s%d" % i)
        s.connect()
        s.sub(t, 1)
        got = [(m.payload, m.retain) for m in [s.get(3)] + s.quiet(0.3) if m is not None]
        expect(got == [(b"kept", 1)], "after a RETAIN 0 publish with %s, a new subscriber received %s instead of the "
               "retained message" % ("payload %r" % payload if payload else "an empty payload", got))


@check("MQTT-3.3.1-5", "retained message keeps its QoS: QoS 1 retained → QoS 1 to a QoS 2 subscriber, QoS 0 to a QoS 0 one")
def _(c):
    t = c.topic("r")
    t2 = c.topic("r2")
    c.retain(t)
    c.retain(t2)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"q1", 1, retain=True)
    p.pub(t2, b"q2", 2, retain=True)
    s = c.paho("s")
    s.connect()
    s.sub(t, 2)
    m = s.wait(t)
    expect(m.qos == 1, "QoS 1 retained message delivered at QoS %d to a QoS 2 subscription" % m.qos)
    s.sub(t2, 2)
    m = s.wait(t2)
    expect(m.qos == 2, "QoS 2 retained message delivered at QoS %d to a QoS 2 subscription" % m.qos)
    s0 = c.paho("s0")
    s0.connect()
    s0.sub(t, 0)
    m = s0.wait(t)
    expect(m.qos == 0, "QoS 1 retained message delivered at QoS %d to a QoS 0 subscription" % m.qos)


@multi(("v5 MQTT-3.3.1-12", "Retain As Published 0: live RETAIN 1 message forwarded with RETAIN 0"),
       ("v5 MQTT-3.3.1-13", "Retain As Published 1: live messages forwarded with the publisher's RETAIN flag (1 and 0)"))
def _(c):
    t = c.topic("rap")
    c.retain(t)
    s0 = c.paho("s0", v5=True)
    s0.connect()
    s0.sub(t, options=SubscribeOptions(qos=1, retainAsPublished=False))
    s1 = c.paho("s1", v5=True)
    s1.connect()
    s1.sub(t, options=SubscribeOptions(qos=1, retainAsPublished=True))
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"retained", 1, retain=True)
    p.pub(t, b"plain", 1, retain=False)
    g0 = [(m.payload, m.retain) for m in s0.take(2)]
    g1 = [(m.payload, m.retain) for m in s1.take(2)]
    r0 = None if g0 == [(b"retained", 0), (b"plain", 0)] else "received %s" % g0
    r1 = None if g1 == [(b"retained", 1), (b"plain", 0)] else "received %s" % g1
    return [r0, r1]


def retained_setup(c, v5=True):
    t = c.topic("rh")
    c.retain(t)
    p = c.paho("p", v5=v5)
    p.connect()
    p.pub(t, b"retained", 1, retain=True)
    return t, p


def next_payloads(s, quiet=0.3):
    return [(m.payload, m.retain) for m in [s.get(3)] + s.quiet(quiet) if m is not None]


@check("v5 MQTT-3.3.1-9", "Retain Handling 0: retained message sent on every SUBSCRIBE, also when the subscription exists")
def _(c):
    t, p = retained_setup(c)
    s = c.paho("s", v5=True)
    s.connect()
    for i in range(2):
        s.sub(t, options=SubscribeOptions(qos=1, retainHandling=0))
        m = s.wait(t)
        expect(m.payload == b"retained" and m.retain, "SUBSCRIBE #%d: got %r retain %d" % (i + 1, m.payload, m.retain))


@check("v5 MQTT-3.3.1-10", "Retain Handling 1: retained sent for a new subscription only, not when it already exists")
def _(c):
    t, p = retained_setup(c)
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(t, options=SubscribeOptions(qos=1, retainHandling=1))
    m = s.wait(t)
    expect(m.payload == b"retained" and m.retain, "new subscription: got %r retain %d" % (m.payload, m.retain))
    s.sub(t, options=SubscribeOptions(qos=1, retainHandling=1))
    p.pub(t, b"live", 1)
    got = next_payloads(s)
    expect(got == [(b"live", 0)], "after the repeated SUBSCRIBE received %s" % got)


@check("v5 MQTT-3.3.1-11", "Retain Handling 2: retained message not sent at SUBSCRIBE; live messages still are")
def _(c):
    t, p = retained_setup(c)
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(t, options=SubscribeOptions(qos=1, retainHandling=2))
    p.pub(t, b"live", 1)
    got = next_payloads(s)
    expect(got == [(b"live", 0)], "received %s" % got)


# ---------------------------------------------------------------- topics


@check("MQTT-4.7.2-1", "$-topic accepted (PUBACK) but not matched by filters starting with a wildcard (#, +/x, +/#)")
def _(c):
    dollar = "$%s%03d/x" % (RUN, c.idx)
    plain = "%s%03ds/x" % (RUN, c.idx)
    subs = []
    for i, f in enumerate(("#", "+/x", "+/#")):
        s = c.paho("s%d" % i)
        s.connect()
        s.sub(f, 1)
        subs.append((f, s))
    p = c.paho("p")
    p.connect()
    p.pub(dollar, b"dollar", 1)
    p.pub(plain, b"plain", 1)
    bad = []
    for f, s in subs:
        mine = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and plain not in mine:
            m = s.get(0.2)
            if m is not None and m.topic in (dollar, plain):
                mine.append(m.topic)
        mine += [m.topic for m in s.quiet(0.2) if m.topic in (dollar, plain)]
        if dollar in mine:
            bad.append("%s matched %s" % (f, dollar))
        if plain not in mine:
            bad.append("%s did not match %s" % (f, plain))
    expect(not bad, "; ".join(bad))


def matching(c, cases, v5=False):
    """cases: [(filter, topic, should_match)]; one subscriber per filter."""
    subs = {}
    for f in sorted({f for f, _, _ in cases}):
        s = c.paho("s%d" % len(subs), v5=v5)
        s.connect()
        codes = s.sub(f, 1)
        expect(codes[0] in (0, 1), "SUBACK 0x%02x for %r" % (codes[0], f))
        subs[f] = s
    p = c.paho("p", v5=v5)
    p.connect()
    topics = sorted({t for _, t, _ in cases})
    for t in topics:
        p.pub(t, b"m", 1)
    bad = []
    for f, s in subs.items():
        want = {t for ff, t, yes in cases if ff == f and yes}
        notwant = {t for ff, t, yes in cases if ff == f and not yes}
        got = set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not want <= got:
            m = s.get(0.2)
            if m is not None:
                got.add(m.topic)
        got |= {m.topic for m in s.quiet(0.3)}
        for t in sorted(want - got):
            bad.append("%r did not match %r" % (f, t))
        for t in sorted(notwant & got):
            bad.append("%r matched %r" % (f, t))
    expect(not bad, "; ".join(bad))


@check("§4.7.1.2", "'sport/#' matches sport, sport/tennis, sport/tennis/player1 but not sports")
def _(c):
    f = c.topic("sport/#")
    matching(c, [(f, c.topic("sport"), True), (f, c.topic("sport/tennis"), True),
                 (f, c.topic("sport/tennis/player1"), True), (f, c.topic("sports"), False)])


@check("§4.7.1.3", "'+' matches exactly one level, including an empty one: sport/tennis/+ and sport/+")
def _(c):
    f1 = c.topic("sport/tennis/+")
    f2 = c.topic("sport/+")
    matching(c, [(f1, c.topic("sport/tennis/player1"), True), (f1, c.topic("sport/tennis/player1/ranking"), False),
                 (f1, c.topic("sport/tennis"), False), (f2, c.topic("sport/"), True), (f2, c.topic("sport"), False),
                 (f2, c.topic("sport/tennis"), True)])


@check("v5 §4.7.1.3", "empty levels: '/finance' matched by '+/+' and '/+', not by '+'")
def _(c):
    t = "/%s%03dfinance" % (RUN, c.idx)
    matching(c, [("+/+", t, True), ("/+", t, True), ("+", t, False)], v5=True)


@check("MQTT-4.7.3-4", "matching is case sensitive and without normalization (ACCOUNTS≠Accounts, é≠e+U+0301)")
def _(c):
    f = c.topic("ACCOUNTS")
    g = c.topic("caf\u00e9")
    matching(c, [(f, c.topic("ACCOUNTS"), True), (f, c.topic("Accounts"), False), (f, c.topic("accounts"), False),
                 (g, c.topic("caf\u00e9"), True), (g, c.topic("cafe\u0301"), False)])


# ---------------------------------------------------------------- sessions


@check("MQTT-3.2.2-2", "3.1.1 clean session 0: new session has session present 0, resumed one 1 with its subscription [MQTT-3.1.2-4]")
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(4, cid)
    s = P(c, cid, clean=False)
    sp, _ = s.connect()
    expect(not sp, "session present 1 for a new session [MQTT-3.2.2-3]")
    s.sub(t, 1)
    s.close()
    s2 = P(c, cid, clean=False)
    sp, _ = s2.connect()
    expect(sp, "session present 0 on resume")
    p = c.paho("p")
    p.connect()
    p.pub(t, b"to-resumed", 1)
    s2.wait(t, payload=b"to-resumed")


@check("MQTT-3.1.2-5", "3.1.1 clean session 0: QoS 1 and QoS 2 messages published while offline delivered on resume")
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(4, cid)
    s = P(c, cid, clean=False)
    s.connect()
    s.sub(t, 2)
    s.close()
    p = c.paho("p")
    p.connect()
    p.pub(t, b"off-q1", 1)
    p.pub(t, b"off-q2", 2)
    s2 = P(c, cid, clean=False)
    sp, _ = s2.connect()
    expect(sp, "session present 0")
    got = sorted((m.payload, m.qos) for m in s2.take(2))
    expect(got == [(b"off-q1", 1), (b"off-q2", 2)], "received %s" % got)


@check("MQTT-3.1.2-6", "3.1.1 clean session 1 discards the stored session (subscriptions gone, session present 0 afterwards)")
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(4, cid)
    s = P(c, cid, clean=False)
    s.connect()
    s.sub(t, 1)
    s.close()
    s2 = P(c, cid, clean=True)
    sp, _ = s2.connect()
    expect(not sp, "session present 1 with clean session 1 [MQTT-3.2.2-1]")
    s2.close()
    s3 = P(c, cid, clean=False)
    sp, _ = s3.connect()
    expect(not sp, "session present 1: the old session survived the clean session")
    p = c.paho("p")
    p.connect()
    p.pub(t, b"x", 1)
    got = s3.quiet(0.5)
    expect(not got, "old subscription still delivered %s" % [m.payload for m in got])


@multi(("MQTT-4.4.0-1", "3.1.1 unacknowledged QoS 1 message resent on resume (clean session 0) with its original Packet Identifier"),
       ("MQTT-3.3.1-1", "3.1.1 the resent PUBLISH has DUP 1"))
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(4, cid)
    r, _ = c.raw_connect(4, cid, clean=False, keepalive=60)
    r.send(subscribe_pkt(4, 1, [(t, 1)]))
    r.expect(SUBACK)
    p = c.paho("p")
    p.connect()
    p.pub(t, b"unacked", 1)
    m = r.expect(PUBLISH)
    expect(m.qos == 1 and not m.dup, "first delivery %r" % m)
    r.close()
    time.sleep(0.2)
    r2, a = c.raw_connect(4, cid, clean=False, keepalive=60)
    expect(a.sp == 1, "session present 0")
    m2 = r2.expect(PUBLISH)
    r2.send(ack_pkt(PUBACK, m2.pid))
    expect(m2.payload == b"unacked", "resent %r" % m2)
    return [None if m2.pid == m.pid else "resent with pid %d, first had pid %d" % (m2.pid, m.pid),
            None if m2.dup == 1 else "resent %r with DUP 0" % m2]


@multi(("v5 MQTT-4.4.0-1", "MQTT 5 unacknowledged QoS 1 message resent on resume (Clean Start 0) with its original Packet Identifier"),
       ("v5 MQTT-3.3.1-1", "MQTT 5 the resent PUBLISH has DUP 1"),
       ("v5 MQTT-4.4.0-1", "MQTT 5 QoS 2 flow interrupted after PUBREC: PUBREL resent on resume with the same id"))
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(5, cid)
    props = [(P_SESSION_EXPIRY, 60)]
    r, _ = c.raw_connect(5, cid, keepalive=60, props=props)
    r.send(subscribe_pkt(5, 1, [(t, 2)]))
    r.expect(SUBACK)
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"unacked", 1)
    m = r.expect(PUBLISH)
    expect(m.qos == 1 and not m.dup, "first delivery %r" % m)
    r.close()
    time.sleep(0.2)
    r2, a = c.raw_connect(5, cid, clean=False, keepalive=60, props=props)
    expect(a.sp == 1, "session present 0")
    m2 = r2.expect(PUBLISH)
    r2.send(ack_pkt(PUBACK, m2.pid))
    expect(m2.payload == b"unacked", "resent %r" % m2)
    res = [None if m2.pid == m.pid else "resent with pid %d, first had pid %d" % (m2.pid, m.pid),
           None if m2.dup == 1 else "resent %r with DUP 0" % m2]
    p.pub(t, b"half-done", 2)
    m = r2.expect(PUBLISH)
    r2.send(ack_pkt(PUBREC, m.pid))
    rel = r2.expect(PUBREL)
    r2.close()
    time.sleep(0.2)
    r3, a = c.raw_connect(5, cid, clean=False, keepalive=60, props=props)
    x = r3.recv(3)
    if x is not None and x.type == PUBREL:
        r3.send(ack_pkt(PUBCOMP, x.pid))
    if not a.sp:
        res.append("session present 0")
    elif x is None:
        res.append("nothing resent (PUBREL pid %d pending)" % rel.pid)
    elif x.type != PUBREL or x.pid != rel.pid:
        res.append("resent %r, expected PUBREL(pid=%d)" % (x, rel.pid))
    else:
        res.append(None)
    return res


@check("v5 MQTT-3.1.2-23", "MQTT 5 Session Expiry 60: session kept after disconnect, offline QoS 1 message delivered on resume")
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(5, cid)
    s = P(c, cid, v5=True)
    s.connect(props=pprops(PacketTypes.CONNECT, SessionExpiryInterval=60))
    s.sub(t, 1)
    s.close()
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"offline", 1)
    s2 = P(c, cid, v5=True)
    sp, _ = s2.connect(clean_start=False, props=pprops(PacketTypes.CONNECT, SessionExpiryInterval=60))
    expect(sp, "session present 0 [v5 MQTT-3.2.2-3]")
    s2.wait(t, payload=b"offline")


@check("v5 MQTT-3.1.2-4", "MQTT 5 Clean Start 1 discards the existing session: session present 0, queued messages dropped")
def _(c):
    t = c.topic("t")
    cid = c.cid("ps")
    c.session(5, cid)
    s = P(c, cid, v5=True)
    s.connect(props=pprops(PacketTypes.CONNECT, SessionExpiryInterval=60))
    s.sub(t, 1)
    s.close()
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"queued", 1)
    s2 = P(c, cid, v5=True)
    sp, _ = s2.connect(clean_start=True, props=pprops(PacketTypes.CONNECT, SessionExpiryInterval=60))
    expect(not sp, "session present 1 with Clean Start 1")
    got = s2.quiet(0.5)
    expect(not got, "messages of the discarded session delivered: %s" % [m.payload for m in got])


@check("v5 §3.1.2.11.2", "MQTT 5 Session Expiry absent (0): session ends at disconnect, session present 0 on reconnect")
def _(c):
    cid = c.cid("ps")
    s = P(c, cid, v5=True)
    s.connect()
    s.sub(c.topic("t"), 1)
    s.close()
    s2 = P(c, cid, v5=True)
    sp, _ = s2.connect(clean_start=False)
    expect(not sp, "session present 1")


@check("v5 §3.14.2.2.2", "DISCONNECT with Session Expiry 0 ends a session that had Session Expiry 60")
def _(c):
    cid = c.cid("ps")
    c.session(5, cid)
    r, _ = c.raw_connect(5, cid, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    r.send(subscribe_pkt(5, 1, [(c.topic("t"), 1)]))
    r.expect(SUBACK)
    r.send(disconnect_pkt(5, 0, props=[(P_SESSION_EXPIRY, 0)]))
    r.until_closed(2)
    r2, a = c.raw_connect(5, cid, clean=False, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    expect(a.sp == 0, "session present 1")


@multi(("v5 MQTT-4.1.0-2", "Session Expiry 1 s: session discarded once the interval has passed (session present 0 after 2 s)"),
       ("v5 §3.14.2.2.2", "DISCONNECT raising Session Expiry from 1 s to 60 s keeps the session past 1 s"))
def _(c):
    a, b = c.cid("ex"), c.cid("up")
    c.session(5, a)
    c.session(5, b)
    ra, _ = c.raw_connect(5, a, keepalive=60, props=[(P_SESSION_EXPIRY, 1)])
    rb, _ = c.raw_connect(5, b, keepalive=60, props=[(P_SESSION_EXPIRY, 1)])
    for r in (ra, rb):
        r.send(subscribe_pkt(5, 1, [(c.topic("t"), 1)]))
        r.expect(SUBACK)
    ra.send(disconnect_pkt(5))
    rb.send(disconnect_pkt(5, 0, props=[(P_SESSION_EXPIRY, 60)]))
    time.sleep(2.2)
    _, aa = c.raw_connect(5, a, clean=False, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    _, ab = c.raw_connect(5, b, clean=False, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    return [None if aa.sp == 0 else "session present 1 after 2.2 s",
            None if ab.sp == 1 else "session present 0: session ended despite the DISCONNECT's Session Expiry 60"]


# ---------------------------------------------------------------- message expiry


@check("v5 MQTT-3.3.2-6", "Message Expiry Interval forwarded (≤ the published 60) to an online subscriber; absent if not set")
def _(c):
    t = c.topic("t")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(t, 1)
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"exp", 1, props=pprops(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    p.pub(t, b"noexp", 1)
    a, b = s.take(2)
    e = props_of(a, "MessageExpiryInterval")
    expect(e is not None and 0 < e <= 60, "Message Expiry Interval %r" % e)
    expect(props_of(b, "MessageExpiryInterval") is None, "expiry %r added" % props_of(b, "MessageExpiryInterval"))


@multi(("v5 MQTT-3.3.2-5", "expired messages not delivered: offline queue (expiry 1 s) and retained (expiry 1 s) after 2 s"),
       ("v5 MQTT-3.3.2-6", "queued message with expiry 10 s delivered after 2 s with the interval reduced by the wait"))
def _(c):
    t = c.topic("t")
    rt = c.topic("ret")
    cid = c.cid("ps")
    c.session(5, cid)
    c.retain(rt)
    r, _ = c.raw_connect(5, cid, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    r.send(subscribe_pkt(5, 1, [(t, 1)]))
    r.expect(SUBACK)
    r.send(disconnect_pkt(5))
    r.until_closed(2)
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"short", 1, props=pprops(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    p.pub(t, b"long", 1, props=pprops(PacketTypes.PUBLISH, MessageExpiryInterval=10))
    p.pub(rt, b"ret-short", 1, retain=True, props=pprops(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    time.sleep(2.2)
    r2, a = c.raw_connect(5, cid, clean=False, keepalive=60, props=[(P_SESSION_EXPIRY, 60)])
    r2.send(subscribe_pkt(5, 2, [(rt, 1)]))
    got = []
    while True:
        x = r2.recv(0.8)
        if x is None:
            break
        if x.type == PUBLISH:
            got.append(x)
            if x.qos:
                r2.send(ack_pkt(PUBACK, x.pid))
    payloads = [x.payload for x in got]
    e1 = []
    if b"short" in payloads:
        e1.append("offline message with expiry 1 s delivered after 2.2 s")
    if b"ret-short" in payloads:
        e1.append("retained message with expiry 1 s delivered after 2.2 s")
    if not a.sp:
        e1.append("session present 0")
    longs = [x for x in got if x.payload == b"long"]
    if not longs:
        e2 = "message with expiry 10 s not delivered (received %s)" % payloads
    else:
        e = longs[0].props.get(P_MESSAGE_EXPIRY)
        e2 = None if e is not None and 1 <= e <= 8 else "Message Expiry Interval %r after a 2.2 s wait (published 10)" % e
    return ["; ".join(e1) or None, e2]


# ---------------------------------------------------------------- topic aliases


@check("v5 MQTT-3.3.2-12", "client→server Topic Aliases 1..64 accepted: set, reuse with empty topic, remap")
def _(c):
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(c.topic("#"), 1)
    r, _ = c.raw_connect(5, c.cid("p"))
    t1, t2 = c.topic("one"), c.topic("two")
    seq = [(t1, 1, b"1"), ("", 1, b"2"), (t2, 64, b"3"), ("", 64, b"4"), (t2, 1, b"5"), ("", 1, b"6")]
    for i, (topic, alias, payload) in enumerate(seq):
        r.send(publish_pkt(5, topic, payload, qos=1, pid=i + 1, props=[(P_TOPIC_ALIAS, alias)]))
        a = r.expect(PUBACK)
        expect(a.reason < 0x80, "PUBACK reason 0x%02x for %r" % (a.reason, payload))
    got = [(m.topic, m.payload) for m in s.take(6)]
    want = [(t1, b"1"), (t1, b"2"), (t2, b"3"), (t2, b"4"), (t2, b"5"), (t2, b"6")]
    expect(got == want, "received %s" % got)


@check("v5 MQTT-3.3.2-8", "PUBLISH with Topic Alias 0: DISCONNECT 0x94 (Topic Alias invalid), connection closed")
def _(c):
    closes_after(c, 5, publish_pkt(5, c.topic("t"), b"x", qos=1, pid=1, props=[(P_TOPIC_ALIAS, 0)]),
                 forbid=(PUBACK,), disconnect=0x94)


@check("v5 MQTT-3.2.2-17", "PUBLISH with Topic Alias 65 > Topic Alias Maximum 64: DISCONNECT 0x94, connection closed")
def _(c):
    closes_after(c, 5, publish_pkt(5, c.topic("t"), b"x", qos=1, pid=1, props=[(P_TOPIC_ALIAS, 65)]),
                 forbid=(PUBACK,), disconnect=0x94)


@check("v5 §3.3.2.3.4", "empty Topic Name with an unmapped Topic Alias: DISCONNECT 0x82 (Protocol Error)")
def _(c):
    closes_after(c, 5, publish_pkt(5, "", b"x", qos=1, pid=1, props=[(P_TOPIC_ALIAS, 5)]),
                 forbid=(PUBACK,), disconnect=0x82)


@check("v5 MQTT-3.3.2-7", "Topic Alias mappings do not carry over to a new connection: empty topic + old alias → 0x82")
def _(c):
    cid = c.cid("p")
    r, _ = c.raw_connect(5, cid)
    r.send(publish_pkt(5, c.topic("t"), b"x", qos=1, pid=1, props=[(P_TOPIC_ALIAS, 3)]))
    r.expect(PUBACK)
    r.send(disconnect_pkt(5))
    r.until_closed(2)
    r2, _ = c.raw_connect(5, cid)
    r2.send(publish_pkt(5, "", b"y", qos=1, pid=2, props=[(P_TOPIC_ALIAS, 3)]))
    expect_closed(r2, forbid=(PUBACK,), disconnect=0x82)


@check("v5 MQTT-3.3.2-11", "server→client Topic Aliases stay within the client's Topic Alias Maximum (2) and resolve correctly")
def _(c):
    r, _ = c.raw_connect(5, c.cid("s"), props=[(P_TOPIC_ALIAS_MAX, 2)])
    r.send(subscribe_pkt(5, 1, [(c.topic("#"), 1)]))
    r.expect(SUBACK)
    p = c.paho("p", v5=True)
    p.connect()
    topics = [c.topic("t%d" % i) for i in range(4)]
    sent = []
    for k in range(3):
        for t in topics:
            p.pub(t, b"%d" % len(sent), 1)
            sent.append(t)
    amap = {}
    bad = []
    for _ in sent:
        m = r.expect(PUBLISH)
        r.send(ack_pkt(PUBACK, m.pid))
        alias = m.props.get(P_TOPIC_ALIAS)
        topic = m.topic
        if alias is not None:
            expect(1 <= alias <= 2, "Topic Alias %d > client maximum 2 [v5 MQTT-3.1.2-26]" % alias)
            if topic:
                amap[alias] = topic
            else:
                expect(alias in amap, "empty Topic Name with unmapped alias %d" % alias)
                topic = amap[alias]
        expect(topic, "empty Topic Name without a Topic Alias")
        want = sent[int(m.payload)]
        if topic != want:
            bad.append("message %s resolved to %s, published to %s" % (m.payload, topic, want))
    expect(not bad, "; ".join(bad))


@check("v5 MQTT-3.1.2-27", "client without Topic Alias Maximum: server sends no Topic Alias")
def _(c):
    r, _ = c.raw_connect(5, c.cid("s"))
    r.send(subscribe_pkt(5, 1, [(c.topic("t"), 0)]))
    r.expect(SUBACK)
    p = c.paho("p", v5=True)
    p.connect()
    for i in range(6):
        p.pub(c.topic("t"), b"%d" % i, 0)
    for _ in range(6):
        m = r.expect(PUBLISH)
        expect(P_TOPIC_ALIAS not in m.props and m.topic == c.topic("t"), "got %r with props %s" % (m, m.props))


# ---------------------------------------------------------------- flow control


@check("v5 §3.3.4", "client exceeding the server's Receive Maximum (1025 unreleased QoS 2): DISCONNECT 0x93 [v5 MQTT-3.3.4-7]")
def _(c):
    r, a = c.raw_connect(5, c.cid("p"))
    rm = a.props.get(P_RECEIVE_MAX, 65535)
    expect(rm <= 2048, "Receive Maximum %d too large to test" % rm)
    t = c.topic("rm")
    r.send(b"".join(publish_pkt(5, t, b"x", qos=2, pid=i) for i in range(1, rm + 1)))
    n = 0
    while n < rm:
        x = r.recv(5)
        expect(x is not None, "only %d PUBRECs for %d QoS 2 PUBLISHes" % (n, rm))
        expect(x.type == PUBREC, "got %r after %d PUBRECs" % (x, n))
        n += 1
    r.send(publish_pkt(5, t, b"x", qos=2, pid=rm + 1))
    expect_closed(r, forbid=(PUBREC,), disconnect=0x93)


@check("v5 MQTT-3.3.4-9", "server honours the client's Receive Maximum 2: at most 2 unacknowledged QoS 1 PUBLISHes")
def _(c):
    t = c.topic("t")
    r, _ = c.raw_connect(5, c.cid("s"), props=[(P_RECEIVE_MAX, 2)])
    r.send(subscribe_pkt(5, 1, [(t, 1)]))
    r.expect(SUBACK)
    p = c.paho("p", v5=True)
    p.connect()
    for i in range(5):
        p.pub(t, b"%d" % i, 1)

    def drain(n, quiet=0.5):
        """n PUBLISHes (3 s at most), then whatever else comes within `quiet`."""
        out = []
        deadline = time.monotonic() + 3.0
        while len(out) < n:
            x = r.recv(max(0.0, deadline - time.monotonic()))
            if x is None:
                break
            expect(x.type == PUBLISH, "got %r" % x)
            out.append(x)
        while True:
            x = r.recv(quiet)
            if x is None:
                return out
            expect(x.type == PUBLISH, "got %r" % x)
            out.append(x)
    first = drain(2)
    expect(len(first) == 2, "%d PUBLISHes in flight before any PUBACK (Receive Maximum 2)" % len(first))
    r.send(ack_pkt(PUBACK, first[0].pid))
    second = drain(1)
    expect(len(second) == 1, "%d more PUBLISHes after one PUBACK" % len(second))
    r.send(ack_pkt(PUBACK, first[1].pid) + ack_pkt(PUBACK, second[0].pid))
    rest = drain(2, quiet=0.2)
    for x in rest:
        r.send(ack_pkt(PUBACK, x.pid))
    got = [int(x.payload) for x in first + second + rest]
    expect(got == list(range(5)), "received %s" % got)


# ---------------------------------------------------------------- maximum packet size


@check("v5 MQTT-3.1.2-25", "client Maximum Packet Size 256: larger message not sent (skipped), next small one delivered [v5 MQTT-3.1.2-24]")
def _(c):
    t = c.topic("t")
    r, _ = c.raw_connect(5, c.cid("s"), props=[(P_MAX_PACKET, 256)])
    r.send(subscribe_pkt(5, 1, [(t, 1)]))
    r.expect(SUBACK)
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(t, b"B" * 1000, 1)
    p.pub(t, b"small", 1)
    got = []
    deadline = time.monotonic() + 3.0
    while not [x for x in got if x.type == PUBLISH and x.payload == b"small"]:
        x = r.recv(max(0.0, deadline - time.monotonic()))
        if x is None:
            break
        got.append(x)
        if x.type == PUBLISH:
            r.send(ack_pkt(PUBACK, x.pid))
    while True:
        x = r.recv(0.3)
        if x is None:
            break
        got.append(x)
    big = [x for x in got if x.size > 256]
    expect(not big, "received packets larger than 256 bytes: %s" % big)
    expect([x.payload for x in got if x.type == PUBLISH] == [b"small"], "received %s" % got)


@check("v5 MQTT-3.2.2-15", "PUBLISH larger than the server's Maximum Packet Size (2097152): DISCONNECT 0x95, closed")
def _(c):
    r, a = c.raw_connect(5, c.cid("p"))
    mps = a.props.get(P_MAX_PACKET)
    expect(mps, "no Maximum Packet Size in CONNACK")
    t = utf8(c.topic("big")) + u16(1) + b"\x00"
    rem = mps  # whole packet = 1 + len(vbi) + rem > mps
    head = b"\x32" + vbi(rem) + t
    first = head + b"\x00" * 1000
    r.send(first)
    closed, got = r.until_closed(1.5)
    if not closed and not got:
        left = rem - (len(first) - 1 - len(vbi(rem)))
        chunk = b"\x00" * 65536
        while left > 0 and r.send(chunk[:min(left, 65536)]):
            left -= 65536
        closed, more = r.until_closed(3)
        got += more
    expect(not [x for x in got if x.type == PUBACK], "oversized PUBLISH acknowledged")
    expect(closed, "connection still open")
    ds = [x for x in got if x.type == DISCONNECT]
    expect(ds and ds[0].reason == 0x95, "closed with %s instead of DISCONNECT 0x95" % (got or "nothing"))


@check("v5 §3.2.2.3.6", "PUBLISH of exactly the server's Maximum Packet Size accepted (PUBACK)")
def _(c):
    r, a = c.raw_connect(5, c.cid("p"))
    mps = a.props.get(P_MAX_PACKET)
    expect(mps, "no Maximum Packet Size in CONNACK")
    t = utf8(c.topic("edge")) + u16(1) + b"\x00"
    rem = mps - 1 - 4
    r.send(b"\x32" + vbi(rem) + t + b"\x00" * (rem - len(t)))
    a = r.expect(PUBACK, 10)
    expect(a.reason < 0x80, "PUBACK reason 0x%02x" % a.reason)


# ---------------------------------------------------------------- subscription ids, options


@check("v5 MQTT-3.3.4-3", "Subscription Identifier (7) sent with matching messages; none for a subscription without one")
def _(c):
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(c.topic("a"), options=SubscribeOptions(qos=1), props=pprops(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    s.sub(c.topic("b"), 1)
    p = c.paho("p", v5=True)
    p.connect()
    p.pub(c.topic("a"), b"a", 1)
    ma = s.wait(c.topic("a"))
    p.pub(c.topic("b"), b"b", 1)
    mb = s.wait(c.topic("b"))
    expect(props_of(ma, "SubscriptionIdentifier") == [7], "ids %r" % props_of(ma, "SubscriptionIdentifier"))
    expect(not props_of(mb, "SubscriptionIdentifier"), "ids %r" % props_of(mb, "SubscriptionIdentifier"))


@check("v5 MQTT-3.8.3-3", "No Local 1: own messages not delivered back; other clients' messages are (and No Local 0 delivers own)")
def _(c):
    t = c.topic("nl")
    x = c.paho("x", v5=True)
    x.connect()
    x.sub(t, options=SubscribeOptions(qos=1, noLocal=True))
    y = c.paho("y", v5=True)
    y.connect()
    y.sub(t, options=SubscribeOptions(qos=1, noLocal=False))
    x.pub(t, b"from-x", 1)
    y.pub(t, b"from-y", 1)
    gx = sorted(m.payload for m in x.take(1) + x.quiet(0.4))
    gy = sorted(m.payload for m in y.take(2) + y.quiet(0.2))
    expect(gx == [b"from-y"], "No Local subscriber received %s" % gx)
    expect(gy == [b"from-x", b"from-y"], "No Local 0 subscriber received %s" % gy)


@check("v5 MQTT-3.8.3-4", "No Local 1 on a Shared Subscription is a Protocol Error: connection closed")
def _(c):
    closes_after(c, 5, subscribe_pkt(5, 1, [("$share/g%s/%s" % (RUN, c.topic("t")), 0x05)]), forbid=(SUBACK,))


@check("v5 MQTT-3.3.2-15", "Response Topic, Correlation Data, Content Type, Payload Format Indicator forwarded unaltered [-16, -20, -4]")
def _(c):
    t = c.topic("req")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(t, 1)
    p = c.paho("p", v5=True)
    p.connect()
    corr = b"\x00\xffcorr\x01"
    p.pub(t, "héllo".encode(), 1, props=pprops(PacketTypes.PUBLISH, ResponseTopic=c.topic("resp/1"),
                                               CorrelationData=corr, ContentType="application/json; charset=utf-8",
                                               PayloadFormatIndicator=1))
    m = s.wait(t)
    got = (props_of(m, "ResponseTopic"), props_of(m, "CorrelationData"), props_of(m, "ContentType"),
           props_of(m, "PayloadFormatIndicator"))
    want = (c.topic("resp/1"), corr, "application/json; charset=utf-8", 1)
    expect(got == want, "got %s, expected %s" % (got, want))


@check("v5 MQTT-3.3.2-18", "User Properties forwarded unaltered and in order, repeated names included [v5 MQTT-3.3.2-17]")
def _(c):
    t = c.topic("up")
    s = c.paho("s", v5=True)
    s.connect()
    s.sub(t, 1)
    p = c.paho("p", v5=True)
    p.connect()
    ups = [("k", "v1"), ("x", "y"), ("k", "v2"), ("", "empty-name"), ("ünï", "çødé"), ("a", "")]
    p.pub(t, b"x", 1, props=pprops(PacketTypes.PUBLISH, UserProperty=ups))
    m = s.wait(t)
    got = props_of(m, "UserProperty", [])
    expect(got == ups, "got %s" % got)


@check("v5 §4.8.2", "Shared Subscription: each message to exactly one of 2 group members; a plain subscriber gets all")
def _(c):
    t = c.topic("sh")
    share = "$share/g%s%03d/%s" % (RUN, c.idx, t)
    members = []
    for i in range(2):
        m = c.paho("m%d" % i, v5=True)
        m.connect()
        codes = m.sub(share, 1)
        expect(codes[0] in (0, 1), "SUBACK 0x%02x for %s" % (codes[0], share))
        members.append(m)
    plain = c.paho("n", v5=True)
    plain.connect()
    plain.sub(t, 1)
    p = c.paho("p", v5=True)
    p.connect()
    n = 20
    for i in range(n):
        p.pub(t, b"%d" % i, 1)
    allp = sorted(int(m.payload) for m in plain.take(n))
    expect(allp == list(range(n)), "plain subscriber received %s" % allp)
    got = []
    deadline = time.monotonic() + 3.0
    while len(got) < n and time.monotonic() < deadline:
        for m in members:
            x = m.get(0.05)
            if x is not None:
                got.append(int(x.payload))
    for m in members:
        got += [int(x.payload) for x in m.quiet(0.3)]
    expect(sorted(got) == list(range(n)), "group received %s" % sorted(got))


# ----------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------


def main():
    global HOST, PORT, VERBOSE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--only", action="append", default=[],
                    help="run only the checks whose label or description contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the checks and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="show raw packets received")
    args = ap.parse_args()
    HOST, PORT, VERBOSE = args.host, args.port, args.verbose

    if args.list:
        for pairs, _ in CHECKS:
            for label, desc in pairs:
                print("[%s] %s" % (label, desc))
        return 0

    try:
        socket.create_connection((HOST, PORT), timeout=3).close()
    except OSError as e:
        print("cannot reach the broker at %s:%d: %s" % (HOST, PORT, e))
        return 2

    selected = []
    for idx, (pairs, fn) in enumerate(CHECKS):
        if args.only and not any(o in label or o in desc for o in args.only for label, desc in pairs):
            continue
        selected.append((idx, pairs, fn))
    if not selected:
        print("no check matches %s" % args.only)
        return 2

    passed = failed = 0
    start = time.monotonic()
    for idx, pairs, fn in selected:
        ctx = Ctx(idx)
        t0 = time.monotonic()
        try:
            res = fn(ctx)
            errors = list(res) if isinstance(res, (list, tuple)) else [None] * len(pairs)
            if len(errors) != len(pairs):
                errors = ["check returned %d results for %d statements" % (len(errors), len(pairs))] * len(pairs)
        except Fail as e:
            errors = [str(e)] * len(pairs)
        except Exception as e:
            detail = traceback.format_exc(limit=3).strip().splitlines()[-1]
            errors = ["error: %s (%s)" % (e.__class__.__name__, detail)] * len(pairs)
        finally:
            ctx.cleanup()
        dt = time.monotonic() - t0
        for (label, desc), err in zip(pairs, errors):
            if err is None:
                passed += 1
                print("PASS [%s] %s" % (label, desc) + ("  (%.2fs)" % dt if VERBOSE else ""))
            else:
                failed += 1
                print("FAIL [%s] %s: %s" % (label, desc, err))
        sys.stdout.flush()
    total = passed + failed
    print("SUMMARY: %d checks, %d passed, %d failed (%.1fs, run %s)" % (
        total, passed, failed, time.monotonic() - start, RUN))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
