//! The protos as a product: `scripts/check_protos.sh` runs `buf lint` and
//! `buf breaking` against every committed version of the protos (buf from
//! npm, installed into `target/npm` on first use).

use std::path::Path;
use std::process::Command;

#[test]
fn protos_pass_buf_lint_and_break_no_committed_version() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/check_protos.sh"))
        .current_dir(root)
        .output()
        .expect("bash runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("buf lint: ok") && log.contains("compatible with all"),
        "{log}"
    );
}
