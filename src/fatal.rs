//! A panic in a pipeline thread stops the server with a clear error, instead of leaving
//! it running without that stage (a dead decoder or aggregator would otherwise show only
//! at shutdown, or as an error logged for every batch).
//!
//! The pipeline threads are named (`ingest-N`, `aggregator`, `flusher`, the broker's
//! `mqtt-router-*`, the alert writer `alerts-dead-letters`); a panic on one of them is
//! reported once through [`Fatal`]. Panics elsewhere (a request handler on the async
//! runtime, which tokio contains) are not fatal.

use std::sync::{Arc, Mutex, OnceLock};

/// Threads whose panic stops the server, by name or name prefix (ending in `-`).
const PIPELINE_THREADS: [&str; 5] = [
    "ingest-",
    "aggregator",
    "flusher",
    "mqtt-router-",
    "alerts-dead-letters",
];

/// The first fatal panic, once one happened.
#[derive(Clone, Default)]
pub(crate) struct Fatal {
    first: Arc<Mutex<Option<String>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Fatal {
    /// Waits for a fatal panic; returns what it said.
    pub(crate) async fn wait(&self) -> String {
        loop {
            let notified = self.changed.notified();
            if let Some(first) = self.get() {
                return first;
            }
            notified.await;
        }
    }

    pub(crate) fn get(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn report(&self, what: String) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(what);
            self.changed.notify_waiters();
        }
    }
}

fn is_pipeline_thread(name: &str) -> bool {
    PIPELINE_THREADS.iter().any(|t| {
        if t.ends_with('-') {
            name.starts_with(t)
        } else {
            name == *t
        }
    })
}

/// Installs the panic hook (once per process; later calls return the same [`Fatal`]).
/// The default hook still prints the panic.
pub(crate) fn install() -> Fatal {
    static FATAL: OnceLock<Fatal> = OnceLock::new();
    FATAL
        .get_or_init(|| {
            let fatal = Fatal::default();
            let reporter = fatal.clone();
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                let thread = std::thread::current();
                let name = thread.name().unwrap_or_default();
                if is_pipeline_thread(name) {
                    let message = info
                        .payload()
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| info.payload().downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    let at = info
                        .location()
                        .map(|l| format!(" at {}:{}", l.file(), l.line()))
                        .unwrap_or_default();
                    let what = format!("the {name} thread panicked{at}: {message}");
                    tracing::error!("{what}; stopping the server");
                    reporter.report(what);
                }
            }));
            fatal
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_a_pipeline_thread_is_fatal_and_one_elsewhere_is_not() {
        let fatal = install();
        let elsewhere = std::thread::Builder::new()
            .name("http-handler".into())
            .spawn(|| panic!("not ours"))
            .unwrap();
        assert!(elsewhere.join().is_err());
        assert_eq!(fatal.get(), None);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let waiting = {
            let fatal = fatal.clone();
            runtime.spawn(async move { fatal.wait().await })
        };
        let decoder = std::thread::Builder::new()
            .name("ingest-1".into())
            .spawn(|| panic!("index out of bounds"))
            .unwrap();
        assert!(decoder.join().is_err());
        let what = runtime.block_on(waiting).unwrap();
        assert!(
            what.starts_with("the ingest-1 thread panicked at src/fatal.rs:")
                && what.ends_with(": index out of bounds"),
            "{what}"
        );
        assert!(is_pipeline_thread("aggregator") && !is_pipeline_thread("aggregator2"));
    }
}
