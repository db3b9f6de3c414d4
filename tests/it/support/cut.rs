//! Connections a handler can cut: the proxy's listener hands each request a [`Cut`] for its
//! own connection, so a fault can drop the connection without sending any answer (which no
//! axum response can do).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The switch of one connection.
#[derive(Clone, Default)]
pub struct Cut(Arc<Switch>);

impl std::fmt::Debug for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cut")
    }
}

#[derive(Default)]
pub struct Switch {
    cut: AtomicBool,
    waker: AtomicWaker,
}

impl Cut {
    /// Cuts the connection: its reads and writes fail from now on, so the server drops it
    /// without writing the response.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::SeqCst);
        self.0.waker.wake();
    }
}

/// A TCP stream that fails once its switch is thrown.
pub struct CuttableIo {
    inner: TcpStream,
    switch: Arc<Switch>,
}

impl CuttableIo {
    /// Registers the task to be woken by a cut, then reports whether it happened.
    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.switch.waker.register(cx.waker());
        if self.switch.cut.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "injected cut",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for CuttableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A listener whose connections carry their [`Cut`] as connect info.
pub struct CuttableListener(pub TcpListener);

impl Listener for CuttableListener {
    type Io = CuttableIo;
    type Addr = Cut;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((inner, _)) => {
                    let cut = Cut::default();
                    let io = CuttableIo {
                        inner,
                        switch: cut.0.clone(),
                    };
                    return (io, cut);
                }
                // Out of descriptors and the like: try again shortly.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr().map(|_| Cut::default())
    }
}

impl Connected<IncomingStream<'_, CuttableListener>> for Cut {
    fn connect_info(stream: IncomingStream<'_, CuttableListener>) -> Self {
        stream.remote_addr().clone()
    }
}
