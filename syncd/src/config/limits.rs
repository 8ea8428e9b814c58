//! `[limits]` (bandwidth caps, node and directory) and `[serve]` (serving
//! limits and origin protection): parsed with units, checked with the file
//! and line of a bad value.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Size};
use crate::bandwidth::Caps;

/// `[serve]`: how many chunk streams this node serves at once (in all and
/// to one peer address), and for how long a chunk it sent one receiver is
/// left out for others (origin protection: they get it from that
/// receiver). Read at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeSection {
    #[serde(default = "default_streams")]
    pub streams: usize,
    #[serde(default = "default_streams_per_peer")]
    pub streams_per_peer: usize,
    /// `"0s"` turns origin protection off.
    #[serde(default = "default_spread_window", with = "humantime_serde")]
    pub spread_window: Duration,
}

impl Default for ServeSection {
    fn default() -> Self {
        ServeSection {
            streams: default_streams(),
            streams_per_peer: default_streams_per_peer(),
            spread_window: default_spread_window(),
        }
    }
}

fn default_streams() -> usize {
    crate::peer::MAX_STREAMS
}

fn default_streams_per_peer() -> usize {
    crate::peer::MAX_STREAMS_PER_PEER
}

fn default_spread_window() -> Duration {
    crate::haves::SERVED_TTL
}

/// Most `[serve] streams`: each holds up to 8 MiB of batches.
pub const MAX_SERVE_STREAMS: usize = 1024;
/// Longest `[serve] spread_window`.
pub const MAX_SPREAD_WINDOW: Duration = Duration::from_secs(60);

impl ServeSection {
    pub(super) fn check(&self, file: &Path, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: file.to_path_buf(),
            line: section_line(text, "serve", key),
            message,
        };
        if !(1..=MAX_SERVE_STREAMS).contains(&self.streams) {
            return Err(bad(
                "streams",
                format!("serve streams must be 1 to {MAX_SERVE_STREAMS}"),
            ));
        }
        if !(1..=self.streams).contains(&self.streams_per_peer) {
            return Err(bad(
                "streams_per_peer",
                format!(
                    "serve streams_per_peer must be 1 to streams ({})",
                    self.streams
                ),
            ));
        }
        if self.spread_window > MAX_SPREAD_WINDOW {
            return Err(bad(
                "spread_window",
                "serve spread_window must be at most 60s (\"0s\" turns it off)".into(),
            ));
        }
        Ok(())
    }
}

/// Bandwidth caps in bytes per second, e.g. `upload = "25MB"`; a cap left
/// out is no cap. In `syncd.toml` they cap the node, in a `dirs.d` file
/// that directory (both apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub upload: Option<Size>,
    pub download: Option<Size>,
}

impl LimitsSection {
    pub fn caps(&self) -> Caps {
        Caps {
            upload: self.upload.map(|s| s.0),
            download: self.download.map(|s| s.0),
        }
    }

    /// A cap below [`MIN_CAP`] is a mistake: a call asks for up to 1 MiB
    /// and pays for it before it is sent, so a trickle of a few KiB/s
    /// would make every transfer stall (0 would stop all traffic).
    pub(super) fn check(&self, file: &Path, text: &str) -> Result<(), ConfigError> {
        for (key, v) in [("upload", self.upload), ("download", self.download)] {
            if v.is_some_and(|s| s.0 < MIN_CAP) {
                return Err(ConfigError::Invalid {
                    path: file.to_path_buf(),
                    line: section_line(text, "limits", key),
                    message: format!(
                        "limits {key} must be at least 256KiB (bytes per second); leave it out for no cap"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The smallest bandwidth cap, bytes per second.
pub const MIN_CAP: u64 = 256 << 10;

/// The line of `key` inside the `[section]` table.
pub(super) fn section_line(text: &str, section: &str, key: &str) -> usize {
    let header = format!("[{section}]");
    let start = text.lines().position(|l| l.trim() == header).unwrap_or(0);
    text.lines()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.trim_start().starts_with(key))
        .map_or(start + 1, |(i, _)| i + 1)
}
