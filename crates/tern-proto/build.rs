fn main() {
    let proto = "../../proto/tern.proto";
    println!("cargo:rerun-if-changed={proto}");
    // Services only with the "grpc" feature: the messages alone need no tonic.
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .bytes(".")
        .compile_protos(&[proto], &["../../proto"])
        .expect("compile proto/tern.proto (needs protoc: apt-get install protobuf-compiler)");
}
