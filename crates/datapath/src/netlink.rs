//! Links, addresses and routes over rtnetlink.
//!
//! Callers are synchronous: [`run`] gives a closure a netlink handle of the
//! calling thread's network namespace on a private single-threaded runtime.
//! Call it from a plain or blocking thread, never from inside async code.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, InfoVxlan, LinkAttribute, LinkFlags};
use rtnetlink::packet_route::route::{RouteAttribute, RouteScope};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::{DatapathError, Result};

/// What we need to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub up: bool,
}

fn nl(what: &str) -> impl Fn(rtnetlink::Error) -> DatapathError + '_ {
    move |e| DatapathError::Netlink(format!("{what}: {e}"))
}

/// Runs `f` with a netlink handle for the calling thread's namespace.
pub fn run<T, F, Fut>(f: F) -> Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|source| DatapathError::Io { what: "netlink runtime".into(), source })?;
    rt.block_on(async move {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|source| DatapathError::Io { what: "netlink socket".into(), source })?;
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        out
    })
}

fn is_enoent(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV || m.raw_code() == -libc::ENOENT)
}

fn is_eexist(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

/// The link called `name`, if it exists.
pub async fn link(h: &Handle, name: &str) -> Result<Option<Link>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(msg)) => {
            let mut mac = [0u8; 6];
            for a in &msg.attributes {
                if let LinkAttribute::Address(b) = a {
                    if b.len() == 6 {
                        mac.copy_from_slice(b);
                    }
                }
            }
            Ok(Some(Link {
                index: msg.header.index,
                name: name.to_string(),
                mac,
                up: msg.header.flags.contains(LinkFlags::Up),
            }))
        }
        Ok(None) => Ok(None),
        Err(e) if is_enoent(&e) => Ok(None),
        Err(e) => Err(nl("getting link")(e)),
    }
}

/// Every link of the namespace.
pub async fn links(h: &Handle) -> Result<Vec<Link>> {
    let mut s = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = s.try_next().await.map_err(nl("listing links"))? {
        let mut mac = [0u8; 6];
        let mut name = String::new();
        for a in &msg.attributes {
            match a {
                LinkAttribute::Address(b) if b.len() == 6 => mac.copy_from_slice(b),
                LinkAttribute::IfName(n) => name = n.clone(),
                _ => {}
            }
        }
        out.push(Link { index: msg.header.index, name, mac, up: msg.header.flags.contains(LinkFlags::Up) });
    }
    Ok(out)
}

/// Deletes a link by name. Returns whether it existed.
pub async fn delete_link(h: &Handle, name: &str) -> Result<bool> {
    let Some(l) = link(h, name).await? else { return Ok(false) };
    match h.link().del(l.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if is_enoent(&e) => Ok(false),
        Err(e) => Err(nl("deleting link")(e)),
    }
}

/// Creates a veth pair whose peer is placed (and named) directly in the
/// network namespace `peer_netns`, so the pair appears in one step.
pub async fn create_veth_into_netns(
    h: &Handle,
    host: &str,
    peer: &str,
    peer_netns: &std::fs::File,
    mtu: u32,
) -> Result<()> {
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .mtu(mtu)
        .setns_by_fd(peer_netns.as_raw_fd())
        .build();
    let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host.to_string())
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link().add(msg).execute().await.map_err(nl("creating veth"))
}

/// Creates a veth pair with both ends in the current namespace.
pub async fn create_veth(h: &Handle, a: &str, b: &str) -> Result<()> {
    match h.link().add(LinkVeth::new(a, b).build()).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_eexist(&e) => Ok(()),
        Err(e) => Err(nl("creating veth")(e)),
    }
}

/// Creates (when missing) a VXLAN device in collect-metadata mode: the
/// outer destination and the VNI of each packet come from the tc program
/// that sends it (bpf_skb_set_tunnel_key), received packets keep theirs as
/// metadata. No ARP (the inner destination MAC is never looked at: the
/// receiving program delivers by address), no learning.
pub async fn ensure_vxlan(h: &Handle, name: &str, port: u16, mtu: u32) -> Result<u32> {
    if link(h, name).await?.is_none() {
        let msg = LinkMessageBuilder::<LinkVxlan>::new(name)
            .append_info_data(InfoVxlan::CollectMetadata(true))
            .port(port)
            .learning(false)
            .mtu(mtu)
            .arp(false)
            .build();
        match h.link().add(msg).execute().await {
            Ok(()) => {}
            Err(e) if is_eexist(&e) => {}
            Err(e) => return Err(nl("creating the VXLAN device")(e)),
        }
    }
    let l = link(h, name).await?.ok_or_else(|| DatapathError::Interface { ifname: name.into(), detail: "missing after creation".into() })?;
    h.link()
        .set(LinkUnspec::new_with_index(l.index).mtu(mtu).up().build())
        .execute()
        .await
        .map_err(nl("configuring the VXLAN device"))?;
    Ok(l.index)
}

/// Sets a link up.
pub async fn set_up(h: &Handle, index: u32) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl("setting link up"))
}

/// Adds an address (succeeds when it is already there). IPv6 addresses are
/// added without duplicate address detection: ours are unique by allocation.
pub async fn add_address(h: &Handle, index: u32, ip: impl Into<IpAddr>, prefix: u8) -> Result<()> {
    let ip = ip.into();
    let mut req = h.address().add(index, ip, prefix);
    if ip.is_ipv6() {
        req.message_mut().header.flags |= rtnetlink::packet_route::address::AddressHeaderFlags::Nodad;
    }
    match req.execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_eexist(&e) => Ok(()),
        Err(e) => Err(nl("adding address")(e)),
    }
}

/// Every address of the namespace: (ifindex, address, prefix length).
pub async fn addresses(h: &Handle) -> Result<Vec<(u32, IpAddr, u8)>> {
    let mut s = h.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = s.try_next().await.map_err(nl("listing addresses"))? {
        for a in &msg.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.push((msg.header.index, *ip, msg.header.prefix_len));
            }
        }
    }
    Ok(out)
}

fn bad_route(e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Netlink(format!("route: {e}"))
}

fn route_to(dst: IpNet) -> Result<RouteMessageBuilder<IpAddr>> {
    RouteMessageBuilder::<IpAddr>::new().destination_prefix(dst.network(), dst.prefix_len()).map_err(bad_route)
}

/// Adds or replaces a route to `dst` out of a link, without a gateway.
pub async fn route_replace_dev(h: &Handle, dst: impl Into<IpNet>, index: u32, src: Option<IpAddr>) -> Result<()> {
    let mut b = route_to(dst.into())?.output_interface(index).scope(RouteScope::Link);
    if let Some(s) = src {
        b = b.pref_source(s).map_err(bad_route)?;
    }
    h.route().add(b.build()).replace().execute().await.map_err(nl("adding route"))
}

/// Adds or replaces a route to `dst` via a gateway on a link.
pub async fn route_replace_via(h: &Handle, dst: impl Into<IpNet>, gateway: impl Into<IpAddr>, index: u32) -> Result<()> {
    let b = route_to(dst.into())?.gateway(gateway.into()).map_err(bad_route)?.output_interface(index);
    h.route().add(b.build()).replace().execute().await.map_err(nl("adding route"))
}

/// Deletes the route to `dst` from the main table (absent is fine).
pub async fn route_delete(h: &Handle, dst: impl Into<IpNet>) -> Result<()> {
    let msg = route_to(dst.into())?.build();
    match h.route().del(msg).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => Ok(()),
        Err(e) if is_enoent(&e) => Ok(()),
        Err(e) => Err(nl("deleting route")(e)),
    }
}

/// The main table's routes (IPv4 and IPv6) out of a link.
pub async fn routes_via(h: &Handle, index: u32) -> Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for family in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()] {
        let mut s = h.route().get(family).execute();
        while let Some(msg) = s.try_next().await.map_err(nl("listing routes"))? {
            if msg.header.table != 254 || !msg.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index)) {
                continue;
            }
            use rtnetlink::packet_route::route::RouteAddress;
            let dst = msg.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(IpAddr::V6(*ip)),
                _ => None,
            });
            let dst = dst.unwrap_or(if msg.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            });
            if let Ok(net) = IpNet::new(dst, msg.header.destination_prefix_length) {
                out.push(net);
            }
        }
    }
    Ok(out)
}

/// A permanent neighbour entry: `ip` is at `mac` on the link (IPv6 pods and
/// their router know each other without neighbour discovery).
pub async fn neighbour_permanent(h: &Handle, index: u32, ip: IpAddr, mac: [u8; 6]) -> Result<()> {
    h.neighbours()
        .add(index, ip)
        .link_layer_address(&mac)
        .state(rtnetlink::packet_route::neighbour::NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl("adding neighbour"))
}

/// Routing table of the proxy route (upstream's 2005).
pub const PROXY_TABLE: u32 = 2005;

/// The policy route that hands packets marked MARK_MAGIC_TO_PROXY to the
/// local stack, where the socket the datapath assigned takes them:
/// `ip rule add fwmark 0x200/0xf00 lookup 2005 pref 9` and
/// `ip route replace local 0.0.0.0/0 dev lo table 2005`. Idempotent.
pub async fn proxy_routing(h: &Handle) -> Result<()> {
    let lo = link(h, "lo").await?.ok_or_else(|| DatapathError::Interface { ifname: "lo".into(), detail: "missing".into() })?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(lo.index)
        .table_id(PROXY_TABLE)
        .kind(rtnetlink::packet_route::route::RouteType::Local)
        .scope(RouteScope::Host)
        .build();
    h.route().add(route).replace().execute().await.map_err(nl("adding the proxy route"))?;
    let mut rules = h.rule().get(rtnetlink::IpVersion::V4).execute();
    while let Some(r) = rules.try_next().await.map_err(nl("listing rules"))? {
        let has = |a: &rtnetlink::packet_route::rule::RuleAttribute| matches!(a, rtnetlink::packet_route::rule::RuleAttribute::FwMark(m) if *m == cilium_abi::MARK_MAGIC_TO_PROXY);
        if r.attributes.iter().any(has) {
            return Ok(());
        }
    }
    let mut req = h.rule().add().v4().fw_mark(cilium_abi::MARK_MAGIC_TO_PROXY).table_id(PROXY_TABLE).priority(9).action(rtnetlink::packet_route::rule::RuleAction::ToTable);
    req.message_mut().attributes.push(rtnetlink::packet_route::rule::RuleAttribute::FwMask(cilium_abi::MARK_MAGIC_MASK));
    req.execute().await.map_err(nl("adding the proxy rule"))
}
