//! The node's own networking in the agent's namespace: the cilium_host /
//! cilium_net pair that carries the router address pods use as gateway,
//! forwarding, and the node's addresses (which the ipcache maps to host).

use std::net::Ipv4Addr;

use cilium_datapath::{DatapathError, netlink, sys};

pub const HOST_DEV: &str = "cilium_host";
pub const NET_DEV: &str = "cilium_net";

/// Creates and configures the host devices; returns the node's addresses
/// (every IPv4 address of the namespace except loopback and the router).
pub fn setup(router: Ipv4Addr) -> Result<Vec<Ipv4Addr>, DatapathError> {
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
        let addrs = netlink::addresses(&h).await?;
        Ok(addrs
            .into_iter()
            .map(|(_, ip, _)| ip)
            .filter(|ip| !ip.is_loopback() && *ip != router)
            .collect())
    })
}
