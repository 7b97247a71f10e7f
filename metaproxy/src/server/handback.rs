//! Handing hyper's buffers back between requests: the socket under
//! hyper reports end-of-stream once everything it was given is answered.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::net::TcpStream;

use crate::{model::caller::Caller, ops::connlog::Entry, surface::Handled};

/// The socket under hyper, taken back from it between requests.
///
/// hyper holds a read and a write buffer (8 KiB each) for as long as it
/// serves a connection, so a keep-alive connection waiting for its next
/// request would keep them. When hyper asks for more bytes and the socket
/// has none, and everything it was given has been answered, this reports
/// end-of-stream: to hyper that is a client closing an idle connection,
/// which ends it cleanly (under `without_shutdown`, the socket untouched).
/// Bytes that arrive later wait in the socket for the next round.
///
/// "Everything answered" is: no request in the service, a response flushed
/// since the last bytes were read, and those bytes ending a request head
/// (`\r\n\r\n`). So a request arriving in pieces, a body still to come,
/// or a pipelined request hyper holds in its buffer all pass through
/// unchanged; at worst a connection keeps hyper's buffers, as it would
/// without this.
pub(super) struct HandBack {
    pub(super) stream: TcpStream,
    /// Requests handed to the service and not yet answered.
    pub(super) in_flight: Arc<AtomicUsize>,
    /// The last bytes read.
    pub(super) tail: [u8; 4],
    /// Bytes were written since the last flush.
    pub(super) wrote: bool,
    /// A response was flushed and nothing has been read since.
    pub(super) flushed: bool,
    /// End-of-stream was reported by us, not by the client.
    pub(super) handed_back: bool,
}

impl HandBack {
    pub(super) fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            in_flight: Arc::default(),
            tail: [0; 4],
            wrote: false,
            flushed: false,
            handed_back: false,
        }
    }

    pub(super) fn answered_all(&self) -> bool {
        self.flushed && &self.tail == b"\r\n\r\n" && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// The socket: `Ok` if hyper ended because we handed it back, `Err` if
    /// the client closed or the connection was not to be kept.
    pub(super) fn waiting_again(self) -> Result<TcpStream, TcpStream> {
        if self.handed_back {
            Ok(self.stream)
        } else {
            Err(self.stream)
        }
    }
}

/// One request in the service, counted until its response is ready.
pub(super) struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    pub(super) fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl tokio::io::AsyncRead for HandBack {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending if this.answered_all() => {
                this.handed_back = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                let read = &buf.filled()[before..];
                for &b in &read[read.len().saturating_sub(4)..] {
                    this.tail.rotate_left(1);
                    this.tail[3] = b;
                }
                this.flushed = false;
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for HandBack {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.wrote |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let flushed = Pin::new(&mut this.stream).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) && this.wrote {
            this.wrote = false;
            this.flushed = true;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub(super) fn answered(
    caller: &Arc<Caller>,
    method: &hyper::Method,
    path: &str,
    handled: &Handled,
) -> Entry {
    Entry::answered(
        caller,
        method,
        path,
        handled
            .container
            .as_deref()
            .map(|c| (&c.id, c.name.as_str())),
        handled.role.as_ref(),
        handled.outcome(),
        handled.reason(),
    )
}
