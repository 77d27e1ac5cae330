//! Reviewed plans (docs/review.md, "Apply what was reviewed"): what a pull request's preview showed a reviewer
//! of a terraform plan, stored under the plan stage's content key (its files and its needs' outputs), and read
//! back before a deploy applies a plan made from the same content.
//!
//! The one object a pull request writes, unsigned (its job has no signing key). It is advisory in one direction
//! only: it can stop an apply that destroys more than it lists, never let through what the plan policy denies.
//! A forged or missing review makes the check no stricter than the policy.

use super::Remote;
use crate::hash::key::Key;
use crate::tfplan::PlanSummary;
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "kkpipe.review.v1";

/// What the reviewer was shown of one plan: what it destroys, by action, and its counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub schema: String,
    pub stage: String,
    /// The pull request's head commit, when the CI named it.
    pub commit: Option<String>,
    /// RFC 3339.
    pub reviewed_at: String,
    pub counts: String,
    pub delete: Vec<String>,
    pub replace: Vec<String>,
}

impl Review {
    pub fn of(stage: &str, commit: Option<String>, plan: &PlanSummary) -> Review {
        Review {
            schema: SCHEMA.into(),
            stage: stage.into(),
            commit,
            reviewed_at: jiff::Timestamp::now().to_string(),
            counts: plan.counts(),
            delete: plan.delete.clone(),
            replace: plan.replace.clone(),
        }
    }

    /// What `plan` deletes or replaces that this review did not show: (action, address).
    pub fn unreviewed(&self, plan: &PlanSummary) -> Vec<(&'static str, String)> {
        let new = |action: &'static str, now: &[String], seen: &[String]| -> Vec<(&'static str, String)> {
            now.iter().filter(|a| !seen.contains(a)).map(|a| (action, a.clone())).collect()
        };
        let mut out = new("delete", &plan.delete, &self.delete);
        out.extend(new("replace", &plan.replace, &self.replace));
        out
    }
}

fn name(env: &str, stage: &str, content: &Key) -> String {
    format!("reviews/{env}/{stage}/{content}.json")
}

impl Remote {
    /// Store a review, replacing one of the same content (a later run of the pull request's job reviews the plan
    /// as it is then). Whatever the mode: a pull request's job writes this and nothing else. `false` (with a
    /// warning) when the store refused or did not answer.
    pub fn put_review(&self, env: &str, content: &Key, review: &Review) -> bool {
        let name = name(env, &review.stage, content);
        let bytes = serde_json::to_vec_pretty(review).expect("serialisable");
        for _ in 0..3 {
            let current = match self.store.get(&name) {
                Ok(c) => c.map(|(_, v)| v),
                Err(e) => {
                    self.failed("storing the reviewed plan", e);
                    return false;
                }
            };
            match self.store.put_if(&name, bytes.clone(), current.as_ref()) {
                Ok(Some(_)) => return true,
                Ok(None) => continue,
                Err(e) => {
                    self.failed("storing the reviewed plan", e);
                    return false;
                }
            }
        }
        self.warn(format!("the reviewed plan `{name}` kept changing on the remote `{}`: not stored", self.url));
        false
    }

    /// The review of `stage`'s plan made from `content`, if one was stored and reads as one.
    pub fn review(&self, env: &str, stage: &str, content: &Key) -> Option<Review> {
        let name = name(env, stage, content);
        let bytes = match self.store.get(&name) {
            Ok(Some((bytes, _))) => bytes,
            Ok(None) => return None,
            Err(e) => {
                self.failed("reading the reviewed plan", e);
                return None;
            }
        };
        match serde_json::from_slice::<Review>(&bytes) {
            Ok(r) if r.schema == SCHEMA && r.stage == stage => Some(r),
            _ => {
                self.refused(&format!("the reviewed plan `{name}`"), "it is not a kkpipe.review.v1 document");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(delete: &[&str], replace: &[&str]) -> PlanSummary {
        PlanSummary {
            delete: delete.iter().map(|s| s.to_string()).collect(),
            replace: replace.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_destruction_the_review_did_not_show_is_unreviewed() {
        let reviewed = Review::of("terraform-plan", None, &plan(&["a.lb"], &["a.node[0]"]));
        assert!(reviewed.unreviewed(&plan(&["a.lb"], &["a.node[0]"])).is_empty());
        assert!(reviewed.unreviewed(&plan(&[], &[])).is_empty(), "less than reviewed is fine");
        assert_eq!(
            reviewed.unreviewed(&plan(&["a.lb", "a.node[1]"], &["a.lb"])),
            [("delete", "a.node[1]".to_string()), ("replace", "a.lb".to_string())],
            "a replace the review showed as a delete is another action"
        );
    }

    #[test]
    fn a_review_is_stored_replaced_and_read_back_per_environment_and_content() {
        let store = std::sync::Arc::new(crate::store::memory::Memory::default());
        let remote = Remote::for_tests(
            store,
            std::sync::Arc::new(crate::clock::System),
            std::time::Duration::from_secs(60),
            "t",
        );
        let content = Key(crate::hash::Hash::of(b"content"));
        let first = Review::of("terraform-plan", Some("abc".into()), &plan(&["a.lb"], &[]));
        assert!(remote.put_review("production", &content, &first));
        assert_eq!(remote.review("production", "terraform-plan", &content), Some(first));
        let again = Review::of("terraform-plan", Some("def".into()), &plan(&[], &[]));
        assert!(remote.put_review("production", &content, &again));
        assert_eq!(remote.review("production", "terraform-plan", &content), Some(again));
        assert_eq!(remote.review("staging", "terraform-plan", &content), None);
        assert_eq!(remote.review("production", "terraform-plan", &Key(crate::hash::Hash::of(b"other"))), None);
    }
}
