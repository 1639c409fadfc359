//! The byte streams MQTT runs over: plain TCP, TLS (rustls) and WebSocket (binary
//! messages, subprotocol `mqtt`).
//!
//! An idle connection should cost little: over plain TCP, sluice waits for readability
//! before it reserves a read buffer, so a connection with nothing to say holds none.

use std::io;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Which listener a connection came through (the `listener` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Listener {
    Tcp,
    Tls,
    Ws,
}

impl Listener {
    pub(crate) const ALL: [Listener; 3] = [Listener::Tcp, Listener::Tls, Listener::Ws];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Listener::Tcp => "mqtt",
            Listener::Tls => "mqtts",
            Listener::Ws => "ws",
        }
    }
}

pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl Transport {
    /// The identity (`which` name) of the client certificate a TLS handshake verified.
    pub(crate) fn certificate(&self, which: crate::ClientIdentity) -> Option<String> {
        match self {
            Transport::Tls(stream) => {
                let der = stream.get_ref().1.peer_certificates()?.first()?;
                crate::certificate_identity(der, which)
            }
            _ => None,
        }
    }

    /// Reads what is available into `buf`, reserving at least `chunk` bytes first.
    /// Returns 0 at the end of the stream. Cancel-safe: nothing is lost if the future is
    /// dropped before it completes.
    pub(crate) async fn read(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        match self {
            Transport::Tcp(stream) => {
                stream.readable().await?;
                buf.reserve(chunk);
                // `read_buf` (not `try_read_buf`): a read that leaves room in the buffer
                // clears tokio's readiness, so the next wait needs no EAGAIN read.
                stream.read_buf(buf).await
            }
            Transport::Tls(stream) => {
                buf.reserve(chunk);
                stream.read_buf(buf).await
            }
            Transport::Ws(stream) => loop {
                match stream.next().await {
                    None => return Ok(0),
                    Some(Ok(Message::Binary(data))) => {
                        if data.is_empty() {
                            continue;
                        }
                        buf.extend_from_slice(&data);
                        return Ok(data.len());
                    }
                    // tungstenite answers pings itself (the pong goes out with the next
                    // write or flush).
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                        stream.flush().await.map_err(io::Error::other)?;
                    }
                    Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Text(_))) => {
                        // MQTT over WebSocket is binary only [MQTT-6.0.0-1].
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a WebSocket text message (MQTT is sent as binary messages)",
                        ));
                    }
                    Some(Err(e)) => return Err(io::Error::other(e)),
                }
            },
        }
    }

    pub(crate) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Transport::Tcp(stream) => stream.write_all(data).await,
            Transport::Tls(stream) => {
                stream.write_all(data).await?;
                stream.flush().await
            }
            Transport::Ws(stream) => stream
                .send(Message::Binary(bytes::Bytes::copy_from_slice(data)))
                .await
                .map_err(io::Error::other),
        }
    }

    /// Closes the stream (TLS close_notify, WebSocket close frame, TCP FIN).
    pub(crate) async fn shutdown(&mut self) {
        // Errors only mean the peer is gone already.
        match self {
            Transport::Tcp(stream) => drop(stream.shutdown().await),
            Transport::Tls(stream) => drop(stream.shutdown().await),
            Transport::Ws(stream) => drop(SinkExt::close(&mut **stream).await),
        }
    }
}
