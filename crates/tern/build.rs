fn main() {
    // etcd's v3 KV API, for `tern bench --backend etcd` (client only).
    let proto = "proto/etcd_kv.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_protos(&[proto], &["proto"])
        .expect("compile proto/etcd_kv.proto (needs protoc: apt-get install protobuf-compiler)");
}
