//! Accept loops: each listener hands every socket to its own task at once, so a client
//! that is slow to handshake or says nothing delays nobody.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};

use crate::connection::{self, Shared};
use crate::meters::Attempt;
use crate::transport::Listener;

/// Sockets accepted beyond `mqtt.max_connections` that may be handshaking at once (they
/// are answered with a CONNACK saying the server is full, then closed).
const HANDSHAKE_ROOM: usize = 1024;

/// Binds `addr` with a listen backlog that lets a fleet reconnect at once (the kernel
/// caps it at `net.core.somaxconn`).
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Tasks serving sockets, for the shutdown to wait on.
pub(crate) struct Tasks(AtomicUsize);

impl Tasks {
    pub(crate) fn new() -> Tasks {
        Tasks(AtomicUsize::new(0))
    }

    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

struct TaskGuard(Arc<Tasks>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    tasks: Arc<Tasks>,
    listener: Listener,
    socket: TcpListener,
) {
    let mut shutdown = shared.shutdown.clone();
    let mut last_error_log = None::<tokio::time::Instant>;
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let open = tasks.0.fetch_add(1, Ordering::AcqRel) + 1;
                let guard = TaskGuard(tasks.clone());
                if open > shared.limits.max_connections + HANDSHAKE_ROOM {
                    drop(stream);
                    drop(guard);
                    shared.meters.attempt(listener, Attempt::ServerFull);
                    continue;
                }
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    connection::serve(shared, listener, stream, peer).await;
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: say so (once a minute), back off
                // a little instead of spinning, keep serving those already connected.
                let now = tokio::time::Instant::now();
                if last_error_log.is_none_or(|t| now.duration_since(t) > Duration::from_secs(60)) {
                    tracing::error!(listener = listener.label(), error = %e, "cannot accept MQTT connections");
                    last_error_log = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
