//! Tumbling event-time windows per device, and their rollup.
//!
//! Each device has a watermark: the latest event time it has sent, minus the allowed
//! lateness. A window closes (is emitted, once, never to change) when the watermark
//! passes its end. A device that goes quiet for `idle_timeout` of processing time has its
//! watermark follow the server clock instead (`now − idle_timeout − lateness`), so its
//! last window still closes. The watermark never goes back. A reading whose window has
//! already closed (its end is at or before the watermark) is late: it is kept by the
//! caller (it is in `telemetry`) and reported through [`WindowSink::late`], but changes
//! no window. Rollup windows are built only from closed minute windows, so a rollup row
//! is exactly the sum of its minute rows.
//!
//! Time is passed in (`now`, ns since the epoch), so all of this is tested without
//! sleeping.

use smol_str::SmolStr;
use std::collections::HashMap;
use std::time::Duration;

use crate::acc::WindowAcc;

/// Window sizes and closing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Size of the windows of `telemetry_1m`.
    pub size: Duration,
    /// Size of the rollup windows of `telemetry_1h`; a multiple of `size`.
    pub rollup: Duration,
    /// How far behind a device's latest event time a reading may be and still count.
    pub lateness: Duration,
    /// After this long without a reading (processing time), a device's watermark follows
    /// the server clock.
    pub idle_timeout: Duration,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            size: Duration::from_secs(60),
            rollup: Duration::from_secs(3600),
            lateness: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

impl WindowConfig {
    /// Checks the sizes; the error names the setting.
    pub fn validate(&self) -> Result<(), String> {
        let ns = |d: Duration| d.as_nanos();
        if ns(self.size) < 1_000_000 {
            return Err(format!(
                "windows.size must be at least 1ms, got {:?}",
                self.size
            ));
        }
        if ns(self.rollup) < ns(self.size) || ns(self.rollup) % ns(self.size) != 0 {
            return Err(format!(
                "windows.rollup ({:?}) must be a multiple of windows.size ({:?})",
                self.rollup, self.size
            ));
        }
        if ns(self.rollup) > ns(Duration::from_secs(7 * 24 * 3600)) {
            return Err(format!(
                "windows.rollup must be at most 7 days, got {:?}",
                self.rollup
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err("windows.idle_timeout must be more than 0".into());
        }
        Ok(())
    }
}

/// Where closed windows and late readings go.
pub trait WindowSink {
    /// A closed window of `[acc.start, end)`; `rollup` tells which table.
    fn window(&mut self, rollup: bool, device: &str, end: i64, acc: &WindowAcc);
    /// A reading whose window had already closed.
    fn late(&mut self, device: &str, ts: i64, received_at: i64);
}

/// One reading, as the windows see it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub device: &'a str,
    /// Event time, ns since the epoch.
    pub ts: i64,
    pub received_at: i64,
    /// The four known metrics, in [`crate::METRICS`] order.
    pub known: [Option<f64>; 4],
    pub extra: &'a [(&'a str, f64)],
}

/// Metrics beyond the known four, by name.
pub type Extra = Box<[(Box<str>, f64)]>;

/// One buffered reading of a window not closed yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Event time, ns.
    pub ts: i64,
    /// The four known metrics, NaN where absent (readings are always finite).
    pub known: [f64; 4],
    pub extra: Option<Extra>,
}

impl Sample {
    /// The reading as it is buffered (an empty `extra` is `None`).
    pub fn of(r: &Observation<'_>) -> Sample {
        Sample {
            ts: r.ts,
            known: r.known.map(|v| v.unwrap_or(f64::NAN)),
            extra: (!r.extra.is_empty())
                .then(|| r.extra.iter().map(|&(n, v)| (n.into(), v)).collect()),
        }
    }
}

/// How many readings a device buffers before its open windows become accumulators: a
/// few 56-byte readings take less memory than a window's accumulators (296 bytes), and a
/// device reporting every 30 s never buffers more than a handful; one reporting several
/// times a second would otherwise hold (and a checkpoint copy and save) hundreds.
const FOLD_AT: usize = 8;

/// A device's open windows.
#[derive(Debug, Clone, PartialEq)]
enum Open {
    /// Their readings, in arrival order, aggregated when their window closes.
    Readings(Vec<Sample>),
    /// Their accumulators, by start: readings are added as they arrive. In arrival order
    /// too, so the result is the same, to the bit, as aggregating the readings.
    Windows(Vec<WindowAcc>),
}

impl Open {
    /// Readings held (the `buffered` figure).
    fn readings(&self) -> usize {
        match self {
            Open::Readings(samples) => samples.len(),
            Open::Windows(windows) => windows.iter().map(|w| w.readings as usize).sum(),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Open::Readings(samples) => samples.is_empty(),
            Open::Windows(windows) => windows.is_empty(),
        }
    }

    /// The end of the earliest open window (`i64::MAX` when there is none).
    fn first_end(&self, size: i64) -> i64 {
        match self {
            Open::Readings(samples) => samples
                .iter()
                .map(|s| floor(s.ts, size).saturating_add(size))
                .min()
                .unwrap_or(i64::MAX),
            Open::Windows(windows) => windows
                .first()
                .map_or(i64::MAX, |w| w.start.saturating_add(size)),
        }
    }
}

/// Readings in arrival order into their windows' accumulators, ordered by start.
fn fold(samples: &[Sample], size: i64, windows: &mut Vec<WindowAcc>) {
    for s in samples {
        let known = s.known.map(|v| (!v.is_nan()).then_some(v));
        let extra = s.extra.iter().flatten().map(|(n, v)| (&**n, *v));
        window_of(windows, floor(s.ts, size)).add_reading(s.ts, known, extra);
    }
}

/// The accumulator of the window starting at `start`, added in order if new.
fn window_of(windows: &mut Vec<WindowAcc>, start: i64) -> &mut WindowAcc {
    let at = windows.partition_point(|w| w.start < start);
    if windows.get(at).is_none_or(|w| w.start != start) {
        windows.insert(at, WindowAcc::new(start));
    }
    &mut windows[at]
}

struct Device {
    /// Latest event time seen.
    max_event: i64,
    /// Processing time of the latest reading.
    last_seen: i64,
    /// Windows ending at or before this are closed; only rises.
    watermark: i64,
    open: Open,
    /// The end of the earliest open window (`i64::MAX` when there is none): whether a
    /// window closes is one comparison, however many readings are buffered.
    first_end: i64,
    /// The rollup window being built from closed windows.
    rollup: Option<Box<WindowAcc>>,
}

/// The open windows of every device.
///
/// Memory per device (x86-64): 64 bytes here, the index entry and two copies of the id
/// (~110), 56 bytes per buffered reading and ~310 for the rollup: about 700 bytes for a
/// device reporting every 30 s with a minute of lateness (up to 5 readings buffered);
/// past [`FOLD_AT`] readings, ~300 bytes per open window instead, however fast it sends.
pub struct Windows {
    size: i64,
    rollup: i64,
    lateness: i64,
    idle: i64,
    /// Device id → position in `devices` (ids held inline: a lookup reads no other memory
    /// than the bucket until it reaches the device).
    index: HashMap<SmolStr, u32, foldhash::fast::RandomState>,
    /// Ids by position, so a pass over every device reads memory in order.
    names: Vec<SmolStr>,
    devices: Vec<Device>,
    buffered: usize,
}

pub(crate) fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn floor(ts: i64, size: i64) -> i64 {
    ts - ts.rem_euclid(size)
}

/// What a device's windows need to carry on after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedDevice {
    pub device: SmolStr,
    pub max_event: i64,
    pub watermark: i64,
    /// Readings of the windows still open (a device sending slowly)…
    pub samples: Vec<Sample>,
    /// …or their accumulators, by start (a device sending fast).
    pub open: Vec<WindowAcc>,
    /// The rollup being built.
    pub rollup: Option<WindowAcc>,
}

impl Windows {
    pub fn new(config: WindowConfig) -> Self {
        Windows {
            size: nanos(config.size),
            rollup: nanos(config.rollup),
            lateness: nanos(config.lateness),
            idle: nanos(config.idle_timeout),
            index: HashMap::default(),
            names: Vec::new(),
            devices: Vec::new(),
            buffered: 0,
        }
    }

    /// Devices with state.
    pub fn devices(&self) -> usize {
        self.devices.len()
    }

    /// Readings held for windows not closed yet.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    fn device(&mut self, name: &str, now: i64) -> usize {
        match self.index.get(name) {
            Some(&i) => i as usize,
            None => {
                let i = self.devices.len();
                let name = SmolStr::new(name);
                self.index.insert(name.clone(), i as u32);
                self.names.push(name);
                self.devices.push(Device {
                    max_event: i64::MIN,
                    last_seen: now,
                    watermark: i64::MIN,
                    open: Open::Readings(Vec::new()),
                    first_end: i64::MAX,
                    rollup: None,
                });
                i
            }
        }
    }

    /// Adds a reading received at processing time `now`. Returns `false` if it was late.
    pub fn observe(&mut self, r: &Observation<'_>, now: i64, sink: &mut impl WindowSink) -> bool {
        let (size, rollup, lateness, idle) = (self.size, self.rollup, self.lateness, self.idle);
        let i = self.device(r.device, now);
        let device = &mut self.devices[i];
        // Catch up with the idle rule before judging lateness: a device back from a long
        // silence must not reopen windows that were closed meanwhile.
        device.advance(now, lateness, idle);
        device.last_seen = now;
        let end = floor(r.ts, size).saturating_add(size);
        if end <= device.watermark {
            sink.late(r.device, r.ts, r.received_at);
            return false;
        }
        device.max_event = device.max_event.max(r.ts);
        if let Open::Readings(samples) = &device.open
            && samples.len() >= FOLD_AT
        {
            let mut windows = Vec::with_capacity(2);
            fold(samples, size, &mut windows);
            device.open = Open::Windows(windows);
        }
        match &mut device.open {
            Open::Readings(samples) => {
                if samples.len() == samples.capacity() {
                    samples.reserve_exact(2);
                }
                samples.push(Sample::of(r));
            }
            Open::Windows(windows) => {
                let extra = r.extra.iter().map(|&(n, v)| (n, v));
                window_of(windows, floor(r.ts, size)).add_reading(r.ts, r.known, extra);
            }
        }
        device.first_end = device.first_end.min(end);
        self.buffered += 1;
        device.advance(now, lateness, idle);
        self.buffered -= device.close(r.device, size, rollup, sink);
        true
    }

    /// Closes what the passing of processing time closes (idle devices).
    pub fn tick(&mut self, now: i64, sink: &mut impl WindowSink) {
        let (size, rollup, lateness, idle) = (self.size, self.rollup, self.lateness, self.idle);
        for (device, name) in self.devices.iter_mut().zip(&self.names) {
            // Only the idle rule moves a watermark between readings.
            if now.saturating_sub(device.last_seen) < idle
                || (device.open.is_empty() && device.rollup.is_none())
            {
                continue;
            }
            device.advance(now, lateness, idle);
            self.buffered -= device.close(name, size, rollup, sink);
        }
    }

    /// Closes every open window now, whatever the watermarks (used when state cannot be
    /// kept, e.g. at a stop without a state directory).
    pub fn close_all(&mut self, sink: &mut impl WindowSink) {
        let (size, rollup) = (self.size, self.rollup);
        for (device, name) in self.devices.iter_mut().zip(&self.names) {
            device.watermark = i64::MAX;
            self.buffered -= device.close(name, size, rollup, sink);
        }
    }

    /// Every device's state, for [`restore`](Self::restore) after a restart.
    pub fn save(&self) -> Vec<SavedDevice> {
        self.devices
            .iter()
            .zip(&self.names)
            .map(|(d, name)| {
                let (samples, open) = match &d.open {
                    Open::Readings(samples) => (samples.clone(), Vec::new()),
                    Open::Windows(windows) => (Vec::new(), windows.clone()),
                };
                SavedDevice {
                    device: name.clone(),
                    max_event: d.max_event,
                    watermark: d.watermark,
                    samples,
                    open,
                    rollup: d.rollup.as_deref().cloned(),
                }
            })
            .collect()
    }

    /// Takes back saved state. Every device counts as seen `now`: the idle rule starts
    /// afresh, so a restart does not close windows of devices that kept sending meanwhile.
    pub fn restore(&mut self, saved: Vec<SavedDevice>, now: i64) {
        self.index.reserve(saved.len());
        self.names.reserve(saved.len());
        self.devices.reserve(saved.len());
        for s in saved {
            let i = self.device(&s.device, now);
            let device = &mut self.devices[i];
            let size = self.size;
            let open = if s.open.is_empty() && s.samples.len() <= FOLD_AT {
                Open::Readings(s.samples)
            } else {
                // Readings saved beside accumulators came after them (a state written by
                // hand, or by a version that folded at another point).
                let mut windows = s.open;
                windows.sort_by_key(|w| w.start);
                fold(&s.samples, size, &mut windows);
                Open::Windows(windows)
            };
            self.buffered -= device.open.readings();
            self.buffered += open.readings();
            *device = Device {
                max_event: s.max_event,
                last_seen: now,
                watermark: s.watermark,
                first_end: open.first_end(size),
                open,
                rollup: s.rollup.map(Box::new),
            };
        }
    }
}

impl Device {
    fn advance(&mut self, now: i64, lateness: i64, idle: i64) {
        let mut event = self.max_event;
        if now.saturating_sub(self.last_seen) >= idle {
            event = event.max(now.saturating_sub(idle));
        }
        if event != i64::MIN {
            self.watermark = self.watermark.max(event.saturating_sub(lateness));
        }
    }

    /// Emits the windows the watermark has passed, folding each into the rollup, and the
    /// rollup once the watermark passes its end; returns how many readings were used.
    fn close(&mut self, name: &str, size: i64, rollup: i64, sink: &mut impl WindowSink) -> usize {
        let mut used = 0;
        if self.first_end <= self.watermark {
            let closes = |start: i64| start.saturating_add(size) <= self.watermark;
            let mut closed = Vec::new();
            match &mut self.open {
                Open::Readings(samples) => {
                    // Stable: arrival order is kept within a window (it breaks first/last
                    // ties).
                    samples.sort_by_key(|s| floor(s.ts, size));
                    let n = samples.partition_point(|s| closes(floor(s.ts, size)));
                    fold(&samples[..n], size, &mut closed);
                    samples.drain(..n);
                    if samples.capacity() > 2 * samples.len() + 4 {
                        samples.shrink_to(samples.len() + 2);
                    }
                }
                Open::Windows(windows) => {
                    let n = windows.partition_point(|w| closes(w.start));
                    closed.extend(windows.drain(..n));
                    if windows.is_empty() {
                        // Back to readings: the device may have slowed down.
                        self.open = Open::Readings(Vec::new());
                    }
                }
            }
            for window in &closed {
                used += window.readings as usize;
                sink.window(false, name, window.start + size, window);
                let hour = floor(window.start, rollup);
                match &mut self.rollup {
                    Some(r) if r.start == hour => r.merge(window),
                    slot => {
                        if let Some(previous) = slot.take() {
                            sink.window(true, name, previous.start + rollup, &previous);
                        }
                        let mut r = Box::new(WindowAcc::new(hour));
                        r.merge(window);
                        *slot = Some(r);
                    }
                }
            }
            self.first_end = self.open.first_end(size);
        }
        if let Some(r) = &self.rollup
            && r.start.saturating_add(rollup) <= self.watermark
        {
            let r = self.rollup.take().expect("checked");
            sink.window(true, name, r.start + rollup, &r);
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000_000;
    const SEC: i64 = 1_000_000_000;
    /// 2024-01-15T10:00:00Z
    const T0: i64 = 1_705_312_800 * SEC;

    #[derive(Default)]
    struct Collect {
        windows: Vec<(bool, String, i64, i64, u64)>, // rollup, device, start, end, readings
        accs: Vec<WindowAcc>,
        late: Vec<(String, i64)>,
    }

    impl WindowSink for Collect {
        fn window(&mut self, rollup: bool, device: &str, end: i64, acc: &WindowAcc) {
            self.windows
                .push((rollup, device.into(), acc.start, end, acc.readings));
            self.accs.push(acc.clone());
        }
        fn late(&mut self, device: &str, ts: i64, _received_at: i64) {
            self.late.push((device.into(), ts));
        }
    }

    fn reading(device: &str, ts: i64, temperature: f64) -> Observation<'_> {
        Observation {
            device,
            ts,
            received_at: ts,
            known: [Some(temperature), None, None, None],
            extra: &[],
        }
    }

    /// Observes a reading that arrives exactly at its event time.
    fn at(w: &mut Windows, sink: &mut Collect, device: &str, ts: i64, t: f64) -> bool {
        w.observe(&reading(device, ts, t), ts, sink)
    }

    #[test]
    fn a_window_is_start_inclusive_end_exclusive_and_closes_when_the_watermark_passes_its_end() {
        let mut w = Windows::new(WindowConfig::default());
        let mut out = Collect::default();
        at(&mut w, &mut out, "d", T0, 1.0);
        at(&mut w, &mut out, "d", T0 + MIN - 1, 2.0);
        at(&mut w, &mut out, "d", T0 + MIN, 3.0); // the next window
        at(&mut w, &mut out, "d", T0 + 2 * MIN - 1, 4.0); // watermark T0 + MIN − 1 ns
        assert!(out.windows.is_empty(), "not closed yet: {:?}", out.windows);
        at(&mut w, &mut out, "d", T0 + 2 * MIN, 5.0); // watermark reaches T0 + MIN
        assert_eq!(out.windows, vec![(false, "d".into(), T0, T0 + MIN, 2)]);
        let t = &out.accs[0].known[0];
        assert_eq!(
            (t.min, t.max, t.sum, t.first, t.last),
            (1.0, 2.0, 3.0, 1.0, 2.0)
        );
        assert_eq!((t.first_ts, t.last_ts), (T0, T0 + MIN - 1));
        assert_eq!(w.buffered(), 3, "the readings of the two open windows");
    }

    #[test]
    fn readings_out_of_order_within_the_lateness_still_count_later_ones_are_late() {
        let mut w = Windows::new(WindowConfig::default());
        let mut out = Collect::default();
        at(&mut w, &mut out, "d", T0 + 70 * SEC, 1.0);
        // 60 s behind the latest event, its window [T0, T0+1m) is still open.
        assert!(w.observe(&reading("d", T0 + 10 * SEC, 2.0), T0 + 71 * SEC, &mut out));
        at(&mut w, &mut out, "d", T0 + 130 * SEC, 3.0); // closes [T0, T0+1m)
        assert_eq!(out.windows, vec![(false, "d".into(), T0, T0 + MIN, 1)]);
        // Its window has closed: late, reported, and the window is not emitted again.
        assert!(!w.observe(&reading("d", T0 + 59 * SEC, 9.0), T0 + 131 * SEC, &mut out));
        assert_eq!(out.late, vec![("d".into(), T0 + 59 * SEC)]);
        // Also late: a window that never had a reading but is behind the watermark.
        assert!(!w.observe(&reading("d", T0 - 5 * MIN, 9.0), T0 + 132 * SEC, &mut out));
        at(&mut w, &mut out, "d", T0 + 10 * MIN, 4.0);
        let minutes: Vec<_> = out.windows.iter().filter(|x| !x.0).map(|x| x.2).collect();
        assert_eq!(minutes, vec![T0, T0 + MIN, T0 + 2 * MIN], "each once");
        assert_eq!(out.late.len(), 2);
    }

    #[test]
    fn a_device_that_goes_quiet_gets_its_last_window_after_the_idle_timeout() {
        let mut w = Windows::new(WindowConfig::default()); // lateness 1m, idle 2m
        let mut out = Collect::default();
        at(&mut w, &mut out, "quiet", T0 + 10 * SEC, 1.0);
        at(&mut w, &mut out, "busy", T0 + 10 * SEC, 1.0);
        w.tick(T0 + 2 * MIN, &mut out);
        assert!(out.windows.is_empty(), "idle for less than the timeout");
        w.tick(T0 + 3 * MIN, &mut out); // watermark now − 2m − 1m = T0
        assert!(out.windows.is_empty(), "the window ends at T0 + 1m");
        w.tick(T0 + 4 * MIN, &mut out);
        let closed: Vec<_> = out.windows.iter().filter(|x| !x.0).collect();
        assert_eq!(closed.len(), 2, "both devices are quiet: {closed:?}");
        // Back after the silence with current readings: on time, a new window.
        assert!(at(&mut w, &mut out, "quiet", T0 + 4 * MIN + SEC, 2.0));
        // A reading from the closed window is late, though the device had been idle.
        assert!(!w.observe(
            &reading("quiet", T0 + 20 * SEC, 3.0),
            T0 + 4 * MIN + 2 * SEC,
            &mut out
        ));
    }

    #[test]
    fn the_rollup_is_built_from_closed_windows_and_closes_after_its_hour() {
        let mut w = Windows::new(WindowConfig::default());
        let mut out = Collect::default();
        for m in 0..60 {
            at(&mut w, &mut out, "d", T0 + m * MIN + 30 * SEC, m as f64);
        }
        at(&mut w, &mut out, "d", T0 + 60 * MIN + 30 * SEC, 100.0); // closes minute 58
        assert_eq!(out.windows.len(), 59);
        assert!(
            out.windows.iter().all(|x| !x.0),
            "the hour ends at T0 + 60m"
        );
        at(&mut w, &mut out, "d", T0 + 61 * MIN, 100.0); // watermark T0 + 60m: both close
        let hours: Vec<_> = out.windows.iter().filter(|x| x.0).collect();
        assert_eq!(hours, vec![&(true, "d".into(), T0, T0 + 60 * MIN, 60)]);
        let i = out.windows.iter().position(|x| x.0).unwrap();
        let t = &out.accs[i].known[0];
        assert_eq!((t.count, t.min, t.max, t.sum), (60, 0.0, 59.0, 1770.0));
        assert_eq!(
            (t.first_ts, t.last_ts),
            (T0 + 30 * SEC, T0 + 59 * MIN + 30 * SEC)
        );
    }

    /// A stream of readings: a device every 30 s, one twice a second with arrivals up to
    /// 100 s out of order (some late) and an extra metric now and then, one in between;
    /// values from a fixed pseudo-random sequence. `(device, ts, arrival, temperature,
    /// co2)`.
    fn mixed_stream() -> Vec<(&'static str, i64, i64, f64, Option<f64>)> {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut stream = Vec::new();
        for step in 0..1200 {
            let now = T0 + step * SEC / 2;
            let value = (next() % 10_000) as f64 / 7.0 - 500.0;
            let back = (next() % 100) as i64 * SEC;
            let co2 = (step % 3 == 0).then_some(value * 2.0);
            stream.push(("fast", now - back, now, value, co2));
            if step % 60 == 0 {
                stream.push(("slow", now, now, value, None));
            }
            if step % 7 == 0 {
                stream.push(("medium", now - SEC, now, -value, co2));
            }
        }
        stream
    }

    fn observe_all(
        w: &mut Windows,
        out: &mut Collect,
        stream: &[(&'static str, i64, i64, f64, Option<f64>)],
    ) -> Vec<bool> {
        stream
            .iter()
            .map(|&(device, ts, now, t, co2)| {
                let extra: Vec<(&str, f64)> = co2.map(|v| ("co2", v)).into_iter().collect();
                let r = Observation {
                    device,
                    ts,
                    received_at: now,
                    known: [Some(t), None, Some(t / 3.0), None],
                    extra: &extra,
                };
                w.observe(&r, now, out)
            })
            .collect()
    }

    #[test]
    fn every_window_is_its_readings_aggregated_in_arrival_order_however_fast_its_device_sends() {
        let stream = mixed_stream();
        let mut w = Windows::new(WindowConfig::default());
        let mut out = Collect::default();
        let counted = observe_all(&mut w, &mut out, &stream);
        w.close_all(&mut out);
        assert_eq!(w.buffered(), 0);
        let mut minutes = 0;
        for (window, acc) in out.windows.iter().zip(&out.accs) {
            let (rollup, device, start, _, _) = window;
            if *rollup {
                continue;
            }
            minutes += 1;
            // The model: the window's readings that were not late, in arrival order.
            let mut expected = WindowAcc::new(*start);
            for (&(d, ts, _, t, co2), _) in stream.iter().zip(&counted).filter(|(_, c)| **c) {
                if d == device && floor(ts, MIN) == *start {
                    expected.add_reading(
                        ts,
                        [Some(t), None, Some(t / 3.0), None],
                        co2.map(|v| ("co2", v)),
                    );
                }
            }
            assert_eq!(acc, &expected, "{device} at {start}");
        }
        let used: u64 = out.windows.iter().filter(|x| !x.0).map(|x| x.4).sum();
        assert_eq!(used as usize, counted.iter().filter(|c| **c).count());
        assert!(
            minutes > 20 && out.late.len() > 10,
            "{minutes} windows, {} late",
            out.late.len()
        );
    }

    #[test]
    fn saved_and_restored_windows_carry_on_as_if_never_stopped() {
        let stream = mixed_stream();
        let mut whole = Windows::new(WindowConfig::default());
        let mut expected = Collect::default();
        observe_all(&mut whole, &mut expected, &stream);
        whole.close_all(&mut expected);
        for cut in [101, stream.len() / 2, stream.len() - 3] {
            let mut first = Windows::new(WindowConfig::default());
            let mut out = Collect::default();
            observe_all(&mut first, &mut out, &stream[..cut]);
            let saved = first.save();
            assert!(
                saved.iter().any(|d| !d.open.is_empty()),
                "the fast device keeps accumulators"
            );
            let mut second = Windows::new(WindowConfig::default());
            second.restore(saved, stream[cut].2);
            assert_eq!(second.buffered(), first.buffered());
            observe_all(&mut second, &mut out, &stream[cut..]);
            second.close_all(&mut out);
            assert_eq!(out.windows, expected.windows, "cut at {cut}");
            assert_eq!(out.accs, expected.accs, "cut at {cut}");
        }
    }

    #[test]
    fn sizes_are_validated_by_name() {
        let bad = WindowConfig {
            rollup: Duration::from_secs(90),
            ..WindowConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("windows.rollup"));
        let bad = WindowConfig {
            size: Duration::ZERO,
            ..WindowConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("windows.size"));
        assert!(WindowConfig::default().validate().is_ok());
    }
}
