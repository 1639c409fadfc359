//! MQTT: each notification published QoS 1 on `alerts/{deviceId}/{rule}` through an
//! in-process [`Publish`] (the broker's router), one at a time in the order the
//! aggregator emitted them: a subscriber to `alerts/#` sees them in that order.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::{BoxFuture, Job, Outcomes, QUEUE};

/// Hands a notification to the broker, inside the process.
pub trait Publish: Send + Sync + 'static {
    /// Completes once the broker has the message (QoS 1) or cannot take it.
    fn publish(&self, topic: String, payload: Arc<str>) -> BoxFuture<Result<(), String>>;
}

/// The label of the MQTT channel in metrics and dead letters.
pub(crate) const MQTT: &str = "mqtt";
/// A publish the broker has not taken after this long is a dead letter.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct MqttChannel {
    tx: Option<mpsc::Sender<Job>>,
    stop: watch::Sender<Option<Instant>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MqttChannel {
    pub(crate) fn start(
        publisher: Arc<dyn Publish>,
        outcomes: Outcomes,
        runtime: &tokio::runtime::Handle,
    ) -> MqttChannel {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        let (stop, stopping) = watch::channel(None::<Instant>);
        let task = runtime.spawn(async move {
            while let Some(job) = rx.recv().await {
                if stopping
                    .borrow()
                    .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    outcomes.dead(MQTT, &job, 0, "sluice stopped before it was published");
                    continue;
                }
                let published = tokio::time::timeout(
                    PUBLISH_TIMEOUT,
                    publisher.publish(job.topic.clone(), job.payload.clone()),
                )
                .await;
                match published {
                    Ok(Ok(())) => outcomes.delivered(MQTT),
                    Ok(Err(e)) => outcomes.dead(MQTT, &job, 1, &e),
                    Err(_) => outcomes.dead(
                        MQTT,
                        &job,
                        1,
                        &format!("the broker did not take it within {PUBLISH_TIMEOUT:?}"),
                    ),
                }
            }
        });
        MqttChannel {
            tx: Some(tx),
            stop,
            task: Some(task),
        }
    }

    /// Queues `job`; a full queue makes it a dead letter at once. Never waits.
    pub(crate) fn send(&self, job: Job, outcomes: &Outcomes) {
        let Some(tx) = &self.tx else {
            return outcomes.dead(MQTT, &job, 0, "sluice is stopping");
        };
        match tx.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => outcomes.dead(
                MQTT,
                &job,
                0,
                &format!("{QUEUE} notifications already waiting for the broker"),
            ),
            Err(mpsc::error::TrySendError::Closed(job)) => {
                outcomes.dead(MQTT, &job, 0, "the MQTT publisher stopped")
            }
        }
    }

    pub(crate) fn begin_stop(
        &mut self,
        deadline: std::time::Instant,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let _ = self.stop.send(Some(Instant::from_std(deadline)));
        self.tx = None;
        self.task.take()
    }
}
