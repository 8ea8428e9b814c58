//! Helpers shared by the real-process tests.

use std::path::Path;
use std::process::Command;

/// The `syncd` binary under test.
pub fn syncd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_syncd"))
}

/// Runs `syncd index --json` and returns its report.
pub fn index_json(dir: &Path, state: &Path) -> serde_json::Value {
    let out = syncd()
        .args(["index", "--json", "--state"])
        .arg(state)
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
