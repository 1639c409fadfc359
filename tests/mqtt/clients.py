"""paho-mqtt (Eclipse Paho, a client no one here wrote) as a command-line subscriber and
publisher for sluice's end-to-end tests.

    clients.py sub HOST PORT VERSION FILTER COUNT TIMEOUT [tcp|websockets|tls CAFILE]
        prints "subscribed" once the SUBACK came, then "message TOPIC PAYLOAD" per message;
        exits 0 after COUNT messages, 1 on timeout or when the server disconnects it
        (printing "disconnect CODE NAME").
    clients.py pub HOST PORT VERSION TOPIC PAYLOAD QOS [tcp|websockets|tls CAFILE]
        exits 0 once the message is acknowledged (QoS 1) or written (QoS 0).
    clients.py flood HOST PORT VERSION TOPIC PAYLOAD SECONDS
        publishes at QoS 0 as fast as it can for SECONDS; prints "disconnect CODE NAME"
        if the server disconnects it (and exits 0), exits 1 if it never does.

VERSION is 3.1.1 or 5. MQTT_USERNAME and MQTT_PASSWORD (environment), when set, are the
credentials; MQTT_CLIENT_ID, when set, the client id. A refused CONNECT prints "refused CODE NAME" and exits 1; the SUBACK's codes
are printed as "suback CODE..." before "subscribed", the PUBACK's as "puback CODE".
Both connect with keep alive 0 (no keep-alive timeout), except
over WebSocket: paho uses the keep alive as its socket timeout there, and 0 would make
the handshake non-blocking (browser clients use 60 s too).
"""

import os
import sys
import threading
import time

import paho.mqtt.client as mqtt


def client(version, transport, cafile):
    protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=os.environ.get("MQTT_CLIENT_ID") or f"paho-{os.getpid()}-{threading.get_ident()}",
        protocol=protocol,
        transport="websockets" if transport == "websockets" else "tcp",
    )
    if transport == "websockets":
        c.ws_set_options(path="/mqtt")
    if transport == "tls":
        c.tls_set(ca_certs=cafile)
    if os.environ.get("MQTT_USERNAME") is not None:
        c.username_pw_set(os.environ["MQTT_USERNAME"], os.environ.get("MQTT_PASSWORD"))
    return c


def flood(host, port, version, topic, payload, seconds):
    c = client(version, "tcp", None)
    done = threading.Event()

    def on_disconnect(c, userdata, flags, reason_code, properties):
        print(f"disconnect {reason_code.value} {reason_code}", flush=True)
        done.set()

    c.on_disconnect = on_disconnect
    c.connect(host, port, keepalive=0)
    c.loop_start()
    started = time.monotonic()
    while not done.is_set() and time.monotonic() - started < seconds:
        c.publish(topic, payload, qos=0)
        time.sleep(0.0005)
    c.loop_stop()
    sys.exit(0 if done.is_set() else 1)


def main():
    mode, host, port, version = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if mode == "flood":
        flood(host, port, version, sys.argv[5], sys.argv[6], float(sys.argv[7]))
    if mode == "sub":
        topic, count, timeout = sys.argv[5], int(sys.argv[6]), float(sys.argv[7])
        rest = sys.argv[8:]
    else:
        topic, payload, qos = sys.argv[5], sys.argv[6], int(sys.argv[7])
        rest = sys.argv[8:]
    transport = rest[0] if rest else "tcp"
    cafile = rest[1] if len(rest) > 1 else None
    c = client(version, transport, cafile)
    connected = threading.Event()
    done = threading.Event()
    refused = threading.Event()
    received = []

    def on_connect(c, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(f"refused {reason_code.value} {reason_code}", flush=True)
            refused.set()
            connected.set()
            done.set()
            return
        connected.set()
        if mode == "sub":
            c.subscribe(topic, qos=1)

    def on_subscribe(c, userdata, mid, reason_codes, properties):
        print("suback " + " ".join(str(rc.value) for rc in reason_codes), flush=True)
        print("subscribed", flush=True)

    def on_publish(c, userdata, mid, reason_code, properties):
        print(f"puback {reason_code.value}", flush=True)

    def on_disconnect(c, userdata, flags, reason_code, properties):
        # Only the server's: ours comes after `done`.
        if not done.is_set():
            print(f"disconnect {reason_code.value} {reason_code}", flush=True)
            done.set()

    def on_message(c, userdata, message):
        received.append(message.topic)
        print(f"message {message.topic} {message.payload.decode(errors='replace')}", flush=True)
        if len(received) >= count:
            done.set()

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.on_publish = on_publish
    c.on_disconnect = on_disconnect
    c.connect(host, port, keepalive=60 if transport == "websockets" else 0)
    c.loop_start()
    if mode == "sub":
        ok = done.wait(timeout) and len(received) >= count
    else:
        ok = connected.wait(10)
        if ok and not refused.is_set():
            info = c.publish(topic, payload, qos=qos)
            info.wait_for_publish(10)
            ok = info.is_published()
    done.set()
    c.disconnect()
    c.loop_stop()
    sys.exit(0 if ok and not refused.is_set() else 1)


if __name__ == "__main__":
    main()
