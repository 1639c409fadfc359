//! Readiness: a listener is ready when it completes a real MQTT handshake
//! (CONNECT, CONNACK accepted), not merely when its port is open.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Retries an MQTT handshake with `addr` until it succeeds, `within` passes, or
/// `failed` reports that the listener stopped (with its error).
pub(crate) fn wait_until_accepting(
    addr: SocketAddr,
    protocol_level: u8,
    within: Duration,
    mut failed: impl FnMut() -> Option<String>,
) -> Result<(), String> {
    let started = Instant::now();
    let mut last_error = String::from("no attempt made");
    while started.elapsed() < within {
        if let Some(error) = failed() {
            return Err(error);
        }
        match handshake(addr, protocol_level) {
            Ok(()) => return Ok(()),
            Err(e) => last_error = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last_error)
}

fn handshake(addr: SocketAddr, protocol_level: u8) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(&connect_packet(protocol_level))?;
    // CONNACK: type 0x20, remaining length, flags, return/reason code (0 = accepted).
    let mut header = [0u8; 4];
    stream.read_exact(&mut header)?;
    if header[0] != 0x20 || header[3] != 0 {
        return Err(std::io::Error::other(format!(
            "unexpected CONNACK {header:02x?}"
        )));
    }
    // DISCONNECT, so the broker does not log a dropped connection.
    let disconnect: &[u8] = if protocol_level == 5 {
        &[0xe0, 0x01, 0x00]
    } else {
        &[0xe0, 0x00]
    };
    stream.write_all(disconnect)
}

fn connect_packet(protocol_level: u8) -> Vec<u8> {
    // A fresh client id per attempt: rumqttd 0.20 panics (and poisons the listener's
    // will-handler lock) when a client id is reused after a failed link setup.
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let client_id = format!(
        "sluice-ready-probe-{}-{}",
        std::process::id(),
        ATTEMPT.fetch_add(1, Ordering::Relaxed)
    );
    let mut body = Vec::new();
    body.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', protocol_level, 0x02]);
    body.extend_from_slice(&30u16.to_be_bytes()); // keep-alive (0 is refused by rumqttd)
    if protocol_level == 5 {
        body.push(0x00); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}
