//! Running aggregates of one metric and of one window.

/// count, min, max, sum, first and last (with their event times) of one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricAcc {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub first_ts: i64,
    pub last: f64,
    pub last_ts: i64,
}

impl MetricAcc {
    pub const EMPTY: MetricAcc = MetricAcc {
        count: 0,
        sum: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        first: 0.0,
        first_ts: i64::MAX,
        last: 0.0,
        last_ts: i64::MIN,
    };

    /// Adds one value observed at event time `ts` (ns). Of values with the same event
    /// time, `first` keeps the one that arrived first and `last` the one that arrived last.
    pub fn add(&mut self, value: f64, ts: i64) {
        self.count += 1;
        self.sum += value;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        if ts < self.first_ts {
            self.first = value;
            self.first_ts = ts;
        }
        if ts >= self.last_ts {
            self.last = value;
            self.last_ts = ts;
        }
    }

    /// Folds in the aggregates of a later window.
    pub fn merge(&mut self, other: &MetricAcc) {
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first_ts < self.first_ts {
            self.first = other.first;
            self.first_ts = other.first_ts;
        }
        if other.last_ts >= self.last_ts {
            self.last = other.last;
            self.last_ts = other.last_ts;
        }
    }

    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// One device's window: `[start, start + size)` in event time.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowAcc {
    pub start: i64,
    pub readings: u64,
    /// The four known metrics, in [`crate::METRICS`] order.
    pub known: [MetricAcc; 4],
    /// Other numeric payload fields, by name, in order of first appearance.
    pub extra: Vec<(Box<str>, MetricAcc)>,
}

impl WindowAcc {
    pub fn new(start: i64) -> Self {
        WindowAcc {
            start,
            readings: 0,
            known: [MetricAcc::EMPTY; 4],
            extra: Vec::new(),
        }
    }

    /// Adds one reading at event time `ts`: the known metrics it has, and its others.
    pub fn add_reading<'a>(
        &mut self,
        ts: i64,
        known: [Option<f64>; 4],
        extra: impl IntoIterator<Item = (&'a str, f64)>,
    ) {
        self.readings += 1;
        for (acc, value) in self.known.iter_mut().zip(known) {
            if let Some(value) = value {
                acc.add(value, ts);
            }
        }
        for (name, value) in extra {
            self.add_extra(name, value, ts);
        }
    }

    pub fn add_extra(&mut self, name: &str, value: f64, ts: i64) {
        match self.extra.iter_mut().find(|(n, _)| &**n == name) {
            Some((_, acc)) => acc.add(value, ts),
            None => {
                let mut acc = MetricAcc::EMPTY;
                acc.add(value, ts);
                self.extra.push((name.into(), acc));
            }
        }
    }

    /// Folds a later (minute) window into this (hour) window.
    pub fn merge(&mut self, other: &WindowAcc) {
        self.readings += other.readings;
        for (mine, theirs) in self.known.iter_mut().zip(&other.known) {
            mine.merge(theirs);
        }
        for (name, theirs) in &other.extra {
            match self.extra.iter_mut().find(|(n, _)| n == name) {
                Some((_, mine)) => mine.merge(theirs),
                None => self.extra.push((name.clone(), *theirs)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_and_last_follow_event_time_not_arrival() {
        let mut acc = MetricAcc::EMPTY;
        acc.add(2.0, 20);
        acc.add(1.0, 10);
        acc.add(3.0, 30);
        acc.add(4.0, 30); // same time, arrived later: the last
        assert_eq!(
            (acc.first, acc.first_ts, acc.last, acc.last_ts),
            (1.0, 10, 4.0, 30)
        );
        assert_eq!((acc.count, acc.sum, acc.min, acc.max), (4, 10.0, 1.0, 4.0));
        assert_eq!(acc.avg(), Some(2.5));
        assert_eq!(MetricAcc::EMPTY.avg(), None);
    }

    #[test]
    fn merging_windows_equals_adding_everything_to_one() {
        let values = [(1.5, 5), (-2.0, 1), (7.25, 9), (0.5, 12), (3.0, 15)];
        let mut whole = WindowAcc::new(0);
        let (mut a, mut b) = (WindowAcc::new(0), WindowAcc::new(10));
        for (i, &(v, ts)) in values.iter().enumerate() {
            whole.readings += 1;
            whole.known[0].add(v, ts);
            whole.add_extra("co2", v * 2.0, ts);
            let part = if ts < 10 { &mut a } else { &mut b };
            part.readings += 1;
            part.known[0].add(v, ts);
            part.add_extra("co2", v * 2.0, ts);
            if i == 0 {
                part.add_extra("only_once", 1.0, ts);
                whole.add_extra("only_once", 1.0, ts);
            }
        }
        a.merge(&b);
        a.start = whole.start;
        assert_eq!(a, whole);
    }
}
