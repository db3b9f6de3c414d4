//! The first-contact gate of an HTTPS registry: its first request goes alone until its
//! connection is up, so the requests that start with it share that connection (HTTP/2)
//! instead of each opening its own.
//!
//! Whether a registry speaks HTTP/2 is learnt in the TLS handshake (ALPN); until a connection
//! has learnt it, the pool cannot know that one connection will do, so every request that
//! starts together opens its own: a sync of 31 tags opened ~30 TLS connections per registry
//! (handshakes cost CPU on both ends and, across a WAN, a round trip each). The gate opens as
//! soon as the first request's connection is established, one round trip (TLS 1.3) after it
//! started, not when its answer arrives, one round trip later: the others then go out while
//! the first is still in flight, over the same HTTP/2 connection.
//!
//! How "established" is seen: [`ConnectWatchLayer`] wraps the client's connector and, when a
//! connection is made for a request that carries a [`Watch`] (a task-local set around the gate
//! holder's request only), marks it. hyper-util puts an HTTP/2 connection in its pool in the
//! same poll in which the connector returns it (the HTTP/2 preface is a write, the pool insert
//! synchronous), so the gate is opened after that poll has returned: a request let through
//! then finds the connection in the pool and does not race a connection of its own. On an
//! HTTP/1.1 registry the others then open their own connections one round trip earlier, as
//! they would have after the first answer. Any answer, or a failure, opens the gate as well,
//! so a dead registry does not serialise its timeouts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use reqwest::{RequestBuilder, Response};
use tokio::sync::{Mutex, MutexGuard};

tokio::task_local! {
    /// Set while the gate holder's request is polled: its connection reports here.
    static WATCH: Arc<Watch>;
}

/// Set by the connector when the watched request's connection is established.
#[derive(Default)]
struct Watch {
    connected: AtomicBool,
}

/// A connector layer that tells a watched request its connection is up. Unwatched requests
/// (all but each registry's first) pass through untouched.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConnectWatchLayer;

impl<S> tower_layer::Layer<S> for ConnectWatchLayer {
    type Service = ConnectWatch<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectWatch { inner }
    }
}

/// The service of [`ConnectWatchLayer`].
#[derive(Clone, Debug)]
pub(crate) struct ConnectWatch<S> {
    inner: S,
}

impl<S, R> tower_service::Service<R> for ConnectWatch<S>
where
    S: tower_service::Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let connecting = self.inner.call(req);
        Box::pin(async move {
            let conn = connecting.await?;
            // Polled inside the watched request's poll when it is the gate holder's own
            // connection; a connection hyper finishes in the background has no watch.
            let _ = WATCH.try_with(|w| w.connected.store(true, Ordering::Release));
            Ok(conn)
        })
    }
}

/// The gate of one registry. Cheap when open: one atomic load.
pub(crate) struct Gate {
    /// Held by the gate holder until its connection is up or its answer arrives.
    first: Mutex<()>,
    /// The gate is open for good.
    open: AtomicBool,
}

impl Gate {
    /// A closed gate.
    pub(crate) fn new() -> Self {
        Gate {
            first: Mutex::new(()),
            open: AtomicBool::new(false),
        }
    }

    /// The gate has opened for good.
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Sends `req`: straight away when the gate is open; else one at a time until it opens.
    pub(crate) async fn send(&self, req: RequestBuilder) -> reqwest::Result<Response> {
        if self.open.load(Ordering::Acquire) {
            return req.send().await;
        }
        let guard = self.first.lock().await;
        if self.open.load(Ordering::Acquire) {
            drop(guard);
            return req.send().await;
        }
        let resp = self.send_watched(req, guard).await;
        self.open.store(true, Ordering::Release);
        resp
    }

    /// The gate holder's request: the gate opens after the poll in which its connection came
    /// up, or when it ends.
    async fn send_watched(
        &self,
        req: RequestBuilder,
        guard: MutexGuard<'_, ()>,
    ) -> reqwest::Result<Response> {
        let watch = Arc::new(Watch::default());
        let mut guard = Some(guard);
        let mut sending = std::pin::pin!(WATCH.scope(watch.clone(), req.send()));
        std::future::poll_fn(|cx| {
            let polled = sending.as_mut().poll(cx);
            if guard.is_some() && watch.connected.load(Ordering::Acquire) {
                self.open.store(true, Ordering::Release);
                guard = None;
            }
            polled
        })
        .await
    }
}
