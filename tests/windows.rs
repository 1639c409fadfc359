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
    sluice.wait_for("SELECT count(*) FROM telemetry", 3, Duration::from_secs(10));
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry_1m"),
        0,
        "still open"
    );
    assert!(sluice.terminate().success());
    let state = data.join("state/windows/devices.arrow");
    assert!(state.exists(), "open windows are saved at the stop");

    let sluice = Sluice::start(&data, &args);
    assert!(!state.exists(), "state is taken back once");
    // The same window after the restart, then a reading that moves w1's watermark to
    // 10:01 and closes it, then one for a window long closed.
    send(&sluice, &[("w1", "2024-01-15T10:00:40Z", 21.0)]);
    sluice.wait_for("SELECT count(*) FROM telemetry", 4, Duration::from_secs(10));
    send(&sluice, &[("w1", "2024-01-15T10:02:00Z", 25.0)]);
    sluice.wait_for("SELECT count(*) FROM telemetry", 5, Duration::from_secs(10));
    send(&sluice, &[("w1", "2024-01-15T09:58:00Z", 99.0)]);
    sluice.wait_for(
        "SELECT count(*) FROM telemetry_late",
        1,
        Duration::from_secs(10),
    );
    sluice.wait_for(
        "SELECT count(*) FROM telemetry_1m",
        1,
        Duration::from_secs(10),
    );
    let out = sluice.sql_csv(
        "SELECT device_id, window_start, window_end, readings, temperature_count, \
         temperature_min, temperature_max, temperature_sum, temperature_first, temperature_last, \
         temperature_last_ts FROM telemetry_1m",
    );
    assert_eq!(
        out[1],
        "w1,2024-01-15T10:00:00Z,2024-01-15T10:01:00Z,3,3,20.5,22.0,63.5,20.5,21.0,2024-01-15T10:00:40Z",
        "one row for the window, with the readings from both sides of the restart:\n{out:?}"
    );
    assert_eq!(
        sluice.scalar("SELECT count(*) FROM telemetry WHERE device_id = 'w1'"),
        5,
        "the late reading is stored all the same"
    );
    assert!(sluice.terminate().success());
}
