fn main() {
    let proto = "../../proto/tern.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&[proto], &["../../proto"])
        .expect("compile proto/tern.proto (needs protoc: apt-get install protobuf-compiler)");
}
