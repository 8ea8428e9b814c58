//! gRPC over mutual TLS: the dialler a channel connects through, and the
//! stream of accepted connections the server reads (see `crate::tls`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::codegen::http::Uri;

use crate::locks::LockExt as _;
use crate::tls::{Tls, node_id_of};

/// A TLS handshake, either side, takes at most this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Node ids by peer address, from the certificates peers presented when
/// this node dialled them.
pub type PeerIds = Arc<Mutex<HashMap<String, String>>>;

/// An address that presented no valid fleet certificate is not dialled
/// again for this long.
pub const UNTRUSTED_FOR: Duration = Duration::from_secs(600);
/// An address that could not be reached is dialled again after a pause
/// doubling from one second up to this.
pub const UNREACHABLE_MAX: Duration = Duration::from_secs(30);
/// Most addresses remembered as failing.
const MAX_FAILING: usize = 1 << 16;

/// Addresses whose last dial failed: not dialled again before `until`.
/// Members announced by others are only names and addresses until this
/// node reaches them and sees a fleet certificate; one that names
/// addresses with no syncd behind them (issue 11: 1,500 fake members
/// made a replica a reflector, ~2,600 connections a second) costs one
/// attempt per address per pause, not one per probe.
#[derive(Debug, Default)]
pub struct Failing {
    by_address: Mutex<HashMap<String, (tokio::time::Instant, u32)>>,
}

impl Failing {
    /// `Err` with why when `addr` is not to be dialled now.
    fn check(&self, addr: &str) -> Result<(), std::io::Error> {
        match self.by_address.locked().get(addr) {
            Some((until, _)) if tokio::time::Instant::now() < *until => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!(
                    "{addr} failed recently; not dialled again for {:.0} s",
                    until
                        .duration_since(tokio::time::Instant::now())
                        .as_secs_f64()
                ),
            )),
            _ => Ok(()),
        }
    }

    fn failed(&self, addr: &str, untrusted: bool) {
        let now = tokio::time::Instant::now();
        let mut m = self.by_address.locked();
        if m.len() >= MAX_FAILING && !m.contains_key(addr) {
            m.retain(|_, (until, _)| *until > now);
            if m.len() >= MAX_FAILING {
                return;
            }
        }
        let e = m.entry(addr.to_string()).or_insert((now, 0));
        e.1 = e.1.saturating_add(1);
        let pause = if untrusted {
            UNTRUSTED_FOR
        } else {
            Duration::from_secs(1u64 << (e.1 - 1).min(6)).min(UNREACHABLE_MAX)
        };
        e.0 = now + pause;
    }

    fn succeeded(&self, addr: &str) {
        self.by_address.locked().remove(addr);
    }

    /// Addresses not to be dialled now.
    pub fn count(&self) -> usize {
        let now = tokio::time::Instant::now();
        self.by_address
            .locked()
            .values()
            .filter(|(until, _)| *until > now)
            .count()
    }
}

/// Connects a channel: TCP, then a TLS handshake presenting this node's
/// certificate and verifying the peer's (chained to the fleet CA); notes
/// the id the peer's certificate names. Addresses that failed are left
/// alone for a while ([`Failing`]).
#[derive(Clone, Debug)]
pub struct Dialer {
    pub tls: Arc<Tls>,
    pub ids: PeerIds,
    pub failing: Arc<Failing>,
    pub connect_timeout: Duration,
}

type Dialed = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for Dialer {
    type Response = Dialed;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Dialed, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let d = self.clone();
        Box::pin(async move {
            let addr = uri
                .authority()
                .map(|a| a.to_string())
                .ok_or_else(|| std::io::Error::other(format!("no address in {uri}")))?;
            d.failing.check(&addr)?;
            let tcp = tokio::time::timeout(d.connect_timeout, TcpStream::connect(&addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))
                .and_then(|r| r)
                .inspect_err(|_| d.failing.failed(&addr, false))?;
            tcp.set_nodelay(true)?;
            // The name is not checked (see crate::tls): any fixed one does.
            let name =
                rustls::pki_types::ServerName::try_from("syncd-peer").expect("a valid DNS name");
            let tls = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TlsConnector::from(d.tls.client()).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })
            .inspect_err(|_| d.failing.failed(&addr, false))?
            .map_err(|e| {
                tracing::warn!(peer = %addr, error = %e, "not dialling again for {}: no valid fleet certificate", humantime::format_duration(UNTRUSTED_FOR));
                d.failing.failed(&addr, true);
                std::io::Error::other(format!("TLS handshake with {addr}: {e}"))
            })?;
            let id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(node_id_of)
                .ok_or_else(|| {
                    d.failing.failed(&addr, true);
                    std::io::Error::other(format!("{addr} presented no node certificate"))
                })?;
            d.failing.succeeded(&addr);
            d.ids.locked().insert(addr, id);
            Ok(TokioIo::new(tls))
        })
    }
}

/// Accepted connections after their TLS handshake, for
/// `serve_with_incoming`. Each handshake runs on its own task with a
/// timeout, so a slow or silent client delays nobody; a refused one is
/// logged with its address and why (no certificate, another CA, expired).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause, go on.
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tx, acceptor) = (tx.clone(), TlsAcceptor::from(tls.server()));
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(s)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %addr, error = %e, "refused a peer at the TLS handshake");
                    }
                    Err(_) => {
                        tracing::warn!(peer = %addr, "refused a peer: TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
