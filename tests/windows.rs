//! Windows end to end: the real binary, real MQTT, `telemetry_1m` / `telemetry_late`
//! through SQL and `sluice sql`, and a restart in the middle of a window.

mod common;

use std::time::Duration;

use common::{Sluice, publish, telemetry};
use rumqttc::QoS;

fn send(sluice: &Sluice, readings: &[(&str, &str, f64)]) {
    let messages = readings
        .iter()
        .map(|(device, ts, t)| telemetry(device, ts, *t, 80.0))
        .collect::<Vec<_>>();
    assert_eq!(
        publish(sluice.mqtt, messages, QoS::AtLeastOnce, 1),
        readings.len()
    );
}

#[test]
fn windows_are_tables_and_a_restart_neither_duplicates_nor_loses_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    // Readings are from 2024: a long idle timeout keeps the server clock out of it.
    std::fs::write(
        &config,
        "[windows]\nenabled = true\nsize = \"1m\"\nlateness = \"1m\"\nidle_timeout = \"1h\"\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];

    let sluice = Sluice::start(&data, &args);
    send(
        &sluice,
        &[
            ("w1", "2024-01-15T10:00:10Z", 20.5),
            ("w1", "2024-01-15T10:00:20Z", 22.0),
            ("w2", "2024-01-15T10:00:15Z", 30.0),
        ],
    );
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 3, Duration::from_secs(10));
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry_1m"),
        0,
        "still open"
    );
    assert!(sluice.terminate().success());
    // Saved with the stop's last checkpoint (and kept until a later one commits: a crash
    // before it would need them again).
    let saved = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(data.join("state"))
            .unwrap()
            .map(|e| e.unwrap().path().join("windows/devices.arrow"))
            .filter(|p| p.exists())
            .collect()
    };
    assert_eq!(saved().len(), 1, "open windows are saved at the stop");

    let sluice = Sluice::start(&data, &args);
    // The same window after the restart, then a reading that moves w1's watermark to
    // 10:01 and closes it, then one for a window long closed.
    send(&sluice, &[("w1", "2024-01-15T10:00:40Z", 21.0)]);
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 4, Duration::from_secs(10));
    send(&sluice, &[("w1", "2024-01-15T10:02:00Z", 25.0)]);
    sluice.expect_scalar("SELECT count(*) FROM telemetry", 5, Duration::from_secs(10));
    send(&sluice, &[("w1", "2024-01-15T09:58:00Z", 99.0)]);
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry_late",
        1,
        Duration::from_secs(10),
    );
    sluice.expect_scalar(
        "SELECT count(*) FROM telemetry_1m",
        1,
        Duration::from_secs(10),
    );
    let out = sluice.sql_csv(
        "SELECT device_id, window_start, window_end, readings, temperature_count, \
         temperature_min, temperature_max, temperature_sum, temperature_first, temperature_last, \
         temperature_last_ts FROM telemetry_1m ORDER BY device_id, window_start",
    );
    // Every row, not one of them: a window written twice (once before the stop, once
    // after) would be a second row. w2's window is still open.
    assert_eq!(
        out[1..],
        [
            "w1,2024-01-15T10:00:00Z,2024-01-15T10:01:00Z,3,3,20.5,22.0,63.5,20.5,21.0,2024-01-15T10:00:40Z"
        ],
        "one row for the window, with the readings from both sides of the restart:\n{out:?}"
    );
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry WHERE device_id = 'w1'"),
        5,
        "the late reading is stored all the same"
    );
    assert!(sluice.terminate().success());
}

/// Devices flushing their buffers after an outage: each sends 40 readings spread over 10
/// minutes of event time as one burst, all devices at once, then one reading 15 minutes
/// later that closes those windows. Every reading of a device must reach the aggregator
/// in the order the device sent it, with any number of decoders: a reading overtaken by
/// a newer one of its device would be late and miss its window.
#[test]
fn bursts_keep_each_devices_order_at_any_number_of_decoders() {
    for workers in [None, Some(4)] {
        let label = workers.map_or("the default number of".to_owned(), |w| w.to_string());
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("sluice.toml");
        let mut text = String::from(
            "[windows]\nenabled = true\nsize = \"1m\"\nlateness = \"1m\"\nidle_timeout = \"1h\"\n",
        );
        if let Some(workers) = workers {
            text.push_str(&format!("[ingest]\nworkers = {workers}\n"));
        }
        std::fs::write(&config, text).unwrap();
        let sluice = Sluice::start(
            &dir.path().join("data"),
            &["--config", config.to_str().unwrap()],
        );
        let (devices, readings) = (20, 40);
        let device = |d: usize| format!("burst-{d:02}");
        // Message i is reading i / 20 of device i % 20; `publish` deals message i to
        // connection i % 20, so each device sends its readings, in order, on its own
        // connection, all 20 at once.
        let burst = (0..devices * readings)
            .map(|i| {
                let (d, k) = (i % devices, i / devices);
                let ts = format!("2024-01-15T10:{:02}:{:02}Z", k * 15 / 60, k * 15 % 60);
                telemetry(&device(d), &ts, 20.0 + k as f64, 80.0)
            })
            .collect::<Vec<_>>();
        assert_eq!(
            publish(sluice.mqtt, burst, QoS::AtLeastOnce, devices),
            devices * readings
        );
        let closing = (0..devices)
            .map(|d| telemetry(&device(d), "2024-01-15T10:25:00Z", 20.0, 80.0))
            .collect::<Vec<_>>();
        assert_eq!(
            publish(sluice.mqtt, closing, QoS::AtLeastOnce, devices),
            devices
        );

        // The windows from SQL over the raw rows, up to the watermark (10:25 − 1 min).
        let from_rows = "SELECT device_id, date_bin(INTERVAL '1 minute', ts, TIMESTAMP '2024-01-01T00:00:00Z') AS window_start, count(*) AS readings \
             FROM telemetry WHERE ts < TIMESTAMP '2024-01-15T10:24:00Z' GROUP BY 1, 2";
        let expected = (devices * 10) as i64;
        let within = Duration::from_secs(20);
        sluice.expect_scalar(
            "SELECT count(*) FROM telemetry",
            (devices * (readings + 1)) as i64,
            within,
        );
        assert_eq!(
            sluice.scalar(&format!("SELECT count(*) FROM ({from_rows})")),
            expected
        );
        assert_eq!(
            sluice.wait_for("SELECT count(*) FROM telemetry_1m", expected, within),
            expected,
            "{label} decoders"
        );
        assert_eq!(
            sluice.scalar("SELECT count(*) FROM telemetry_late"),
            0,
            "{label} decoders: readings overtaken by newer ones of their device"
        );
        // Window by window, the same readings.
        let windows = "SELECT device_id, window_start, readings FROM telemetry_1m";
        for (a, b) in [(from_rows, windows), (windows, from_rows)] {
            assert_eq!(
                sluice.scalar(&format!("SELECT count(*) FROM (({a}) EXCEPT ({b}))")),
                0,
                "{label} decoders"
            );
        }
        assert!(sluice.terminate().success());
    }
}
