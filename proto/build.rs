//! Compiles the .proto files into OUT_DIR. Uses the vendored protoc unless
//! PROTOC is set, so a plain `cargo build` needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("heterospec_descriptor.bin"))
        .compile_protos(
            &[
                "proto/heterospec/v1/generate.proto",
                "proto/heterospec/engine/v1/engine.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
