//! Compiles our .proto files (upstream's field numbers) with protox, a pure
//! Rust protobuf compiler: no protoc on the build machine. prost/tonic
//! generate the messages and services; pbjson generates the proto3 JSON
//! mapping with the original field names, as `hubble observe -o json` prints.

use prost::Message;

fn main() -> anyhow::Result<()> {
    let files = [
        "flow/flow.proto",
        "relay/relay.proto",
        "peer/peer.proto",
        "observer/observer.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor = out.join("descriptor.bin");
    std::fs::write(&descriptor, fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    let bytes = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new()
        .register_descriptors(&bytes)?
        .preserve_proto_field_names()
        .build(&[".flow", ".relay", ".peer", ".observer"])?;
    Ok(())
}
