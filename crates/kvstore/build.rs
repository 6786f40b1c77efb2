//! Compiles our subset of etcd's v3 API (same package, services and field
//! numbers as etcd's rpc.proto and kv.proto) with protox: no protoc.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    let fds = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(false).compile_fds(fds)?;
    Ok(())
}
