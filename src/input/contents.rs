//! nixpkgs' `contents`: the store paths whose trees are merged at `/` in the
//! customisation layer as symlinks into the store (what `symlinkJoin` builds
//! for `streamLayeredImage`), so `/bin/app` in the image points at
//! `/nix/store/…-app/bin/app` and the store layers hold the files.
//!
//! The tree is made in a scratch directory (only directories and symlinks,
//! a few KiB) and then archived like any `--contents DIR`.  Directories are
//! merged; for a name two paths both give as a non-directory, the first
//! path listed wins, as `symlinkJoin` lets the first one win.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ContentsError {
    #[error("contents {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("contents {path}: not an absolute path")]
    Relative { path: PathBuf },
}

/// Fills the empty directory `root` with the merged symlink tree of `paths`.
pub fn link_tree(root: &Path, paths: &[PathBuf]) -> Result<(), ContentsError> {
    for p in paths {
        if !p.is_absolute() {
            return Err(ContentsError::Relative { path: p.clone() });
        }
        let md = std::fs::metadata(p).map_err(|source| ContentsError::Io { path: p.clone(), source })?;
        if md.is_dir() {
            merge(root, p)?;
        } else {
            // A single file (a script, say) is linked at / under its store name.
            let name = p.file_name().ok_or_else(|| ContentsError::Relative { path: p.clone() })?;
            link(&root.join(name), p)?;
        }
    }
    Ok(())
}

fn merge(into: &Path, from: &Path) -> Result<(), ContentsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ContentsError::Io { path, source }
    };
    let mut names: Vec<_> = std::fs::read_dir(from)
        .map_err(io(from))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(io(from))?;
    names.sort();
    for name in names {
        let src = from.join(&name);
        let dst = into.join(&name);
        // Directories are followed, as symlinkJoin's lndir follows them.
        let is_dir = std::fs::metadata(&src).map(|m| m.is_dir()).unwrap_or(false);
        let existing = std::fs::symlink_metadata(&dst).ok();
        match (is_dir, existing) {
            (true, None) => {
                std::fs::create_dir(&dst).map_err(io(&dst))?;
                // Not the umask's choice: the layer's bytes must not depend on it.
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).map_err(io(&dst))?;
                merge(&dst, &src)?;
            }
            (true, Some(m)) if m.is_dir() => merge(&dst, &src)?,
            (false, None) => link(&dst, &src)?,
            // The first path listed keeps the name.
            (_, Some(_)) => {}
        }
    }
    Ok(())
}

fn link(dst: &Path, target: &Path) -> Result<(), ContentsError> {
    if std::fs::symlink_metadata(dst).is_ok() {
        return Ok(());
    }
    std::os::unix::fs::symlink(target, dst).map_err(|source| ContentsError::Io { path: dst.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_merge_as_symlinks_first_path_wins() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        std::fs::create_dir_all(a.join("bin")).unwrap();
        std::fs::create_dir_all(b.join("bin")).unwrap();
        std::fs::create_dir_all(b.join("etc/ssl")).unwrap();
        std::fs::write(a.join("bin/app"), "a").unwrap();
        std::fs::write(b.join("bin/app"), "b").unwrap();
        std::fs::write(b.join("bin/sh"), "sh").unwrap();
        std::fs::write(b.join("etc/ssl/cert"), "c").unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        link_tree(&root, &[a.clone(), b.clone()]).unwrap();
        assert_eq!(std::fs::read_link(root.join("bin/app")).unwrap(), a.join("bin/app"));
        assert_eq!(std::fs::read_link(root.join("bin/sh")).unwrap(), b.join("bin/sh"));
        assert_eq!(std::fs::read_link(root.join("etc/ssl/cert")).unwrap(), b.join("etc/ssl/cert"));
        let m = std::fs::symlink_metadata(root.join("etc")).unwrap();
        assert!(m.is_dir() && m.permissions().mode() & 0o7777 == 0o755);
        let e = link_tree(&root, &[PathBuf::from("rel")]).unwrap_err();
        assert!(e.to_string().contains("not an absolute path"), "{e}");
        let e = link_tree(&root, &[d.path().join("missing")]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
