//! Open MQTT connections, counted from the kernel's socket table at each scrape.
//!
//! rumqttd 0.20 keeps a connection count in its router meters, but sends them only on a
//! timer that its own `Broker::start` spawns; sluice builds the router itself and cannot
//! trigger it. The kernel knows anyway: every established TCP socket whose local port is
//! one of the listeners' is a client connection. Linux only (`/proc/net/tcp{,6}`);
//! elsewhere the gauge has no series.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};

/// A Prometheus collector: `sluice_mqtt_connections{listener}`.
pub struct Connections {
    listeners: Vec<(&'static str, u16)>,
    gauge: IntGaugeVec,
}

impl Connections {
    /// `listeners`: (label, port) of each MQTT listener.
    pub fn new(listeners: Vec<(&'static str, u16)>) -> prometheus::Result<Connections> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "sluice_mqtt_connections",
                "Open MQTT client connections, by listener (established TCP sockets on its port)",
            ),
            &["listener"],
        )?;
        Ok(Connections { listeners, gauge })
    }
}

/// Established sockets per local port in a `/proc/net/tcp`-format table.
fn established_on(table: &str, port: u16) -> i64 {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1).unwrap_or_default();
            let state = fields.nth(1).unwrap_or_default();
            state == "01"
                && local
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count() as i64
}

impl Collector for Connections {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect();
        if tables.is_empty() {
            return Vec::new();
        }
        for (listener, port) in &self.listeners {
            let open: i64 = tables.iter().map(|t| established_on(t, *port)).sum();
            self.gauge.with_label_values(&[listener]).set(open);
        }
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_sockets_on_the_listener_port_only() {
        let table = "  sl  local_address rem_address   st tx_queue\n\
            0: 00000000:075B 00000000:0000 0A 00000000:00000000\n\
            1: 0100007F:075B 0100007F:AF93 01 00000000:00000000\n\
            2: 0100007F:075B 0100007F:AF94 01 00000000:00000000\n\
            3: 0100007F:AF93 0100007F:075B 01 00000000:00000000\n\
            4: 0100007F:075B 0100007F:AF95 06 00000000:00000000\n";
        // 0x075B = 1883: the listening socket (0A), two clients (01), the client side of
        // a connection (remote port 1883) and one closing (06).
        assert_eq!(established_on(table, 1883), 2);
        assert_eq!(established_on(table, 1884), 0);
    }
}
