//! Helpers for the privileged tests: crafted packets, and the lab harness
//! that drives the real binaries. Tests in this crate need root; they fail
//! loudly (never skip) without it, and clean up what they make even when they
//! fail.

pub mod containerd;
pub mod kafka_broker;
pub mod packet;

/// Fails the test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "privileged tests need root (run the README's test command as root)");
}

pub mod lab;
