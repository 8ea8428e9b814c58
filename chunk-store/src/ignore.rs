//! Ignore patterns of a synced directory (`ignore = ["*.tmp", ".cache/"]`):
//! paths that are neither published nor touched.
//!
//! The rules are a small, predictable subset of gitignore:
//! - a pattern without `/` (other than a trailing one) matches the name of
//!   an entry at any depth: `*.tmp`, `.cache/`;
//! - a pattern with a `/` inside is anchored at the root and matches the
//!   whole relative path: `build/*.o`, `/logs/` (a leading `/` is dropped);
//! - a trailing `/` matches directories only; an ignored directory is not
//!   entered at all;
//! - `*` and `?` never cross a `/`; `**` does; `[abc]` classes work.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

/// A compiled set of ignore patterns.
#[derive(Clone, Debug, Default)]
pub struct Ignore {
    names: Option<GlobSet>,
    name_dirs: Option<GlobSet>,
    paths: Option<GlobSet>,
    path_dirs: Option<GlobSet>,
}

/// A pattern that is not a valid glob.
#[derive(Debug, thiserror::Error)]
#[error("ignore pattern {pattern:?}: {reason}")]
pub struct PatternError {
    pub pattern: String,
    pub reason: String,
}

fn glob(pattern: &str, original: &str) -> Result<Glob, PatternError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| PatternError {
            pattern: original.to_string(),
            reason: e.kind().to_string(),
        })
}

fn build(globs: Vec<Glob>) -> Result<Option<GlobSet>, PatternError> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        b.add(g);
    }
    b.build().map(Some).map_err(|e| PatternError {
        pattern: String::new(),
        reason: e.to_string(),
    })
}

impl Ignore {
    /// Compiles `patterns`; the first invalid one is the error.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Ignore, PatternError> {
        let (mut names, mut name_dirs, mut paths, mut path_dirs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for p in patterns {
            let original = p.as_ref();
            let (body, dir_only) = match original.strip_suffix('/') {
                Some(b) => (b, true),
                None => (original, false),
            };
            let anchored = body.contains('/');
            let body = body.trim_start_matches('/');
            if body.is_empty() {
                return Err(PatternError {
                    pattern: original.to_string(),
                    reason: "matches nothing (or everything)".into(),
                });
            }
            let g = glob(body, original)?;
            match (anchored, dir_only) {
                (false, false) => names.push(g),
                (false, true) => name_dirs.push(g),
                (true, false) => paths.push(g),
                (true, true) => path_dirs.push(g),
            }
        }
        Ok(Ignore {
            names: build(names)?,
            name_dirs: build(name_dirs)?,
            paths: build(paths)?,
            path_dirs: build(path_dirs)?,
        })
    }

    /// Whether the entry at relative path `rel` (no leading `/`) is ignored.
    pub fn is_ignored(&self, rel: &str, is_dir: bool) -> bool {
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let hit = |set: &Option<GlobSet>, s: &str| set.as_ref().is_some_and(|g| g.is_match(s));
        hit(&self.names, name)
            || hit(&self.paths, rel)
            || (is_dir && (hit(&self.name_dirs, name) || hit(&self.path_dirs, rel)))
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_none()
            && self.name_dirs.is_none()
            && self.paths.is_none()
            && self.path_dirs.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_as_documented() {
        let ig = Ignore::new(&["*.tmp", ".cache/", "build/*.o", "/logs/", "a/**/z"]).unwrap();
        let cases = [
            ("x.tmp", false, true),
            ("deep/down/x.tmp", false, true),
            ("x.tmpl", false, false),
            (".cache", true, true),
            ("sub/.cache", true, true),
            (".cache", false, false), // a file named .cache: dir-only pattern
            ("build/main.o", false, true),
            ("build/sub/main.o", false, false), // * does not cross /
            ("other/build/main.o", false, false), // anchored
            ("logs", true, true),
            ("sub/logs", true, false),
            ("a/z", false, true),
            ("a/b/c/z", false, true),
            ("keep.txt", false, false),
        ];
        for (rel, is_dir, want) in cases {
            assert_eq!(ig.is_ignored(rel, is_dir), want, "{rel} dir={is_dir}");
        }
        assert!(Ignore::new::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = Ignore::new(&["ok", "[unclosed"]).unwrap_err();
        assert_eq!(e.pattern, "[unclosed");
        assert!(Ignore::new(&["/"]).is_err());
    }
}
