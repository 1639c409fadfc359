//! Threshold and silence alerts: rules from the configuration, and a state machine per
//! (rule, device) driven by the readings as they flow.
//!
//! A threshold rule (`above` or `below` a value) moves a device through
//! normal → pending → firing → normal, on event time:
//! - normal → pending on the first reading past the threshold;
//! - pending → firing once readings have stayed past it for `for` (the first past-threshold
//!   reading's time to the current one); with `for = 0` the first such reading fires;
//! - pending → normal on a reading back within the threshold (no notification);
//! - firing → normal ("resolved") only on a reading past the *clear* threshold
//!   (`clear_below` for `above`, `clear_above` for `below`): a value hovering at the
//!   threshold does not flap.
//!
//! A silence rule (`no_data_for`) fires when a device has sent nothing for that long by
//! the server clock (a silent device has no event time), and resolves on its next
//! reading. Only transitions to firing and to resolved are notified; pending is visible in
//! the metrics. Readings older than the latest one a device has sent (out of order) do
//! not move an active alert: they are in `telemetry` but the state machine only goes
//! forward in event time.
//!
//! Time is passed in, so all of this is tested without sleeping.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::METRICS;
use crate::window::Observation;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One `[[alert]]` entry of the configuration, as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear_above: Option<f64>,
    #[serde(
        default,
        rename = "for",
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub hold: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub no_data_for: Option<Duration>,
}

/// Accepted severities; `warning` when a rule names none.
pub const SEVERITIES: [&str; 3] = ["info", "warning", "critical"];

/// The metric a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Metric {
    /// One of [`METRICS`], by index.
    Known(usize),
    /// Another payload field, written `extra.<name>` in a rule.
    Extra(Box<str>),
}

impl Metric {
    fn parse(name: &str) -> Option<Metric> {
        if let Some(i) = METRICS.iter().position(|m| *m == name) {
            return Some(Metric::Known(i));
        }
        match name.strip_prefix("extra.") {
            Some(extra) if !extra.is_empty() => Some(Metric::Extra(extra.into())),
            _ => None,
        }
    }

    fn value(&self, o: &Observation) -> Option<f64> {
        match self {
            Metric::Known(i) => o.known[*i],
            Metric::Extra(name) => o.extra.iter().find(|(n, _)| *n == &**name).map(|(_, v)| *v),
        }
    }
}

/// What a rule checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Check {
    /// Fires past `threshold` upwards, resolves below `clear`.
    Above { threshold: f64, clear: f64 },
    /// Fires past `threshold` downwards, resolves above `clear`.
    Below { threshold: f64, clear: f64 },
    /// Fires when a device sends nothing for this long (ns, server clock).
    NoData { after: i64 },
}

/// A validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: Arc<str>,
    /// The metric's name as written (`temperature`, `extra.co2`); `None` for silence rules.
    pub metric_name: Option<Arc<str>>,
    metric: Option<Metric>,
    pub check: Check,
    /// `for`, ns.
    pub hold: i64,
    pub severity: Arc<str>,
}

impl Rule {
    /// Whether `state` of this rule can be carried over to `other` (a reload).
    fn same_condition(&self, other: &Rule) -> bool {
        self.metric == other.metric
            && std::mem::discriminant(&self.check) == std::mem::discriminant(&other.check)
    }
}

impl RuleSpec {
    /// Checks the rule; the error names it.
    pub fn compile(&self) -> Result<Rule, String> {
        let name = self.name.as_str();
        let fail = |what: String| Err(format!("alert {name:?}: {what}"));
        if name.is_empty() {
            return Err("an [[alert]] has no name".into());
        }
        if name.contains(['/', '+', '#']) || name.chars().any(char::is_control) {
            return fail("the name is part of an MQTT topic and cannot contain '/', '+', '#' or control characters".into());
        }
        for (key, value) in [
            ("above", self.above),
            ("clear_below", self.clear_below),
            ("below", self.below),
            ("clear_above", self.clear_above),
        ] {
            if value.is_some_and(|v| !v.is_finite()) {
                return fail(format!("{key} must be a finite number"));
            }
        }
        let hold = self.hold.unwrap_or_default();
        let no_data = self.no_data_for;
        let severity = self.severity.as_deref().unwrap_or("warning");
        if !SEVERITIES.contains(&severity) {
            return fail(format!(
                "severity {severity:?} is not one of {}",
                SEVERITIES.join(", ")
            ));
        }
        let check = match (self.above, self.below, no_data) {
            (Some(threshold), None, None) => {
                if self.clear_above.is_some() {
                    return fail("clear_above goes with below, not above (use clear_below)".into());
                }
                let clear = self.clear_below.unwrap_or(threshold);
                if clear > threshold {
                    return fail(format!(
                        "clear_below ({clear}) must not be above the threshold above = {threshold}"
                    ));
                }
                Check::Above { threshold, clear }
            }
            (None, Some(threshold), None) => {
                if self.clear_below.is_some() {
                    return fail("clear_below goes with above, not below (use clear_above)".into());
                }
                let clear = self.clear_above.unwrap_or(threshold);
                if clear < threshold {
                    return fail(format!(
                        "clear_above ({clear}) must not be below the threshold below = {threshold}"
                    ));
                }
                Check::Below { threshold, clear }
            }
            (None, None, Some(after)) => {
                if after.is_zero() {
                    return fail("no_data_for must be more than 0".into());
                }
                if self.metric.is_some()
                    || self.clear_below.is_some()
                    || self.clear_above.is_some()
                    || self.hold.is_some()
                {
                    return fail("a no_data_for rule watches a device, not a metric: it takes no metric, clear threshold or for".into());
                }
                Check::NoData {
                    after: after.as_nanos() as i64,
                }
            }
            (None, None, None) => return fail("needs one of above, below or no_data_for".into()),
            _ => {
                return fail(
                    "has more than one of above, below and no_data_for; write one rule for each"
                        .into(),
                );
            }
        };
        let metric = match (&self.metric, check) {
            (_, Check::NoData { .. }) => None,
            (None, _) => return fail("needs a metric".into()),
            (Some(metric), _) => Some(Metric::parse(metric).ok_or_else(|| {
                format!(
                    "alert {name:?}: unknown metric {metric:?}: use one of {} or extra.<payload field>",
                    METRICS.join(", ")
                )
            })?),
        };
        Ok(Rule {
            name: name.into(),
            metric_name: metric.as_ref().and(self.metric.as_deref().map(Arc::from)),
            metric,
            check,
            hold: hold.as_nanos() as i64,
            severity: severity.into(),
        })
    }
}

/// Validates a whole rule set (each rule, and names unique).
pub fn compile_rules(specs: &[RuleSpec]) -> Result<Vec<Rule>, String> {
    let rules = specs
        .iter()
        .map(RuleSpec::compile)
        .collect::<Result<Vec<_>, _>>()?;
    for (i, rule) in rules.iter().enumerate() {
        if rules[..i].iter().any(|r| r.name == rule.name) {
            return Err(format!(
                "alert {:?} is defined twice: names must be unique",
                rule.name
            ));
        }
    }
    Ok(rules)
}

/// The two notified transitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// A transition to notify and to keep in the `alerts` table.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    pub rule: Arc<str>,
    pub device: Box<str>,
    pub state: AlertState,
    pub severity: Arc<str>,
    pub metric: Option<Arc<str>>,
    /// The reading that caused the transition (none for a silence firing).
    pub value: Option<f64>,
    /// The threshold crossed: the firing threshold when firing, the clear threshold when
    /// resolved; none for silence rules.
    pub threshold: Option<f64>,
    /// When the condition began (ns): the first reading past the threshold, or a silent
    /// device's last reading.
    pub started_at: i64,
    /// When the transition happened (ns): the reading's event time, or the server clock
    /// for silence.
    pub event_time: i64,
    /// Why an alert resolved without a reading (its rule was removed or changed).
    pub reason: Option<&'static str>,
}

impl AlertEvent {
    /// `resolved` only: how long the alert was active, s.
    pub fn duration_s(&self) -> Option<f64> {
        (self.state == AlertState::Resolved)
            .then(|| (self.event_time - self.started_at) as f64 / 1e9)
    }
}

/// Where transitions go.
pub trait AlertSink {
    fn alert(&mut self, event: AlertEvent);
}

impl AlertSink for Vec<AlertEvent> {
    fn alert(&mut self, event: AlertEvent) {
        self.push(event);
    }
}

/// A (rule, device) pair that is not normal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Active {
    pub firing: bool,
    /// When the condition began, ns.
    pub since: i64,
    /// The latest event time applied, ns (older readings are skipped).
    pub last: i64,
}

/// One saved (rule, device) state.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedAlert {
    pub rule: Arc<str>,
    pub device: Box<str>,
    pub active: Active,
}

/// Everything that survives a restart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SavedAlerts {
    pub active: Vec<SavedAlert>,
    /// Devices and when each was last heard from (server clock, ns); kept only while a
    /// silence rule exists.
    pub last_seen: Vec<(Box<str>, i64)>,
}

/// The state machines of every rule over every device.
#[derive(Debug, Default)]
pub struct Alerts {
    rules: Vec<Rule>,
    /// Per rule, the devices that are pending or firing.
    active: Vec<FastMap<Box<str>, Active>>,
    /// Per device, the server time of its latest reading; only while a silence rule exists.
    last_seen: FastMap<Box<str>, i64>,
}

impl Alerts {
    pub fn new(rules: Vec<Rule>) -> Alerts {
        Alerts {
            active: rules.iter().map(|_| FastMap::default()).collect(),
            rules,
            last_seen: FastMap::default(),
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn watches_silence(&self) -> bool {
        self.rules
            .iter()
            .any(|r| matches!(r.check, Check::NoData { .. }))
    }

    /// (pending, firing) counts per rule, in rule order.
    pub fn counts(&self) -> Vec<(usize, usize)> {
        self.active
            .iter()
            .map(|m| {
                let firing = m.values().filter(|a| a.firing).count();
                (m.len() - firing, firing)
            })
            .collect()
    }

    /// Applies one reading to every rule.
    pub fn observe(&mut self, o: &Observation, sink: &mut impl AlertSink) {
        if self.rules.is_empty() {
            return;
        }
        if self.watches_silence() {
            match self.last_seen.get_mut(o.device) {
                Some(seen) => *seen = (*seen).max(o.received_at),
                None => {
                    self.last_seen.insert(o.device.into(), o.received_at);
                }
            }
        }
        for (rule, active) in self.rules.iter().zip(self.active.iter_mut()) {
            match rule.check {
                Check::NoData { .. } => {
                    if let Some(a) = active.remove(o.device) {
                        sink.alert(event(
                            rule,
                            o.device,
                            AlertState::Resolved,
                            a.since,
                            o.received_at,
                            None,
                            None,
                        ));
                    }
                }
                Check::Above { .. } | Check::Below { .. } => {
                    if let Some(value) = rule.metric.as_ref().and_then(|m| m.value(o)) {
                        step(rule, active, o, value, sink);
                    }
                }
            }
        }
    }

    /// Fires silence rules for devices quiet since `now − no_data_for` (server clock, ns).
    pub fn tick(&mut self, now: i64, sink: &mut impl AlertSink) {
        for (rule, active) in self.rules.iter().zip(self.active.iter_mut()) {
            let Check::NoData { after } = rule.check else {
                continue;
            };
            for (device, &seen) in &self.last_seen {
                if now - seen >= after && !active.contains_key(device) {
                    active.insert(
                        device.clone(),
                        Active {
                            firing: true,
                            since: seen,
                            last: seen,
                        },
                    );
                    sink.alert(event(
                        rule,
                        device,
                        AlertState::Firing,
                        seen,
                        now,
                        None,
                        None,
                    ));
                }
            }
        }
    }

    /// Replaces the rules. A rule keeping its name and condition (same metric, same
    /// direction) keeps its state; firing alerts of rules removed or changed resolve with
    /// a reason. `now` is the server clock, ns.
    pub fn set_rules(&mut self, rules: Vec<Rule>, now: i64, sink: &mut impl AlertSink) {
        let mut old: Vec<(Rule, FastMap<Box<str>, Active>)> = std::mem::take(&mut self.rules)
            .into_iter()
            .zip(std::mem::take(&mut self.active))
            .collect();
        self.active = rules
            .iter()
            .map(|rule| {
                match old
                    .iter()
                    .position(|(r, _)| r.name == rule.name && r.same_condition(rule))
                {
                    Some(i) => old.swap_remove(i).1,
                    None => FastMap::default(),
                }
            })
            .collect();
        for (rule, active) in old {
            for (device, a) in active.into_iter().filter(|(_, a)| a.firing) {
                sink.alert(event(
                    &rule,
                    &device,
                    AlertState::Resolved,
                    a.since,
                    now,
                    None,
                    Some("rule removed or changed"),
                ));
            }
        }
        self.rules = rules;
        if !self.watches_silence() {
            self.last_seen = FastMap::default();
        }
    }

    /// The state to keep across a restart.
    pub fn save(&self) -> SavedAlerts {
        SavedAlerts {
            active: self
                .rules
                .iter()
                .zip(&self.active)
                .flat_map(|(rule, active)| {
                    active.iter().map(|(device, a)| SavedAlert {
                        rule: rule.name.clone(),
                        device: device.clone(),
                        active: *a,
                    })
                })
                .collect(),
            last_seen: self
                .last_seen
                .iter()
                .map(|(d, &t)| (d.clone(), t))
                .collect(),
        }
    }

    /// Takes back saved state at `now` (server clock, ns). State of rules that no longer
    /// exist is dropped. A device's silence counts from the later of its last reading and
    /// `now`: what it sent while the server was down is unknown.
    pub fn restore(&mut self, saved: SavedAlerts, now: i64) {
        for alert in saved.active {
            if let Some(i) = self.rules.iter().position(|r| r.name == alert.rule) {
                self.active[i].insert(alert.device, alert.active);
            }
        }
        if self.watches_silence() {
            for (device, seen) in saved.last_seen {
                self.last_seen.insert(device, seen.max(now));
            }
        }
    }
}

fn event(
    rule: &Rule,
    device: &str,
    state: AlertState,
    started_at: i64,
    event_time: i64,
    value_threshold: Option<(f64, f64)>,
    reason: Option<&'static str>,
) -> AlertEvent {
    AlertEvent {
        rule: rule.name.clone(),
        device: device.into(),
        state,
        severity: rule.severity.clone(),
        metric: rule.metric_name.clone(),
        value: value_threshold.map(|(v, _)| v),
        threshold: value_threshold.map(|(_, t)| t),
        started_at,
        event_time,
        reason,
    }
}

/// One threshold reading for one rule.
fn step(
    rule: &Rule,
    active: &mut FastMap<Box<str>, Active>,
    o: &Observation,
    value: f64,
    sink: &mut impl AlertSink,
) {
    // `past`: beyond the threshold; `clear`: beyond the clear threshold.
    let (past, clear, threshold, clear_threshold) = match rule.check {
        Check::Above { threshold, clear } => (value > threshold, value < clear, threshold, clear),
        Check::Below { threshold, clear } => (value < threshold, value > clear, threshold, clear),
        Check::NoData { .. } => return,
    };
    match active.get_mut(o.device) {
        None => {
            if past {
                let firing = rule.hold == 0;
                active.insert(
                    o.device.into(),
                    Active {
                        firing,
                        since: o.ts,
                        last: o.ts,
                    },
                );
                if firing {
                    sink.alert(event(
                        rule,
                        o.device,
                        AlertState::Firing,
                        o.ts,
                        o.ts,
                        Some((value, threshold)),
                        None,
                    ));
                }
            }
        }
        Some(a) if o.ts < a.last => {}
        Some(a) if a.firing => {
            a.last = o.ts;
            if clear {
                let since = a.since;
                active.remove(o.device);
                sink.alert(event(
                    rule,
                    o.device,
                    AlertState::Resolved,
                    since,
                    o.ts,
                    Some((value, clear_threshold)),
                    None,
                ));
            }
        }
        Some(a) => {
            a.last = o.ts;
            if !past {
                active.remove(o.device);
            } else if o.ts - a.since >= rule.hold {
                a.firing = true;
                let since = a.since;
                sink.alert(event(
                    rule,
                    o.device,
                    AlertState::Firing,
                    since,
                    o.ts,
                    Some((value, threshold)),
                    None,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;
    const T0: i64 = 1_705_314_600 * S;

    fn spec(toml_like: &[(&str, &str)]) -> RuleSpec {
        let mut spec = RuleSpec {
            name: "overheat".into(),
            ..RuleSpec::default()
        };
        for (k, v) in toml_like {
            let f = || Some(v.parse::<f64>().unwrap());
            match *k {
                "name" => spec.name = v.to_string(),
                "metric" => spec.metric = Some(v.to_string()),
                "above" => spec.above = f(),
                "clear_below" => spec.clear_below = f(),
                "below" => spec.below = f(),
                "clear_above" => spec.clear_above = f(),
                "for" => spec.hold = Some(humantime::parse_duration(v).unwrap()),
                "severity" => spec.severity = Some(v.to_string()),
                "no_data_for" => spec.no_data_for = Some(humantime::parse_duration(v).unwrap()),
                _ => panic!("{k}"),
            }
        }
        spec
    }

    fn overheat() -> Rule {
        spec(&[
            ("metric", "temperature"),
            ("above", "80"),
            ("clear_below", "75"),
            ("for", "2m"),
            ("severity", "critical"),
        ])
        .compile()
        .unwrap()
    }

    fn reading(alerts: &mut Alerts, device: &str, secs: i64, temperature: f64) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        alerts.observe(
            &Observation {
                device,
                ts: T0 + secs * S,
                received_at: T0 + secs * S,
                known: [Some(temperature), None, None, None],
                extra: &[],
            },
            &mut events,
        );
        events
    }

    fn states(events: &[AlertEvent]) -> Vec<(&str, AlertState)> {
        events.iter().map(|e| (&*e.device, e.state)).collect()
    }

    #[test]
    fn rules_are_validated_and_errors_name_the_rule() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("metric", "temprature"), ("above", "80")],
                "unknown metric \"temprature\"",
            ),
            (
                &[
                    ("metric", "temperature"),
                    ("above", "80"),
                    ("clear_below", "85"),
                ],
                "clear_below (85) must not be above",
            ),
            (
                &[
                    ("metric", "battery"),
                    ("below", "20"),
                    ("clear_above", "10"),
                ],
                "clear_above (10) must not be below",
            ),
            (
                &[
                    ("metric", "battery"),
                    ("below", "20"),
                    ("clear_below", "30"),
                ],
                "clear_below goes with above",
            ),
            (
                &[("metric", "temperature")],
                "needs one of above, below or no_data_for",
            ),
            (
                &[("metric", "temperature"), ("above", "80"), ("below", "10")],
                "more than one of",
            ),
            (&[("above", "80")], "needs a metric"),
            (
                &[
                    ("metric", "temperature"),
                    ("above", "80"),
                    ("severity", "apocalyptic"),
                ],
                "severity \"apocalyptic\"",
            ),
            (
                &[("metric", "temperature"), ("above", "NaN")],
                "above must be a finite number",
            ),
            (
                &[("name", "a/b"), ("metric", "temperature"), ("above", "1")],
                "MQTT topic",
            ),
            (
                &[("no_data_for", "5m"), ("metric", "temperature")],
                "takes no metric",
            ),
        ];
        for (fields, expected) in cases {
            let error = spec(fields).compile().unwrap_err();
            assert!(error.contains(expected), "{error} (expected {expected})");
            if !fields.iter().any(|(k, _)| *k == "name") {
                assert!(error.starts_with("alert \"overheat\""), "{error}");
            }
        }
        let co2 = spec(&[("metric", "extra.co2"), ("above", "1000")])
            .compile()
            .unwrap();
        assert_eq!(co2.metric, Some(Metric::Extra("co2".into())));
        assert_eq!(co2.severity.as_ref(), "warning");
        let twice = compile_rules(&[overheat_spec(), overheat_spec()]).unwrap_err();
        assert!(twice.contains("defined twice"), "{twice}");
    }

    fn overheat_spec() -> RuleSpec {
        spec(&[("metric", "temperature"), ("above", "80")])
    }

    #[test]
    fn fires_after_holding_for_the_duration_and_resolves_below_the_clear_threshold() {
        let mut alerts = Alerts::new(vec![overheat()]);
        assert!(reading(&mut alerts, "d", 0, 70.0).is_empty());
        assert!(
            reading(&mut alerts, "d", 30, 81.0).is_empty(),
            "pending is not notified"
        );
        assert_eq!(alerts.counts(), [(1, 0)]);
        assert!(
            reading(&mut alerts, "d", 90, 85.0).is_empty(),
            "held 60 s of 120"
        );
        let fired = reading(&mut alerts, "d", 150, 86.0);
        assert_eq!(states(&fired), [("d", AlertState::Firing)]);
        assert_eq!(fired[0].started_at, T0 + 30 * S);
        assert_eq!(fired[0].event_time, T0 + 150 * S);
        assert_eq!(
            (fired[0].value, fired[0].threshold),
            (Some(86.0), Some(80.0))
        );
        assert_eq!(fired[0].severity.as_ref(), "critical");
        // Hovering around the threshold, and even just under it, does not resolve.
        for (t, v) in [
            (180, 79.0),
            (210, 81.0),
            (240, 76.0),
            (270, 80.5),
            (300, 75.0),
        ] {
            assert!(reading(&mut alerts, "d", t, v).is_empty(), "{v} at {t}");
        }
        let resolved = reading(&mut alerts, "d", 330, 74.9);
        assert_eq!(states(&resolved), [("d", AlertState::Resolved)]);
        assert_eq!(
            (resolved[0].value, resolved[0].threshold),
            (Some(74.9), Some(75.0))
        );
        assert_eq!(resolved[0].duration_s(), Some(300.0));
        assert_eq!(alerts.counts(), [(0, 0)]);
    }

    #[test]
    fn a_dip_before_the_duration_resets_pending_and_devices_are_independent() {
        let mut alerts = Alerts::new(vec![overheat()]);
        reading(&mut alerts, "a", 0, 90.0);
        reading(&mut alerts, "b", 0, 90.0);
        reading(&mut alerts, "a", 60, 79.0); // back within: a's timer restarts
        assert!(reading(&mut alerts, "a", 120, 90.0).is_empty());
        assert_eq!(
            states(&reading(&mut alerts, "b", 120, 90.0)),
            [("b", AlertState::Firing)]
        );
        assert!(reading(&mut alerts, "a", 230, 90.0).is_empty());
        assert_eq!(
            states(&reading(&mut alerts, "a", 240, 90.0)),
            [("a", AlertState::Firing)]
        );
    }

    #[test]
    fn without_for_the_first_reading_fires_and_out_of_order_readings_are_skipped() {
        let rule = spec(&[
            ("metric", "battery"),
            ("below", "20"),
            ("clear_above", "25"),
        ])
        .compile()
        .unwrap();
        let mut alerts = Alerts::new(vec![rule]);
        let battery = |alerts: &mut Alerts, secs: i64, v: f64| {
            let mut events = Vec::new();
            let o = Observation {
                device: "d",
                ts: T0 + secs * S,
                received_at: T0,
                known: [None, None, Some(v), None],
                extra: &[],
            };
            alerts.observe(&o, &mut events);
            events
        };
        assert_eq!(
            states(&battery(&mut alerts, 10, 19.0)),
            [("d", AlertState::Firing)]
        );
        assert!(
            battery(&mut alerts, 5, 90.0).is_empty(),
            "older than the latest reading"
        );
        assert!(
            battery(&mut alerts, 20, 22.0).is_empty(),
            "between the thresholds"
        );
        assert_eq!(
            states(&battery(&mut alerts, 30, 26.0)),
            [("d", AlertState::Resolved)]
        );
        // A reading without the metric changes nothing.
        assert!(reading(&mut alerts, "d", 40, 99.0).is_empty());
    }

    #[test]
    fn silence_fires_on_the_server_clock_and_resolves_on_the_next_reading() {
        let rule = spec(&[("name", "silent"), ("no_data_for", "5m")])
            .compile()
            .unwrap();
        let mut alerts = Alerts::new(vec![rule]);
        reading(&mut alerts, "quiet", 0, 20.0);
        reading(&mut alerts, "chatty", 0, 20.0);
        let mut events = Vec::new();
        alerts.tick(T0 + 299 * S, &mut events);
        assert!(events.is_empty());
        reading(&mut alerts, "chatty", 200, 20.0);
        alerts.tick(T0 + 300 * S, &mut events);
        assert_eq!(states(&events), [("quiet", AlertState::Firing)]);
        assert_eq!(events[0].started_at, T0);
        alerts.tick(T0 + 400 * S, &mut events);
        assert_eq!(events.len(), 1, "fires once");
        let resolved = reading(&mut alerts, "quiet", 450, 20.0);
        assert_eq!(states(&resolved), [("quiet", AlertState::Resolved)]);
        assert_eq!(resolved[0].duration_s(), Some(450.0));
    }

    #[test]
    fn state_survives_a_restart_and_silence_counts_from_the_restart() {
        let silent = spec(&[("name", "silent"), ("no_data_for", "5m")])
            .compile()
            .unwrap();
        let mut alerts = Alerts::new(vec![overheat(), silent.clone()]);
        reading(&mut alerts, "pending", 0, 90.0);
        reading(&mut alerts, "firing", 0, 90.0);
        reading(&mut alerts, "firing", 120, 90.0);
        let saved = alerts.save();

        // Down for ten minutes: nobody is "silent" for it at once.
        let restarted_at = T0 + 720 * S;
        let mut after = Alerts::new(vec![overheat(), silent]);
        after.restore(saved, restarted_at);
        let mut events = Vec::new();
        after.tick(restarted_at + 299 * S, &mut events);
        assert!(events.is_empty(), "{events:?}");
        // The `for` timer went on: pending since 0, so a reading at 130 fires.
        assert_eq!(
            states(&reading(&mut after, "pending", 130, 90.0)),
            [("pending", AlertState::Firing)]
        );
        // The firing alert is remembered: no second firing, and it resolves.
        assert!(reading(&mut after, "firing", 150, 90.0).is_empty());
        assert_eq!(
            states(&reading(&mut after, "firing", 160, 10.0)),
            [("firing", AlertState::Resolved)]
        );
    }

    #[test]
    fn a_reload_keeps_matching_rules_and_resolves_the_alerts_of_removed_ones() {
        let mut alerts = Alerts::new(vec![overheat()]);
        reading(&mut alerts, "d", 0, 90.0);
        reading(&mut alerts, "d", 120, 90.0);
        let mut events = Vec::new();
        // Same name and condition, new threshold: the firing alert stays.
        let mut changed = overheat();
        changed.check = Check::Above {
            threshold: 85.0,
            clear: 70.0,
        };
        alerts.set_rules(vec![changed], T0, &mut events);
        assert!(events.is_empty());
        assert!(
            reading(&mut alerts, "d", 130, 72.0).is_empty(),
            "the new clear threshold applies"
        );
        alerts.set_rules(vec![], T0 + 200 * S, &mut events);
        assert_eq!(states(&events), [("d", AlertState::Resolved)]);
        assert_eq!(events[0].reason, Some("rule removed or changed"));
    }
}
