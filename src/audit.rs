//! Who deployed what, from where: the audit fields every run records (and every deploy's ledger record
//! carries), and the uncommitted changes a deploy must not ship by accident.
//!
//! Everything but [`uncommitted`] is read from the environment and `.git` without spawning anything, so a
//! no-op run pays nothing; `git status` runs only when a deploy stage is about to deploy.

use crate::ci::Provider;
pub(crate) use crate::fresh::Audit;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// What the caller's environment and `.git` say; `dirty` is filled in later, once a deploy is known.
pub(crate) fn of(root: &Path, provider: Option<Provider>, env: &HashMap<String, String>) -> Audit {
    let var = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let local_actor = || {
        let user = var("USER").or_else(|| var("LOGNAME")).unwrap_or_else(|| "unknown".into());
        format!("{user}@{}", crate::clock::hostname())
    };
    match provider {
        Some(p) => Audit {
            git_branch: p.head_branch(&var).or_else(|| head_branch(root)),
            dirty: None,
            actor: p.actor(&var).or_else(|| Some(local_actor())),
            run_url: p.run_url(&var),
        },
        None => Audit { git_branch: head_branch(root), dirty: None, actor: Some(local_actor()), run_url: None },
    }
}

/// The git directory of the repository `root` is in: the nearest `.git` at or above it (a directory, or a
/// worktree's `.git` file naming one), as git finds it.
pub(crate) fn git_dir(root: &Path) -> Option<std::path::PathBuf> {
    root.ancestors().find_map(|d| {
        let dot_git = d.join(".git");
        if dot_git.is_dir() {
            return Some(dot_git);
        }
        let text = std::fs::read_to_string(&dot_git).ok()?;
        Some(d.join(text.strip_prefix("gitdir:")?.trim()))
    })
}

/// The checked-out commit, read from `.git` without spawning git (cheap, and fine when git is absent). A
/// worktree keeps `HEAD` of its own and the branches in the common directory (its `commondir` file).
pub(crate) fn git_head(root: &Path) -> Option<String> {
    let git_dir = git_dir(root)?;
    let head = std::fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return Some(head.to_string());
    };
    let reference = reference.trim();
    let common = match std::fs::read_to_string(git_dir.join("commondir")) {
        Ok(c) => git_dir.join(c.trim()),
        Err(_) => git_dir.clone(),
    };
    for dir in [&git_dir, &common] {
        if let Ok(h) = std::fs::read_to_string(dir.join(reference)) {
            return Some(h.trim().to_string());
        }
    }
    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
    packed.lines().find_map(|l| l.strip_suffix(reference).map(|h| h.trim().to_string()))
}

/// The branch `HEAD` names, read from `.git` (`None`: detached, or no repository).
pub(crate) fn head_branch(root: &Path) -> Option<String> {
    let head = std::fs::read_to_string(git_dir(root)?.join("HEAD")).ok()?;
    head.trim().strip_prefix("ref:")?.trim().strip_prefix("refs/heads/").map(str::to_string)
}

/// The repository's uncommitted changes, as paths relative to `root` (the pipeline's directory) with `/`
/// separators: tracked files modified, added, deleted or with a changed mode, and, with `untracked`, files git
/// does not ignore and does not track. `Ok(None)` when `root` is in no git repository.
pub(crate) fn uncommitted(root: &Path, untracked: bool) -> Result<Option<Vec<String>>, String> {
    let git = |args: &[&str]| Command::new("git").env("LC_ALL", "C").arg("-C").arg(root).args(args).output();
    let top = match git(&["rev-parse", "--show-toplevel"]) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim_end_matches('\n').to_string(),
        // Only "no repository here" means nothing to compare with; any other refusal (a repository git will not
        // read: "dubious ownership", a corrupt index) cannot be taken for a clean tree.
        Ok(o) if git_dir(root).is_none() && String::from_utf8_lossy(&o.stderr).contains("not a git repository") => {
            return Ok(None);
        }
        Ok(o) => {
            let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
            return Err(format!("git fails in `{}`: {why}", root.display()));
        }
        // No git on this machine: there is no commit to compare with.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot run git to look for uncommitted changes: {e}")),
    };
    let mode = if untracked { "--untracked-files=all" } else { "--untracked-files=no" };
    // Porcelain paths are relative to the top of the work tree, whatever the current directory.
    let out = git(&["status", "--porcelain=v1", "-z", "--no-renames", mode])
        .map_err(|e| format!("cannot run git status: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git status failed in {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let root = root.canonicalize().map_err(|e| format!("{}: {e}", root.display()))?;
    let top = Path::new(&top).canonicalize().map_err(|e| format!("{top}: {e}"))?;
    let prefix = root.strip_prefix(&top).unwrap_or(Path::new("")).to_string_lossy().replace('\\', "/");
    let mut paths = Vec::new();
    for entry in out.stdout.split(|&b| b == 0).filter(|e| e.len() > 3) {
        let path = String::from_utf8_lossy(&entry[3..]).to_string();
        let path = path.trim_end_matches('/');
        let within = match prefix.is_empty() {
            true => Some(path),
            false => path.strip_prefix(prefix.as_str()).and_then(|p| p.strip_prefix('/')),
        };
        if let Some(p) = within {
            paths.push(p.to_string());
        }
    }
    Ok(Some(paths))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.email=t@t", "-c", "user.name=t"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn uncommitted_paths_are_relative_to_the_pipeline_directory_and_untracked_ones_only_when_asked() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path();
        std::fs::create_dir_all(top.join("infra/tf")).unwrap();
        std::fs::write(top.join("infra/tf/main.tf"), "a").unwrap();
        std::fs::write(top.join("outside"), "a").unwrap();
        git(top, &["init", "-q"]);
        git(top, &["add", "."]);
        git(top, &["commit", "-qm", "init"]);
        let root = top.join("infra");
        assert_eq!(uncommitted(&root, true).unwrap(), Some(vec![]));
        std::fs::write(top.join("infra/tf/main.tf"), "b").unwrap();
        std::fs::write(top.join("infra/tf/new.tf"), "c").unwrap();
        std::fs::write(top.join("outside"), "b").unwrap();
        let mut all = uncommitted(&root, true).unwrap().unwrap();
        all.sort();
        assert_eq!(all, ["tf/main.tf", "tf/new.tf"], "changes outside the pipeline's directory are not its inputs");
        assert_eq!(uncommitted(&root, false).unwrap().unwrap(), ["tf/main.tf"]);
        assert_eq!(head_branch(top).as_deref().map(|b| b == "master" || b == "main"), Some(true));
        let none = tempfile::tempdir().unwrap();
        assert_eq!(uncommitted(none.path(), true).unwrap(), None);
    }
}
