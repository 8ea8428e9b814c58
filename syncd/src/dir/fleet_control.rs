//! Applying fleet controls (issue 11) to a directory: the fleet view
//! keeps the newest control of each directory and kind
//! ([`crate::fleet::controls`]); a directory applies each one once, when
//! it is newer than the one it applied last. A local `syncctl pause` or
//! `resume` afterwards still works on this node, until the next fleet
//! control; after a restart the newest fleet control is applied again
//! (the fleet said so, and nothing newer has been said).

use sync_proto::pb;

use super::DirHandle;
use crate::fleet::controls::{Kind, order, signed_at};

/// "pause by alice at 2026-12-03T16:20:01Z; priority high by bob at ...".
pub(super) fn describe(controls: &[pb::Control]) -> String {
    let text = controls
        .iter()
        .map(|c| {
            let what = if c.action == "priority" {
                format!("priority {}", c.priority)
            } else {
                c.action.clone()
            };
            format!("{what} by {} at {}", c.operator, signed_at(c))
        })
        .collect::<Vec<_>>()
        .join("; ");
    crate::wire::truncate(&text, crate::wire::MAX_REPORT_ERROR)
}

impl DirHandle {
    /// Applies the controls of this directory newer than those it applied
    /// (`newest`: at most one per kind, from the fleet view).
    pub fn apply_controls(&self, newest: &[pb::Control]) {
        for c in newest {
            let applied = self.status().controls;
            let old = applied.iter().find(|a| Kind::of(a) == Kind::of(c));
            if old.is_some_and(|a| order(a) >= order(c)) {
                continue;
            }
            match c.action.as_str() {
                "pause" => self.pause(),
                "resume" => self.resume(),
                _ => match c.priority.parse() {
                    Ok(p) => self.set_priority(p),
                    Err(e) => {
                        tracing::warn!(dir = %self.id(), operator = %c.operator, "ignoring a fleet control: {e}");
                        continue;
                    }
                },
            }
            tracing::info!(
                dir = %self.id(),
                operator = %c.operator,
                action = %c.action,
                priority = %c.priority,
                "applied a fleet control: {}",
                describe(std::slice::from_ref(c))
            );
            self.state.update(|s| {
                s.controls.retain(|a| Kind::of(a) != Kind::of(c));
                s.controls.push(c.clone());
                s.controls.sort_by_key(Kind::of);
            });
        }
    }
}
