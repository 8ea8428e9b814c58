//! Which manifest nodes a directory's readers may ask for (issue 11,
//! read authorization): under TLS, `GetNodes` for directory `d` answers
//! only nodes of the version of `d` this node holds. Nodes are stored by
//! content, shared between directories; without this, a peer carrying one
//! directory could read another's tree by asking for its root (roots are
//! in every record) under the name of the first.
//!
//! The set of a version's nodes is computed on the first read after the
//! version changes (one walk of the tree, as garbage collection does) and
//! kept per directory until the next version. The walk runs in a task of
//! its own, once per version, whoever asked first: a caller that gives up
//! does not make the next one start it again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chunk_store::Hash;

use crate::error::Refusal;
use crate::local::LocalNode;
use crate::locks::LockExt as _;
use crate::transport::Caller;

/// The walk's outcome once done (`None` while it runs).
type Nodes = tokio::sync::watch::Receiver<Option<Result<Arc<HashSet<Hash>>, String>>>;

/// Per directory: the root whose nodes are readable, and their ids once
/// walked.
#[derive(Debug, Default)]
pub struct NodeScopes {
    by_dir: Mutex<HashMap<String, (Hash, Nodes)>>,
}

impl NodeScopes {
    /// Refuses `ids` unless every one is a node of the version of `dir`
    /// this node holds.
    pub async fn check(
        &self,
        node: &Arc<LocalNode>,
        caller: &Caller,
        dir: &str,
        ids: &[Hash],
    ) -> Result<(), Refusal> {
        let held = node
            .fleet
            .own_record()
            .dirs
            .iter()
            .find(|v| v.dir == dir)
            .and_then(|v| Hash::from_slice(&v.root));
        let Some(root) = held else {
            self.by_dir.locked().remove(dir);
            return Err(Refusal::NotFound(format!(
                "this node holds no version of directory {:?}",
                crate::wire::short(dir)
            )));
        };
        let mut walked = {
            let mut m = self.by_dir.locked();
            match m.get(dir) {
                Some((r, rx)) if *r == root => rx.clone(),
                _ => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let (store, env) = (node.store.clone(), node.env.clone());
                    tokio::spawn(async move {
                        let r = env
                            .blocking(move || store.version_nodes(&root))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string()));
                        let _ = tx.send(Some(r.map(Arc::new)));
                    });
                    m.insert(dir.to_string(), (root, rx.clone()));
                    rx
                }
            }
        };
        let done = walked
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Refusal::Internal(format!("listing the nodes of {root}: the walk ended")))?
            .clone();
        let nodes = match done {
            Some(Ok(nodes)) => nodes,
            Some(Err(e)) => {
                return Err(Refusal::Internal(format!(
                    "listing the nodes of {root}: {e}"
                )));
            }
            None => {
                return Err(Refusal::Internal(format!(
                    "listing the nodes of {root}: no outcome"
                )));
            }
        };
        if let Some(other) = ids.iter().find(|id| !nodes.contains(id)) {
            let reason = format!(
                "node {other} is not part of the version of directory {:?} held here",
                crate::wire::short(dir)
            );
            tracing::warn!(peer = %caller.who(), "refused a read: {reason}");
            return Err(Refusal::Denied {
                peer: caller.who(),
                reason,
            });
        }
        Ok(())
    }
}
