//! A worker instance's stderr, bounded: a chatty or looping worker cannot
//! flood the gateway's log.

use std::sync::Arc;

/// The most one worker instance (one request) writes to the gateway's
/// stderr; what it writes beyond is dropped, with one line saying so.
const STDERR_LIMIT: usize = 64 << 10;
/// How much one stderr write may carry.
pub const STDERR_WRITE_BUDGET: usize = 4096;

/// A worker instance's stderr: passed to the gateway's, up to
/// [`STDERR_LIMIT`] bytes, then swallowed (the worker never sees a failed
/// write, which would make a panicking `eprintln!` out of a chatty log).
pub struct BoundedStderr {
    worker: Arc<str>,
    left: usize,
}

impl BoundedStderr {
    pub fn new(worker: Arc<str>) -> BoundedStderr {
        BoundedStderr {
            worker,
            left: STDERR_LIMIT,
        }
    }
}

impl tokio::io::AsyncWrite for BoundedStderr {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        use std::io::Write;
        if self.left > 0 {
            let take = buf.len().min(self.left);
            self.left -= take;
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(&buf[..take]);
            if self.left == 0 {
                let _ = writeln!(
                    stderr,
                    "\n[worker `{}` wrote more than {STDERR_LIMIT} bytes to stderr in one request; the rest is dropped]",
                    self.worker
                );
            }
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
