//! cilium-cni: the CNI plugin binary. Reads the command from the environment
//! and the configuration from stdin, does the work, prints the result or a
//! CNI error (exiting non-zero).
//!
//! ADD: address from the agent's IPAM, a veth pair created in one step with
//! its peer already in the pod namespace, the pod side configured, then the
//! endpoint registered with the agent (which attaches the datapath and brings
//! the host side up only once policy is in place). Any failure rolls back what
//! was made; a crash is repaired by the next ADD or DEL, which find the
//! deterministic interface name and the IPAM owner key.

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use cilium_api::{Client, EndpointCreate, EndpointDelete, EndpointGc, IpamRequest, IpamResponse};
use cilium_cni::{CniError, Invocation, NetConf, add_result, code, host_ifname, parse_env, parse_netconf, version_result};
use cilium_datapath::{DatapathError, netlink, sys};

fn main() {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|s| s.as_str()).map(String::from))
        .filter(|v| cilium_cni::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_string());
    match run(&stdin) {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}

fn run(stdin: &[u8]) -> Result<Option<String>, CniError> {
    let inv = parse_env(|k| std::env::var(k).ok())?;
    if inv.command == "VERSION" {
        let v = parse_netconf(stdin).map(|c| c.cni_version).unwrap_or_else(|_| "1.0.0".into());
        return Ok(Some(version_result(&v).to_string()));
    }
    let conf = parse_netconf(stdin)?;
    let client = Client::new(conf.socket_path.clone().unwrap_or_else(|| cilium_api::DEFAULT_SOCKET.to_string()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start runtime", e.to_string()))?;
    match inv.command.as_str() {
        "ADD" => add(&rt, &client, &conf, &inv).map(Some),
        "DEL" => del(&rt, &client, &inv).map(|_| None),
        "CHECK" => check(&rt, &client, &inv).map(|_| None),
        "GC" => gc(&rt, &client, &conf).map(|_| None),
        "STATUS" => rt
            .block_on(client.get::<String>("/v1/healthz"))
            .map(|_| None)
            .map_err(|e| CniError::new(code::PLUGIN_NOT_AVAILABLE, "the cilium agent is not available", e.to_string())),
        _ => unreachable!("parse_env validated the command"),
    }
}

fn api_err(e: cilium_api::ApiError) -> CniError {
    match e {
        cilium_api::ApiError::Unreachable { .. } => CniError::new(code::TRY_AGAIN_LATER, "the cilium agent is not reachable", e.to_string()),
        other => CniError::new(code::IO_FAILURE, "the cilium agent refused the request", other.to_string()),
    }
}

fn dp_err(what: &str) -> impl Fn(DatapathError) -> CniError + '_ {
    move |e| CniError::new(code::IO_FAILURE, what.to_string(), e.to_string())
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn delete_host_link(name: &str) -> Result<bool, DatapathError> {
    let name = name.to_string();
    netlink::run(|h| async move { netlink::delete_link(&h, &name).await })
}

fn add(rt: &tokio::runtime::Runtime, client: &Client, conf: &NetConf, inv: &Invocation) -> Result<String, CniError> {
    let netns_path = Path::new(&inv.netns);
    let netns = std::fs::File::open(netns_path)
        .map_err(|e| CniError::new(code::UNKNOWN_CONTAINER, format!("network namespace {} not found", inv.netns), e.to_string()))?;
    let host = host_ifname(&inv.container_id, &inv.ifname);
    let ipam: IpamResponse = rt
        .block_on(client.call("POST", "/v1/ipam", Some(&IpamRequest { owner: inv.owner() })))
        .map_err(api_err)?;
    let mtu = conf.mtu.unwrap_or(ipam.mtu);
    let result = (|| {
        // a previous, interrupted ADD may have left the pair behind
        delete_host_link(&host).map_err(dp_err("removing a stale interface"))?;
        let (h2, ifname, mtu2) = (host.clone(), inv.ifname.clone(), mtu);
        let ns2 = netns.try_clone().map_err(|e| CniError::new(code::IO_FAILURE, "netns", e.to_string()))?;
        netlink::run(|h| async move { netlink::create_veth_into_netns(&h, &h2, &ifname, &ns2, mtu2).await })
            .map_err(dp_err("creating the veth pair"))?;
        let hname = host.clone();
        let host_link = netlink::run(|h| async move { netlink::link(&h, &hname).await })
            .map_err(dp_err("reading the host interface"))?
            .ok_or_else(|| CniError::new(code::IO_FAILURE, "host interface vanished", host.clone()))?;
        let (ifname, ip, gw) = (inv.ifname.clone(), ipam.ip, ipam.gateway);
        let v6 = ipam.ipv6.as_ref().map(|v| (v.ip, v.gateway, host_link.mac));
        let pod_mac = sys::in_netns(netns_path, move || configure_pod(&ifname, ip, gw, v6)).map_err(dp_err("configuring the pod interface"))?;
        if let Some(v) = &ipam.ipv6 {
            // the node knows the pod's IPv6 address without neighbour
            // discovery too (whose first packets would wait for the host
            // side's link-local address to pass duplicate detection)
            let (index, ip6) = (host_link.index, v.ip);
            netlink::run(|h| async move { netlink::neighbour_permanent(&h, index, ip6.into(), pod_mac).await })
                .map_err(dp_err("adding the pod's IPv6 neighbour entry"))?;
        }
        let create = EndpointCreate {
            container_id: inv.container_id.clone(),
            ifname: inv.ifname.clone(),
            netns: inv.netns.clone(),
            host_ifname: host.clone(),
            ipv4: ipam.ip,
            ipv6: ipam.ipv6.as_ref().map(|v| v.ip),
            mac: mac_string(&pod_mac),
            namespace: inv.pod_namespace().to_string(),
            pod_name: inv.pod_name().to_string(),
        };
        let _ep: cilium_api::Endpoint = rt.block_on(client.call("PUT", "/v1/endpoint", Some(&create))).map_err(api_err)?;
        Ok(add_result(
            &conf.cni_version,
            (&host, &mac_string(&host_link.mac)),
            (&inv.ifname, &mac_string(&pod_mac), &inv.netns),
            ipam.ip,
            ipam.gateway,
            ipam.ipv6.as_ref().map(|v| (v.ip, v.gateway)),
        )
        .to_string())
    })();
    if result.is_err() {
        // roll back: interface, endpoint and address
        let _ = delete_host_link(&host);
        let _ = rt.block_on(client.call::<_, cilium_api::Deleted>(
            "DELETE",
            "/v1/endpoint",
            Some(&EndpointDelete { container_id: inv.container_id.clone(), ifname: inv.ifname.clone() }),
        ));
    }
    result
}

/// Inside the pod namespace: loopback up, address, routes via the node's
/// router; IPv6 only when the pod has an IPv6 address (its router is a
/// permanent neighbour at the host side's MAC: no neighbour discovery needed
/// for it). Returns the interface's MAC.
fn configure_pod(ifname: &str, ip: Ipv4Addr, gw: Ipv4Addr, v6: Option<(Ipv6Addr, Ipv6Addr, [u8; 6])>) -> Result<[u8; 6], DatapathError> {
    let disable = if v6.is_some() { "0" } else { "1" };
    // `all` sets `default` and every existing interface too
    let _ = sys::sysctl("net.ipv6.conf.all.disable_ipv6", disable);
    let ifname = ifname.to_string();
    netlink::run(|h| async move {
        if let Some(lo) = netlink::link(&h, "lo").await? {
            netlink::set_up(&h, lo.index).await?;
        }
        let l = netlink::link(&h, &ifname)
            .await?
            .ok_or_else(|| DatapathError::Interface { ifname: ifname.clone(), detail: "missing in the pod namespace".into() })?;
        netlink::add_address(&h, l.index, ip, 32).await?;
        netlink::set_up(&h, l.index).await?;
        netlink::route_replace_dev(&h, ipnet::Ipv4Net::new(gw, 32).expect("/32"), l.index, None).await?;
        netlink::route_replace_via(&h, "0.0.0.0/0".parse::<ipnet::Ipv4Net>().expect("default"), gw, l.index).await?;
        if let Some((ip6, gw6, router_mac)) = v6 {
            netlink::add_address(&h, l.index, ip6, 128).await?;
            netlink::route_replace_dev(&h, ipnet::Ipv6Net::new(gw6, 128).expect("/128"), l.index, None).await?;
            netlink::neighbour_permanent(&h, l.index, gw6.into(), router_mac).await?;
            netlink::route_replace_via(&h, "::/0".parse::<ipnet::Ipv6Net>().expect("default"), gw6, l.index).await?;
        }
        Ok(l.mac)
    })
}

fn del(rt: &tokio::runtime::Runtime, client: &Client, inv: &Invocation) -> Result<(), CniError> {
    let host = host_ifname(&inv.container_id, &inv.ifname);
    let agent = rt.block_on(client.call::<_, cilium_api::Deleted>(
        "DELETE",
        "/v1/endpoint",
        Some(&EndpointDelete { container_id: inv.container_id.clone(), ifname: inv.ifname.clone() }),
    ));
    delete_host_link(&host).map_err(dp_err("deleting the host interface"))?;
    agent.map(|_| ()).map_err(api_err)
}

fn check(rt: &tokio::runtime::Runtime, client: &Client, inv: &Invocation) -> Result<(), CniError> {
    let eps: Vec<cilium_api::Endpoint> = rt.block_on(client.get("/v1/endpoint")).map_err(api_err)?;
    let ep = eps
        .iter()
        .find(|e| e.container_id == inv.container_id && e.ifname == inv.ifname)
        .ok_or_else(|| CniError::new(code::UNKNOWN_CONTAINER, "no endpoint for this container", inv.owner()))?;
    if ep.state != "ready" {
        return Err(CniError::new(code::IO_FAILURE, format!("endpoint {} is {}", ep.id, ep.state), ep.error.clone().unwrap_or_default()));
    }
    let (ifname, ip) = (inv.ifname.clone(), ep.ipv4);
    let ok = sys::in_netns(Path::new(&inv.netns), move || {
        netlink::run(|h| async move {
            let Some(l) = netlink::link(&h, &ifname).await? else { return Ok(false) };
            Ok(netlink::addresses(&h).await?.iter().any(|(i, a, _)| *i == l.index && *a == std::net::IpAddr::V4(ip)))
        })
    })
    .map_err(dp_err("inspecting the pod namespace"))?;
    if !ok {
        return Err(CniError::new(code::IO_FAILURE, format!("interface {} does not hold {}", inv.ifname, ep.ipv4), inv.netns.clone()));
    }
    let host = host_ifname(&inv.container_id, &inv.ifname);
    let h2 = host.clone();
    if netlink::run(|h| async move { netlink::link(&h, &h2).await }).map_err(dp_err("reading the host interface"))?.is_none() {
        return Err(CniError::new(code::IO_FAILURE, format!("host interface {host} is missing"), ""));
    }
    Ok(())
}

fn gc(rt: &tokio::runtime::Runtime, client: &Client, conf: &NetConf) -> Result<(), CniError> {
    let valid: Vec<(String, String)> = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| (a.container_id.clone(), a.ifname.clone()))
        .collect();
    let deleted: cilium_api::Deleted = rt.block_on(client.call("POST", "/v1/endpoint/gc", Some(&EndpointGc { valid }))).map_err(api_err)?;
    for owner in deleted.deleted {
        if let Some((cid, ifname)) = owner.rsplit_once('/') {
            let _ = delete_host_link(&host_ifname(cid, ifname));
        }
    }
    Ok(())
}
