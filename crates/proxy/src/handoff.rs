//! Stopping without resetting: when the agent stops, each proxied HTTP/1
//! connection finishes the request it is in, then parks at its next idle
//! point (between requests, nothing buffered); the parked sockets and the
//! listeners go to the next agent (see the agent's `l7` module), which
//! resumes serving them, so a restart resets no connection that is not in
//! the middle of a request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::server::ConnInfo;

/// The protocol a proxied TCP connection speaks (the listener it came
/// through decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum L7Proto {
    /// HTTP/1.1, or HTTP/2 with prior knowledge.
    #[default]
    Http,
    Kafka,
}

/// A connection parked for the next agent.
#[derive(Debug)]
pub struct Parked {
    pub info: ConnInfo,
    pub proto: L7Proto,
    pub client: std::net::TcpStream,
    pub upstream: Option<std::net::TcpStream>,
}

/// The stop signal and what parked.
#[derive(Debug, Default)]
pub struct Drain {
    stopping: AtomicBool,
    notify: Notify,
    active: AtomicUsize,
    parked: Mutex<Vec<Parked>>,
}

/// Counts a connection as active while it lives.
pub struct Active<'a>(&'a Drain);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }
}

impl Drain {
    pub fn enter(&self) -> Active<'_> {
        self.active.fetch_add(1, Ordering::SeqCst);
        Active(self)
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Resolves once stopping has begun.
    pub async fn stopped(&self) {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.stopping() {
                return;
            }
            n.await;
        }
    }

    pub fn park(&self, p: Parked) {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }

    /// Begins stopping: listeners stop accepting, idle connections park.
    pub fn begin(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Waits (at most `timeout`) for every connection to park or end;
    /// returns the parked ones.
    pub async fn parked(&self, timeout: Duration) -> Vec<Parked> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                break;
            }
        }
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
