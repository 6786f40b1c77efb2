//! The node's own networking in the agent's namespace: the cilium_host /
//! cilium_net pair that carries the router address pods use as gateway,
//! forwarding, and the node's addresses (which the ipcache maps to host).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use cilium_datapath::{DatapathError, netlink, sys};

pub const HOST_DEV: &str = "cilium_host";
pub const NET_DEV: &str = "cilium_net";
/// Tunnel mode's VXLAN device (collect-metadata: one for all other nodes).
pub const TUNNEL_DEV: &str = "cilium_vxlan";

/// The tunnel device to make, in tunnel mode: UDP port and MTU.
#[derive(Debug, Clone, Copy)]
pub struct Tunnel {
    pub port: u16,
    pub mtu: u32,
}

/// The node's addresses and the devices that carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNet {
    /// Every IPv4 address of the namespace except loopback and the router.
    pub ips: Vec<Ipv4Addr>,
    /// Every global IPv6 address except loopback and the router (with IPv6).
    pub ips6: Vec<Ipv6Addr>,
    /// Devices with such an address (not ours: no cilium_*, no lxc*), where
    /// the per-packet service load balancer attaches.
    pub devices: Vec<String>,
}

/// Creates and configures the host devices (and the tunnel device in
/// tunnel mode; a leftover one is removed in native routing); returns the
/// node's addresses and devices.
pub fn setup(router: Ipv4Addr, router6: Option<Ipv6Addr>, tunnel: Option<Tunnel>) -> Result<NodeNet, DatapathError> {
    sys::sysctl("net.ipv4.ip_forward", "1")?;
    sys::sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    sys::sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    if router6.is_some() {
        // pods' interfaces need IPv6, and the node routes for them
        sys::sysctl("net.ipv6.conf.default.disable_ipv6", "0")?;
        sys::sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    let node = netlink::run(|h| async move {
        netlink::create_veth(&h, HOST_DEV, NET_DEV).await?;
        for dev in [HOST_DEV, NET_DEV] {
            let l = netlink::link(&h, dev)
                .await?
                .ok_or_else(|| DatapathError::Interface { ifname: dev.into(), detail: "missing after creation".into() })?;
            netlink::set_up(&h, l.index).await?;
            if dev == HOST_DEV {
                netlink::add_address(&h, l.index, router, 32).await?;
                if let Some(r6) = router6 {
                    netlink::add_address(&h, l.index, r6, 128).await?;
                }
            }
        }
        let all = netlink::addresses(&h).await?;
        let addrs: Vec<(u32, Ipv4Addr, u8)> = all
            .iter()
            .filter_map(|(i, ip, p)| match ip {
                IpAddr::V4(v4) if !v4.is_loopback() && *v4 != router => Some((*i, *v4, *p)),
                _ => None,
            })
            .collect();
        let ips6: Vec<Ipv6Addr> = all
            .iter()
            .filter_map(|(_, ip, _)| match ip {
                IpAddr::V6(v6) if !v6.is_loopback() && !v6.is_unicast_link_local() && Some(*v6) != router6 => Some(*v6),
                _ => None,
            })
            .collect();
        let links = netlink::links(&h).await?;
        let mut devices: Vec<String> = links
            .into_iter()
            .filter(|l| addrs.iter().any(|(i, _, _)| *i == l.index))
            .map(|l| l.name)
            .filter(|n| !n.starts_with("cilium_") && !n.starts_with("lxc") && n != "lo")
            .collect();
        devices.sort();
        match tunnel {
            Some(t) => {
                netlink::ensure_vxlan(&h, TUNNEL_DEV, t.port, t.mtu).await?;
            }
            None => {
                netlink::delete_link(&h, TUNNEL_DEV).await?;
            }
        }
        // the L7 proxy's policy route (packets the datapath assigned to a proxy socket)
        netlink::proxy_routing(&h).await?;
        Ok(NodeNet { ips: addrs.into_iter().map(|(_, ip, _)| ip).collect(), ips6: if router6.is_some() { ips6 } else { Vec::new() }, devices })
    })?;
    if router6.is_some() && tunnel.is_some() {
        // IPv6 is never tunnelled: the tunnel device sends none of its own
        sys::sysctl(&format!("net.ipv6.conf.{TUNNEL_DEV}.disable_ipv6"), "1")?;
    }
    Ok(node)
}
