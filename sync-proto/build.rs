//! Generates the gRPC code from `proto/` with protox (pure Rust): no system
//! `protoc` is needed on build machines.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // compile_fds() emits no rerun-if-changed lines of its own.
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/syncd.proto", "proto/admin.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".syncd.v1.Chunk.data")
        .bytes(".syncd.v1.NodeBlob.data")
        .bytes(".syncd.v1.SwimPacket.data")
        // syncctl prints admin replies as JSON: the schema is admin.proto.
        .type_attribute(".syncd.admin.v1", "#[derive(serde::Serialize)]")
        .type_attribute(".syncd.v1.Control", "#[derive(serde::Serialize)]")
        .compile_fds(fds)?;
    Ok(())
}
