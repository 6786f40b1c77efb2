//! `cilium-health`: the agent's view of node-to-node connectivity (upstream's
//! cilium-health CLI). It reads the agent's API, where the prober keeps each
//! node's last ICMP and HTTP results.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cilium-health", version, about = "Connectivity between the cluster's nodes, as the agent probes it")]
struct Cli {
    #[command(flatten)]
    host: cilium_cli::HostArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Each node's reachability: ICMP to its stack, HTTP to its agent.
    Status {
        /// Probe every node now instead of showing the last round.
        #[arg(long)]
        probe: bool,
        /// text or json
        #[arg(short, long, default_value = "text")]
        output: String,
    },
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let client = cilium_api::Client::new(cli.host.socket());
    match cli.cmd {
        Cmd::Status { probe, output } => {
            if output != "text" && output != "json" {
                anyhow::bail!("--output {output}: want text or json");
            }
            let nodes: Vec<cilium_api::NodeHealth> = if probe {
                client.call("POST", "/v1/cluster/health/probe", None::<&()>).await?
            } else {
                client.get("/v1/cluster/health").await?
            };
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                let at = nodes.iter().map(|n| n.probed_at).max().unwrap_or(0);
                println!("Probe time:   {}", if at == 0 { "not probed yet".to_string() } else { cilium_cli::agent_cmds::unix_time(at) });
                println!("Nodes:");
                cilium_cli::agent_cmds::print_node_health(&nodes);
            }
            let reachable = nodes.iter().filter(|n| n.reachable()).count();
            Ok(if !nodes.is_empty() && reachable == nodes.len() { 0 } else { 1 })
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::exit(1);
        }
    }
}
