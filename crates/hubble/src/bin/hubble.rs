//! `hubble`: observe flows, server status, nodes — against an agent's
//! Hubble socket or hubble-relay (`--server`, `HUBBLE_SERVER`, default
//! localhost:4245).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use cilium_hubble::observe;
use cilium_hubble::printer::{self, Format, Options};
use cilium_hubble::proto::observer::observer_client::ObserverClient;
use cilium_hubble::proto::observer::{GetNamespacesRequest, GetNodesRequest, ServerStatusRequest};
use cilium_hubble::proto::relay::NodeState;
use futures::StreamExt;

const USAGE: &str = "Usage: hubble <command> [flags]

Commands:
  observe        Observe flows (see `hubble observe --help`)
  status         Show the server's status
  list nodes     List the nodes behind the server
  list namespaces  List namespaces seen in flows
  version        Print the version

Global flags: --server ADDR (env HUBBLE_SERVER; default localhost:4245;
unix:///path for an agent's socket), --timeout DURATION";

const OBSERVE_HELP: &str = "Usage: hubble observe [flags]

Selection:  --last N | --first N | --all, -f/--follow, --since T, --until T
            (T: a duration like 1m or an RFC 3339 time)
Either end: --pod [NS/]POD, -n/--namespace NS, -A/--all-namespaces, -l/--label SEL,
            --ip IP|CIDR, --identity N, --port N, --fqdn NAME, --service [NS/]NAME, --workload [KIND/]NAME
One end:    --from-/--to- variants of the above (and --from-namespace/--to-namespace)
Any:        --protocol tcp|udp|icmp|http|dns|kafka, -t/--type trace|drop|l7|policy-verdict|trace:to-endpoint…,
            --verdict FORWARDED|DROPPED|AUDIT…, --drop-reason-desc NAME, --http-status CODE|5+,
            --http-method M, --http-path REGEX, --traffic-direction ingress|egress, --tcp-flags SYN,ACK,
            --node-name NAME, --ip-version v4|v6, --uuid ID
            --not negates the filter flag that follows.
Output:     -o/--output compact|dict|json|jsonpb|table, --print-node-name, --numeric, -P/--print-raw-filters
Server:     --server ADDR, --timeout DURATION";

fn server_of(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("HUBBLE_SERVER").ok())
        .unwrap_or_else(|| "localhost:4245".to_string())
}

async fn client(
    server: &str,
    timeout: Duration,
) -> anyhow::Result<ObserverClient<tonic::transport::Channel>> {
    Ok(ObserverClient::new(cilium_hubble::client::channel(
        server, timeout,
    )?))
}

/// Splits `--server X` / `--timeout D` out of a non-observe command's args.
fn globals(args: &[String]) -> anyhow::Result<(Option<String>, Duration, Vec<String>)> {
    let (mut server, mut timeout, mut rest) = (None, Duration::from_secs(5), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix("--server=") {
            server = Some(v.to_string());
        } else if a == "--server" {
            server = Some(it.next().context("--server needs a value")?.clone());
        } else if let Some(v) = a.strip_prefix("--timeout=") {
            timeout = observe::parse_duration(v)
                .with_context(|| format!("invalid argument {v:?} for \"timeout\""))?;
        } else if a == "--timeout" {
            let v = it.next().context("--timeout needs a value")?;
            timeout = observe::parse_duration(v)
                .with_context(|| format!("invalid argument {v:?} for \"timeout\""))?;
        } else {
            rest.push(a.clone());
        }
    }
    Ok((server, timeout, rest))
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn run(args: Vec<String>) -> anyhow::Result<i32> {
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(0);
    };
    match cmd.as_str() {
        "observe" => {
            let rest = args[1..].to_vec();
            if rest.iter().any(|a| a == "-h" || a == "--help") {
                println!("{OBSERVE_HELP}");
                return Ok(0);
            }
            // `hubble observe flows` is upstream's newer spelling
            let rest: Vec<String> = if rest.first().map(String::as_str) == Some("flows") {
                rest[1..].to_vec()
            } else {
                rest
            };
            let o = match observe::parse(&rest, chrono::Utc::now()) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("Error: {e}");
                    return Ok(2);
                }
            };
            if o.print_raw_filters {
                println!("allowlist:");
                for f in &o.request.whitelist {
                    println!("- '{}'", serde_json::to_string(f)?);
                }
                println!("denylist:");
                for f in &o.request.blacklist {
                    println!("- '{}'", serde_json::to_string(f)?);
                }
                return Ok(0);
            }
            let server = server_of(o.server.clone());
            let mut c = client(&server, o.timeout).await?;
            let mut stream = c
                .get_flows(o.request.clone())
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .with_context(|| format!("getting flows from {server}"))?
                .into_inner();
            let opts = Options {
                node_name: o.print_node_name,
                numeric: o.numeric,
            };
            let mut out = std::io::stdout().lock();
            if o.output == Format::Table {
                write!(out, "{}", printer::table_header(opts))?;
            }
            while let Some(r) = stream.next().await {
                let r = r
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))
                    .context("flow stream")?;
                let line = printer::format(&r, o.output, opts);
                let json = matches!(o.output, Format::Json | Format::Jsonpb);
                if !json && printer::is_status(&r) {
                    // a node that cannot be reached is worth a warning; one that connected is not
                    let connected = matches!(&r.response_types, Some(cilium_hubble::proto::observer::get_flows_response::ResponseTypes::NodeStatus(n)) if n.state_change == NodeState::NodeConnected as i32);
                    if !connected {
                        eprint!("{line}");
                    }
                    continue;
                }
                if !line.is_empty()
                    && out
                        .write_all(line.as_bytes())
                        .and_then(|_| out.flush())
                        .is_err()
                {
                    return Ok(0); // stdout closed (e.g. piped into head)
                }
            }
            Ok(0)
        }
        "status" => {
            let (server, timeout, _) = globals(&args[1..])?;
            let server = server_of(server);
            let mut c = client(&server, timeout).await?;
            let s = c
                .server_status(ServerStatusRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))
                .with_context(|| format!("Healthcheck (via {server}): failed"))?
                .into_inner();
            println!("Healthcheck (via {server}): Ok");
            let pct = if s.max_flows > 0 {
                s.num_flows as f64 * 100.0 / s.max_flows as f64
            } else {
                0.0
            };
            println!(
                "Current/Max Flows: {}/{} ({pct:.2}%)",
                thousands(s.num_flows),
                thousands(s.max_flows)
            );
            println!("Flows/s: {:.2}", s.flows_rate);
            if let (Some(up), Some(down)) = (
                s.num_connected_nodes.map(|v| v.value),
                s.num_unavailable_nodes.map(|v| v.value),
            ) {
                println!("Connected Nodes: {up}/{}", up + down);
                if !s.unavailable_nodes.is_empty() {
                    println!("Unavailable Nodes: {}", s.unavailable_nodes.join(", "));
                }
            }
            Ok(0)
        }
        "list" => {
            let (server, timeout, rest) = globals(&args[1..])?;
            let server = server_of(server);
            let mut c = client(&server, timeout).await?;
            match rest.first().map(String::as_str) {
                Some("nodes") => {
                    let r = c
                        .get_nodes(GetNodesRequest {})
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))
                        .with_context(|| format!("listing nodes via {server}"))?
                        .into_inner();
                    println!(
                        "{:<24}{:<14}{:<12}{:<10}{}",
                        "NAME", "STATUS", "AGE", "FLOWS/S", "CURRENT/MAX-FLOWS"
                    );
                    for n in r.nodes {
                        let state = match NodeState::try_from(n.state) {
                            Ok(NodeState::NodeConnected) => "Connected",
                            Ok(NodeState::NodeUnavailable) => "Unavailable",
                            Ok(NodeState::NodeGone) => "Gone",
                            Ok(NodeState::NodeError) => "Error",
                            _ => "Unknown",
                        };
                        let age = Duration::from_nanos(n.uptime_ns);
                        let age = if age.as_secs() >= 3600 {
                            format!("{}h{}m", age.as_secs() / 3600, age.as_secs() % 3600 / 60)
                        } else {
                            format!("{}m{}s", age.as_secs() / 60, age.as_secs() % 60)
                        };
                        let rate = if n.uptime_ns > 0 {
                            n.seen_flows as f64 / (n.uptime_ns as f64 / 1e9)
                        } else {
                            0.0
                        };
                        let pct = if n.max_flows > 0 {
                            n.num_flows as f64 * 100.0 / n.max_flows as f64
                        } else {
                            0.0
                        };
                        println!(
                            "{:<24}{:<14}{:<12}{:<10.2}{}/{} ({pct:.2}%)",
                            n.name,
                            state,
                            age,
                            rate,
                            thousands(n.num_flows),
                            thousands(n.max_flows)
                        );
                    }
                    Ok(0)
                }
                Some("namespaces") => {
                    let r = c
                        .get_namespaces(GetNamespacesRequest {})
                        .await
                        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                        .into_inner();
                    println!("NAMESPACE");
                    for n in r.namespaces {
                        println!("{}", n.namespace);
                    }
                    Ok(0)
                }
                other => {
                    eprintln!(
                        "Error: unknown list target {:?}; want nodes or namespaces",
                        other.unwrap_or("")
                    );
                    Ok(2)
                }
            }
        }
        "version" | "--version" => {
            println!("hubble {}", cilium_hubble::VERSION);
            Ok(0)
        }
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => {
            eprintln!("Error: unknown command {other:?}\n\n{USAGE}");
            Ok(2)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(run(args)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
