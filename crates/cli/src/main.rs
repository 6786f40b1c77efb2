//! `cilium`: the operator's command line. Agent commands talk to the agent's
//! socket; `cilium lab` builds and drives the lab.

use cilium_cli::{agent_cmds, lab_cmds};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cilium", version, about = "cilium-rs: eBPF networking, security and observability")]
struct Cli {
    #[command(flatten)]
    host: cilium_cli::HostArg,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Agent health and a summary of its state.
    Status(agent_cmds::StatusArgs),
    /// Endpoints managed by the agent.
    #[command(subcommand)]
    Endpoint(agent_cmds::EndpointCmd),
    /// Security identities.
    #[command(subcommand)]
    Identity(agent_cmds::IdentityCmd),
    /// The nodes of the cluster.
    #[command(subcommand)]
    Node(agent_cmds::NodeCmd),
    /// Import, inspect, delete and validate policies.
    #[command(subcommand)]
    Policy(agent_cmds::PolicyCmd),
    /// Load-balanced services (kube-proxy replacement).
    #[command(subcommand)]
    Service(agent_cmds::ServiceCmd),
    /// The datapath's maps.
    #[command(subcommand)]
    Bpf(agent_cmds::BpfCmd),
    /// Live datapath events: drops with reasons, traces, policy verdicts.
    Monitor(agent_cmds::MonitorArgs),
    /// What the DNS proxy learned for toFQDNs rules.
    #[command(subcommand)]
    Fqdn(agent_cmds::FqdnCmd),
    /// The lab: a cluster of network namespaces on this machine.
    #[command(subcommand)]
    Lab(lab_cmds::LabCmd),
}

fn main() {
    let cli = Cli::parse();
    let socket = cli.host.socket();
    let result = match cli.cmd {
        Cmd::Lab(c) => lab_cmds::run(c),
        other => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let client = cilium_api::Client::new(socket);
            rt.block_on(async move {
                match other {
                    Cmd::Status(a) => agent_cmds::status(&client, a).await,
                    Cmd::Endpoint(c) => agent_cmds::endpoint(&client, c).await,
                    Cmd::Identity(c) => agent_cmds::identity(&client, c).await,
                    Cmd::Node(c) => agent_cmds::node(&client, c).await,
                    Cmd::Policy(c) => agent_cmds::policy(&client, c).await,
                    Cmd::Service(c) => agent_cmds::service(&client, c).await,
                    Cmd::Bpf(c) => agent_cmds::bpf(&client, c).await,
                    Cmd::Monitor(a) => agent_cmds::monitor(&client, a).await,
                    Cmd::Fqdn(c) => agent_cmds::fqdn(&client, c).await,
                    Cmd::Lab(_) => unreachable!(),
                }
            })
        }
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::exit(1);
        }
    }
}
