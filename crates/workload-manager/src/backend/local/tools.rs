//! Host tools the local backend runs (iproute2, nftables, mkfs, …): found in the system
//! directories, run with a fixed `PATH` and nothing else of the manager's environment.

use std::path::{Path, PathBuf};

use crate::backend::BackendError;

/// A tool in the system directories, or what to install.
pub fn system_tool(name: &str, package: &str) -> Result<PathBuf, String> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("`{name}` is not installed (apt-get install {package})"))
}

/// Runs a tool, feeding `stdin`; a failure names the command and its stderr.
pub async fn run(bin: &Path, args: Vec<&str>, stdin: Option<String>) -> Result<(), BackendError> {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(&args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| BackendError::Failed(format!("{}: {e}", bin.display())))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| BackendError::Failed(format!("{}: {e}", bin.display())))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| BackendError::Failed(format!("{}: {e}", bin.display())))?;
    if out.status.success() {
        return Ok(());
    }
    Err(BackendError::Failed(format!(
        "{} {}: {}",
        bin.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}
