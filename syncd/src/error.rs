//! Errors that say whose fault it is.
//!
//! - [`Refusal`]: this node refuses what a peer sent or asked; mapped to a
//!   gRPC status in one place ([`Refusal::to_status`]), so the codes are
//!   the protocol's (PROTOCOL.md) wherever the refusal comes from.
//! - [`SyncError`]: a directory's work failed, blaming a named peer, the
//!   file system at a path, the version's fit with this directory's
//!   policy, or this node itself. The operator sees it in `syncctl status`,
//!   the log (with `fault`) and `syncd_errors_total`.

use std::path::PathBuf;

use chunk_store::Origin;
use tonic::Status;

use crate::materialize::MaterializeError;

/// Why this node refuses a peer's message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// Malformed or beyond the protocol's bounds.
    #[error("from peer {peer}: {reason}")]
    Invalid { peer: String, reason: String },
    /// Another protocol version.
    #[error("from peer {peer}: {reason}")]
    Protocol { peer: String, reason: String },
    /// Over a table's or a budget's bound (ask again later).
    #[error("{0}")]
    Full(String),
    /// Too many calls at once (ask another peer).
    #[error("{0}")]
    Busy(String),
    /// A directory or object this node does not have.
    #[error("{0}")]
    NotFound(String),
    /// This node is shutting down.
    #[error("{0}")]
    Stopping(String),
    /// This node failed (a bug or its own storage).
    #[error("{0}")]
    Internal(String),
    /// The caller's certificate does not allow what it asked or claimed.
    #[error("from peer {peer}: {reason}")]
    Denied { peer: String, reason: String },
}

impl Refusal {
    /// The one mapping of refusals to gRPC codes.
    pub fn to_status(&self) -> Status {
        let msg = self.to_string();
        match self {
            Refusal::Invalid { .. } => Status::invalid_argument(msg),
            Refusal::Protocol { .. } => Status::failed_precondition(msg),
            Refusal::Full(_) | Refusal::Busy(_) => Status::resource_exhausted(msg),
            Refusal::NotFound(_) => Status::not_found(msg),
            Refusal::Stopping(_) => Status::unavailable(msg),
            Refusal::Internal(_) => Status::internal(msg),
            Refusal::Denied { .. } => Status::permission_denied(msg),
        }
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        r.to_status()
    }
}

impl From<chunk_store::Error> for Refusal {
    /// A store error while answering a peer: a bad id the peer named is
    /// its fault, anything else ours.
    fn from(e: chunk_store::Error) -> Refusal {
        match &e {
            chunk_store::Error::InvalidDirId { .. } => Refusal::Invalid {
                peer: String::new(),
                reason: e.to_string(),
            },
            chunk_store::Error::MissingNode { .. } => Refusal::NotFound(e.to_string()),
            _ => Refusal::Internal(e.to_string()),
        }
    }
}

/// Whose fault a failure was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The named peer sent something wrong or did not deliver.
    Peer(String),
    /// The file system at this path.
    Fs(PathBuf),
    /// The version does not fit this directory's policy or disk.
    Policy,
    /// This node (its index, or a bug).
    Local,
    /// Nobody's: the work was asked to stop.
    Stopped,
}

impl Fault {
    /// The label logged as `fault`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Fault::Peer(_) => "peer",
            Fault::Fs(_) => "filesystem",
            Fault::Policy => "policy",
            Fault::Local => "local",
            Fault::Stopped => "stopped",
        }
    }
}

/// A directory's scan or transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{context}: peer {peer}: {reason}")]
    Peer {
        peer: String,
        context: String,
        reason: String,
    },
    #[error("{context}: {}: {source}", path.display())]
    Fs {
        path: PathBuf,
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Policy(String),
    #[error("{context}: {source}")]
    Store {
        context: String,
        /// The peer a remote node came from, when the store error is
        /// about one.
        peer: Option<String>,
        source: chunk_store::Error,
    },
    #[error("{context}: {source}")]
    Apply {
        context: String,
        source: MaterializeError,
    },
    #[error("{0}")]
    Local(String),
}

impl SyncError {
    /// A store error in `context`; `peer` is where remote nodes came from.
    pub fn store(
        context: impl Into<String>,
        peer: Option<&str>,
        source: chunk_store::Error,
    ) -> Self {
        SyncError::Store {
            context: context.into(),
            peer: peer.map(str::to_string),
            source,
        }
    }

    pub fn peer(peer: &str, context: impl Into<String>, reason: impl Into<String>) -> Self {
        SyncError::Peer {
            peer: peer.to_string(),
            context: context.into(),
            reason: reason.into(),
        }
    }

    pub fn fs(
        path: impl Into<PathBuf>,
        context: impl Into<String>,
        source: std::io::Error,
    ) -> Self {
        SyncError::Fs {
            path: path.into(),
            context: context.into(),
            source,
        }
    }

    /// Whose fault it was.
    pub fn fault(&self) -> Fault {
        use chunk_store::Error as E;
        let store = |e: &E, peer: &Option<String>| -> Fault {
            let remote = matches!(
                e,
                E::InvalidNode {
                    origin: Origin::Remote,
                    ..
                } | E::InvalidTree {
                    origin: Origin::Remote,
                    ..
                } | E::MissingNode {
                    origin: Origin::Remote,
                    ..
                } | E::SourceFailed {
                    origin: Origin::Remote,
                    ..
                }
            );
            match e {
                _ if remote => Fault::Peer(peer.clone().unwrap_or_default()),
                E::Stopped => Fault::Stopped,
                E::DoesNotFit { .. } => Fault::Policy,
                E::Io { path, .. } | E::RootUnavailable { path, .. } => Fault::Fs(path.clone()),
                _ => Fault::Local,
            }
        };
        match self {
            SyncError::Peer { peer, .. } => Fault::Peer(peer.clone()),
            SyncError::Fs { path, .. } => Fault::Fs(path.clone()),
            SyncError::Policy(_) => Fault::Policy,
            SyncError::Store { peer, source, .. } => store(source, peer),
            SyncError::Apply { source, .. } => match source {
                MaterializeError::Stopped => Fault::Stopped,
                MaterializeError::Io { path, .. } => Fault::Fs(path.clone()),
                MaterializeError::PathRejected { .. } | MaterializeError::ThroughSymlink { .. } => {
                    Fault::Policy
                }
                MaterializeError::ChunkUnavailable { .. } => Fault::Peer(String::new()),
                MaterializeError::Store(e) => store(e, &None),
                #[allow(unreachable_patterns)]
                _ => Fault::Local,
            },
            SyncError::Local(_) => Fault::Local,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_the_protocols_codes() {
        let invalid = Refusal::Invalid {
            peer: "evil".into(),
            reason: "bad".into(),
        };
        assert_eq!(invalid.to_status().code(), tonic::Code::InvalidArgument);
        assert!(invalid.to_status().message().contains("evil"));
        let old = Refusal::Protocol {
            peer: "old".into(),
            reason: "peer speaks syncd protocol 1".into(),
        };
        assert_eq!(old.to_status().code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            Refusal::Full("x".into()).to_status().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            Refusal::NotFound("x".into()).to_status().code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn store_errors_blame_the_peer_only_for_what_it_sent() {
        let h = chunk_store::Hash::from_slice(&[7; 32]).unwrap();
        let remote = SyncError::store(
            "diff",
            Some("web-02"),
            chunk_store::Error::InvalidNode {
                hash: h,
                origin: Origin::Remote,
                reason: "bad".into(),
            },
        );
        assert_eq!(remote.fault(), Fault::Peer("web-02".into()));
        let local = SyncError::store(
            "diff",
            Some("web-02"),
            chunk_store::Error::InvalidNode {
                hash: h,
                origin: Origin::Local,
                reason: "bad".into(),
            },
        );
        assert_eq!(local.fault(), Fault::Local);
        let io = SyncError::fs("/srv/www", "free space", std::io::Error::other("EIO"));
        assert_eq!(io.fault(), Fault::Fs("/srv/www".into()));
        assert!(io.to_string().contains("/srv/www"));
    }
}
