//! The flow ring: the last N flows, overwritten oldest first. Writers never
//! wait for readers; a follower that falls more than N flows behind is told
//! how many it lost. L7 flows are kept as the proxy reported them and built
//! when read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::parser::L7Flow;
use crate::proto::flow::Flow;

/// A flow in the ring.
#[derive(Debug, Clone)]
enum Slot {
    Built(Arc<Flow>),
    /// Built for each read and never kept: an L7 record stays a fraction
    /// of a flow's size while no one is watching.
    Lazy(Arc<L7Flow>),
}

impl Slot {
    fn flow(&self) -> Arc<Flow> {
        match self {
            Slot::Built(f) => f.clone(),
            Slot::Lazy(l) => Arc::new(L7Flow::clone(l).build()),
        }
    }

    fn time_ns(&self) -> i128 {
        match self {
            Slot::Built(f) => f.time.as_ref().map(crate::server::ts_ns).unwrap_or(0),
            Slot::Lazy(l) => i128::from(l.meta.time_ns),
        }
    }
}

/// The ring.
#[derive(Debug)]
pub struct Ring {
    capacity: usize,
    inner: Mutex<Inner>,
    /// Wakes followers (the flows ever written, when they were woken).
    written: watch::Sender<u64>,
}

#[derive(Debug)]
struct Inner {
    flows: VecDeque<Slot>,
    /// Sequence number of `flows[0]`.
    first: u64,
}

/// What a follower read.
#[derive(Debug, Default)]
pub struct Read {
    pub flows: Vec<Arc<Flow>>,
    /// Flows overwritten before the follower got to them.
    pub lost: u64,
    /// Where to read next.
    pub next: u64,
}

impl Ring {
    /// A ring of `capacity` flows (upstream's sizes are 2^n - 1; any
    /// positive size works here).
    pub fn new(capacity: usize) -> Ring {
        let capacity = capacity.max(1);
        Ring {
            capacity,
            inner: Mutex::new(Inner {
                flows: VecDeque::with_capacity(capacity),
                first: 0,
            }),
            written: watch::channel(0).0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Flows held now.
    pub fn len(&self) -> usize {
        self.lock().flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Flows ever written.
    pub fn seen(&self) -> u64 {
        let g = self.lock();
        g.first + g.flows.len() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds flows, overwriting the oldest.
    pub fn push_all(&self, flows: impl IntoIterator<Item = Arc<Flow>>) {
        self.push_slots(flows.into_iter().map(Slot::Built));
    }

    /// Adds an L7 flow, built when read.
    pub fn push_l7(&self, f: L7Flow) {
        self.push_slots([Slot::Lazy(Arc::new(f))]);
    }

    /// Flows held now, and how many of them are from `since_ns` on (by
    /// their time; nothing is built).
    pub fn count_since(&self, since_ns: i128) -> (usize, usize) {
        let g = self.lock();
        (g.flows.len(), g.flows.iter().rev().take_while(|s| s.time_ns() >= since_ns).count())
    }

    fn push_slots(&self, slots: impl IntoIterator<Item = Slot>) {
        let mut g = self.lock();
        let mut n = 0u64;
        for f in slots {
            if g.flows.len() == self.capacity {
                g.flows.pop_front();
                g.first += 1;
            }
            g.flows.push_back(f);
            n += 1;
        }
        let end = g.first + g.flows.len() as u64;
        drop(g);
        // only followers need waking; one subscribing now reads the ring
        // after subscribing, so it sees these flows without being woken
        if n > 0 && self.written.receiver_count() > 0 {
            self.written.send_replace(end);
        }
    }

    /// Everything held now, oldest first, and the sequence after the last.
    pub fn snapshot(&self) -> (Vec<Arc<Flow>>, u64) {
        let g = self.lock();
        let slots: Vec<Slot> = g.flows.iter().cloned().collect();
        let end = g.first + g.flows.len() as u64;
        drop(g);
        // built outside the lock: writers never wait for a reader's building
        (slots.iter().map(Slot::flow).collect(), end)
    }

    /// Flows from sequence `from` on.
    pub fn read_from(&self, from: u64) -> Read {
        let g = self.lock();
        let end = g.first + g.flows.len() as u64;
        let start = from.max(g.first);
        let lost = g.first.saturating_sub(from);
        let slots: Vec<Slot> = g.flows.iter().skip((start - g.first) as usize).cloned().collect();
        drop(g);
        Read {
            flows: slots.iter().map(Slot::flow).collect(),
            lost,
            next: end.max(from),
        }
    }

    /// Wakes when flows are written.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.written.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(n: u32) -> Arc<Flow> {
        Arc::new(Flow {
            proxy_port: n,
            ..Default::default()
        })
    }

    #[test]
    fn overwrites_oldest_and_counts_what_a_follower_lost() {
        let r = Ring::new(3);
        r.push_all((0..5).map(flow));
        assert_eq!(r.len(), 3);
        assert_eq!(r.seen(), 5);
        let (s, next) = r.snapshot();
        assert_eq!(
            s.iter().map(|f| f.proxy_port).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(next, 5);
        let rd = r.read_from(1);
        assert_eq!(rd.lost, 1);
        assert_eq!(rd.flows.len(), 3);
        assert_eq!(rd.next, 5);
        let rd = r.read_from(4);
        assert_eq!((rd.lost, rd.flows.len(), rd.next), (0, 1, 5));
        let rd = r.read_from(5);
        assert_eq!((rd.lost, rd.flows.len(), rd.next), (0, 0, 5));
    }
}
