//! `conveyor-worker install <dir>`: the init container copies the runtime into a volume shared
//! with the user's container, which then runs `<dir>/conveyor-worker run -- <command>`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Copies the running executable into `dir` as `conveyor-worker` (mode 0755), atomically.
pub fn install(dir: &Path) -> anyhow::Result<PathBuf> {
    let source = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .context("finding the running executable")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("conveyor-worker");
    let partial = dir.join(".conveyor-worker.partial");
    std::fs::copy(&source, &partial)
        .with_context(|| format!("copying {} to {}", source.display(), partial.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, &target)
        .with_context(|| format!("moving the copy to {}", target.display()))?;
    Ok(target)
}
