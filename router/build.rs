// Generates the gRPC client from ../proto at build time (stubs are never committed).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/v2/generate.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_server(true) // the fake shard in router tests is a server
        .compile_protos(&["../proto/v2/generate.proto"], &["../proto/v2"])?;
    Ok(())
}
