//! Reading the datapath's event ring buffer without blocking the datapath:
//! when the reader is slow the ring fills, new events are counted as lost by
//! the programs themselves, and packets are never held up.

use std::os::fd::AsRawFd;

use aya::maps::{Map, MapData, RingBuf};
use cilium_abi::Event;
use tokio::io::unix::AsyncFd;

use crate::{DatapathError, Result};

/// How often the reader looks for events submitted without a wakeup.
pub const POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// An async reader of [`Event`]s.
pub struct EventReader {
    ring: AsyncFd<RawRing>,
}

struct RawRing(RingBuf<MapData>);

impl AsRawFd for RawRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl EventReader {
    /// Wraps the ring buffer map taken from [`crate::Loaded::take_events`].
    /// Must be called inside a tokio runtime.
    pub fn new(map: Map) -> Result<EventReader> {
        let ring = RingBuf::try_from(map).map_err(|e| DatapathError::Map { map: "cilium_events", source: Box::new(e) })?;
        // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd
        // owns the ring buffer, and as_raw_fd always returns that fd.
        let ring = unsafe { AsyncFd::register_with_interest(RawRing(ring), tokio::io::Interest::READABLE) }
            .map_err(|e| DatapathError::Io { what: "registering the event ring buffer".into(), source: e.into() })?;
        Ok(EventReader { ring })
    }

    fn drain(&mut self) -> Vec<(Event, Vec<u8>)> {
        let mut out = Vec::new();
        let ring = &mut self.ring.get_mut().0;
        while let Some(item) = ring.next() {
            if let Some((ev, capture)) = Event::from_bytes(&item) {
                out.push((ev, capture.to_vec()));
            }
        }
        out
    }

    /// Waits for events and returns every one available (at least one),
    /// each with the packet bytes captured after it (drops only).
    /// The datapath submits without waking us (see bpf/lib/events.h), so
    /// besides waiting for a wakeup this polls every [`POLL_INTERVAL`].
    pub async fn next_batch(&mut self) -> Result<Vec<(Event, Vec<u8>)>> {
        loop {
            let out = self.drain();
            if !out.is_empty() {
                return Ok(out);
            }
            tokio::select! {
                ready = self.ring.readable_mut() => {
                    let mut guard = ready.map_err(|source| DatapathError::Io { what: "waiting for events".into(), source })?;
                    guard.clear_ready();
                }
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }
}
