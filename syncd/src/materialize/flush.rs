//! Writing a large file back to disk while it is being received.

use std::sync::Arc;

/// A large file being written is flushed to disk every this many bytes,
/// in the background, so the fsync before its rename finds little left:
/// otherwise a 256 MiB file is written back all at once at the end, and
/// the receiver reports the version a second later than its last byte
/// arrived (measured: 7 receivers on one disk, 0.9 s).
pub(super) const FLUSH_EVERY: u64 = 32 << 20;

/// Writes a file's data back to disk in the background when kicked (at
/// most one flush pending; kicks during a flush coalesce).
pub(super) struct Flusher {
    kick: Option<std::sync::mpsc::SyncSender<()>>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Flusher {
    pub(super) fn start(file: &Arc<std::fs::File>) -> Flusher {
        let file = file.clone();
        let (kick, kicked) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::spawn(move || {
            let mut result = Ok(());
            while kicked.recv().is_ok() {
                if let Err(e) = file.sync_data() {
                    // Kept, and reported by `finish`: never lost.
                    result = result.and(Err(e));
                }
            }
            result
        });
        Flusher {
            kick: Some(kick),
            thread,
        }
    }

    pub(super) fn kick(&self) {
        if let Some(k) = &self.kick {
            let _ = k.try_send(());
        }
    }

    /// Waits for a flush in progress; the first error any flush met.
    pub(super) fn finish(mut self) -> std::io::Result<()> {
        drop(self.kick.take());
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the file's flusher thread panicked")))
    }
}
