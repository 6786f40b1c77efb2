//! Handing the L7 proxy's sockets from a stopping agent to the next one.
//! The stopping agent parks its idle proxied connections (see
//! `cilium_proxy::handoff`), then starts a small holder process (this
//! binary, `proxy-handoff-holder`) that inherits the listeners and parked
//! connections and offers them on a unix socket in the state directory; the
//! next agent takes them at start. Listeners never close, so connections
//! arriving in between wait in the kernel's backlog; parked connections
//! resume where they were: between two requests.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use cilium_proxy::{ConnInfo, L7Proto};
use cilium_proxy::handoff::Parked;
use nix::sys::socket::{AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Environment variable carrying the holder's instructions.
pub const HOLDER_ENV: &str = "CILIUM_PROXY_HANDOFF";
/// The holder gives up after this long without a taker.
const HOLD_FOR: Duration = Duration::from_secs(120);

/// One socket (or a connection's two) being handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Item {
    TcpListener { port: u16 },
    UdpSocket { port: u16 },
    Conn {
        client: SocketAddrV4,
        server: SocketAddrV4,
        ingress: bool,
        has_upstream: bool,
        #[serde(default)]
        kafka: bool,
    },
    Done,
}

#[derive(Debug, Serialize, Deserialize)]
struct HolderSpec {
    socket: String,
    /// Items with the inherited descriptor numbers they own.
    items: Vec<(Item, Vec<RawFd>)>,
}

/// What a previous agent handed over.
#[derive(Debug, Default)]
pub struct Inherited {
    pub tcp: HashMap<u16, std::net::TcpListener>,
    pub udp: HashMap<u16, std::net::UdpSocket>,
    pub conns: Vec<Parked>,
}

/// What a stopping agent hands over.
#[derive(Debug, Default)]
pub struct Handover {
    pub tcp: Vec<(u16, std::net::TcpListener)>,
    pub udp: Vec<(u16, std::net::UdpSocket)>,
    pub conns: Vec<Parked>,
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Starts the holder with the handover's sockets (this process is about to
/// exit; the holder keeps them open for the next agent).
pub fn hand_over(h: Handover, socket: &Path) -> anyhow::Result<()> {
    let mut items: Vec<(Item, Vec<RawFd>)> = Vec::new();
    for (port, l) in &h.tcp {
        items.push((Item::TcpListener { port: *port }, vec![l.as_raw_fd()]));
    }
    for (port, u) in &h.udp {
        items.push((Item::UdpSocket { port: *port }, vec![u.as_raw_fd()]));
    }
    for p in &h.conns {
        let mut fds = vec![p.client.as_raw_fd()];
        fds.extend(p.upstream.as_ref().map(|u| u.as_raw_fd()));
        items.push((Item::Conn { client: p.info.client, server: p.info.server, ingress: p.info.ingress, has_upstream: p.upstream.is_some(), kafka: p.proto == L7Proto::Kafka }, fds));
    }
    for (_, fds) in &items {
        for fd in fds {
            clear_cloexec(*fd)?;
        }
    }
    let spec = HolderSpec { socket: socket.display().to_string(), items };
    let _ = std::fs::remove_file(socket);
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("proxy-handoff-holder").env(HOLDER_ENV, serde_json::to_string(&spec)?).stdin(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn().context("starting the proxy handoff holder")?;
    info!(listeners = h.tcp.len() + h.udp.len(), connections = h.conns.len(), "L7 proxy sockets handed to the next agent");
    Ok(())
}

/// The holder process: offers the inherited sockets on the unix socket to
/// the first taker, then exits (after [`HOLD_FOR`] without one too).
pub fn hold() -> anyhow::Result<()> {
    let spec: HolderSpec = serde_json::from_str(&std::env::var(HOLDER_ENV).context("no handoff spec")?)?;
    let listener = nix::sys::socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(spec.socket.as_str())?;
    nix::sys::socket::bind(listener.as_raw_fd(), &addr)?;
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(1)?)?;
    let mut pfd = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&listener), nix::poll::PollFlags::POLLIN)];
    let ready = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::try_from(HOLD_FOR.as_millis() as i32).unwrap_or(nix::poll::PollTimeout::MAX))?;
    if ready == 0 {
        let _ = std::fs::remove_file(&spec.socket);
        anyhow::bail!("no agent came for the proxy's sockets");
    }
    // SAFETY: accept returns a new descriptor we own.
    let conn = unsafe { OwnedFd::from_raw_fd(nix::sys::socket::accept(listener.as_raw_fd())?) };
    let mut items = spec.items;
    items.push((Item::Done, vec![]));
    for (item, fds) in items {
        let data = serde_json::to_vec(&item)?;
        let iov = [std::io::IoSlice::new(&data)];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        nix::sys::socket::sendmsg::<()>(conn.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    }
    let _ = std::fs::remove_file(&spec.socket);
    Ok(())
}

/// Takes what a previous agent handed over, if a holder is waiting.
pub fn receive(socket: &Path) -> Inherited {
    if !socket.exists() {
        return Inherited::default();
    }
    match try_receive(socket) {
        Ok(i) => {
            info!(listeners = i.tcp.len() + i.udp.len(), connections = i.conns.len(), "took over the L7 proxy's sockets");
            i
        }
        Err(e) => {
            warn!(error = %e, "could not take over the previous agent's proxy sockets");
            let _ = std::fs::remove_file(socket);
            Inherited::default()
        }
    }
}

fn try_receive(socket: &Path) -> anyhow::Result<Inherited> {
    let s = nix::sys::socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::socket::connect(s.as_raw_fd(), &UnixAddr::new(socket)?)?;
    let mut out = Inherited::default();
    loop {
        let mut buf = vec![0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 2]);
        let (n, fds) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = nix::sys::socket::recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs()? {
                if let ControlMessageOwned::ScmRights(f) = c {
                    fds.extend(f);
                }
            }
            (msg.bytes, fds)
        };
        anyhow::ensure!(n > 0, "the holder went away before it was done");
        // SAFETY: each descriptor arrived with SCM_RIGHTS and is ours alone.
        let mut owned: Vec<OwnedFd> = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect();
        match serde_json::from_slice::<Item>(&buf[..n])? {
            Item::Done => break,
            Item::TcpListener { port } => {
                let fd = owned.pop().context("listener without a descriptor")?;
                out.tcp.insert(port, std::net::TcpListener::from(fd));
            }
            Item::UdpSocket { port } => {
                let fd = owned.pop().context("socket without a descriptor")?;
                out.udp.insert(port, std::net::UdpSocket::from(fd));
            }
            Item::Conn { client, server, ingress, has_upstream, kafka } => {
                anyhow::ensure!(owned.len() == 1 + usize::from(has_upstream), "connection with {} descriptors", owned.len());
                let mut it = owned.into_iter();
                let c = std::net::TcpStream::from(it.next().expect("checked"));
                let u = it.next().map(std::net::TcpStream::from);
                let proto = if kafka { L7Proto::Kafka } else { L7Proto::Http };
                out.conns.push(Parked { info: ConnInfo { client, server, ingress, udp: false }, proto, client: c, upstream: u });
            }
        }
    }
    Ok(out)
}
