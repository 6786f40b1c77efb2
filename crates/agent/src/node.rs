//! The node's own networking in the agent's namespace: the cilium_host /
//! cilium_net pair that carries the router address pods use as gateway,
//! forwarding, and the node's addresses (which the ipcache maps to host).

use std::net::Ipv4Addr;

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
    /// Devices with such an address (not ours: no cilium_*, no lxc*), where
    /// the per-packet service load balancer attaches.
    pub devices: Vec<String>,
}

/// Creates and configures the host devices (and the tunnel device in
/// tunnel mode; a leftover one is removed in native routing); returns the
/// node's addresses and devices.
pub fn setup(router: Ipv4Addr, tunnel: Option<Tunnel>) -> Result<NodeNet, DatapathError> {
    sys::sysctl("net.ipv4.ip_forward", "1")?;
    sys::sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    sys::sysctl("net.ipv4.conf.default.rp_filter", "0")?;
    netlink::run(|h| async move {
        netlink::create_veth(&h, HOST_DEV, NET_DEV).await?;
        for dev in [HOST_DEV, NET_DEV] {
            let l = netlink::link(&h, dev)
                .await?
                .ok_or_else(|| DatapathError::Interface { ifname: dev.into(), detail: "missing after creation".into() })?;
            netlink::set_up(&h, l.index).await?;
            if dev == HOST_DEV {
                netlink::add_address(&h, l.index, router, 32).await?;
            }
        }
        let addrs: Vec<(u32, Ipv4Addr, u8)> =
            netlink::addresses(&h).await?.into_iter().filter(|(_, ip, _)| !ip.is_loopback() && *ip != router).collect();
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
        Ok(NodeNet { ips: addrs.into_iter().map(|(_, ip, _)| ip).collect(), devices })
    })
}
