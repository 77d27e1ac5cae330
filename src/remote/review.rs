//! Reviewed plans (docs/review.md, "Apply what was reviewed"): what a pull request's preview showed a reviewer
//! of a terraform plan, stored under the plan stage's content key (its files and its needs' outputs), and read
//! back before a deploy applies a plan made from the same content.
//!
//! The one object a pull request writes, unsigned (its job has no signing key). It only ever stops an apply: of
//! what the plan policy denies and the override lets through, what the review does not list. A missing or
//! forged review that lists more leaves the check where the policy puts it; one that lists less stops applies
//! until the pull request's job stores its review again.

use super::Remote;
use crate::hash::key::Key;
use crate::tfplan::PlanSummary;
use serde::{Deserialize, Serialize};

pub(crate) const SCHEMA: &str = "kkpipe.review.v1";

/// What the reviewer was shown of one plan: what it destroys, by action, and its counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Review {
    pub schema: String,
    pub stage: String,
    /// The pull request's head commit, when the CI named it.
    pub commit: Option<String>,
    /// RFC 3339.
    pub reviewed_at: String,
    pub counts: String,
    pub delete: Vec<String>,
    pub replace: Vec<String>,
    /// Of each address deleted or replaced, a fingerprint of the object (`PlanSummary::destroyed_ids`).
    #[serde(default)]
    pub ids: std::collections::BTreeMap<String, String>,
}

impl Review {
    pub(crate) fn of(stage: &str, commit: Option<String>, plan: &PlanSummary) -> Review {
        Review {
            schema: SCHEMA.into(),
            stage: stage.into(),
            commit,
            reviewed_at: jiff::Timestamp::now().to_string(),
            counts: plan.counts(),
            delete: plan.delete.clone(),
            replace: plan.replace.clone(),
            ids: plan.destroyed_ids.clone(),
        }
    }

    /// Of `destroyed` (what the plan policy denies in `plan` and the override let through: (address, action)),
    /// what this review did not show: another address or action, or the same address for another object (its id
    /// changed since: something else was moved there). The policy's other verdicts are its own business.
    pub(crate) fn unreviewed(
        &self,
        plan: &PlanSummary,
        destroyed: &[(String, String)],
    ) -> Vec<(String, String, &'static str)> {
        destroyed
            .iter()
            .filter_map(|(address, action)| {
                let listed = match action.as_str() {
                    "delete" => &self.delete,
                    "replace" => &self.replace,
                    _ => return None,
                };
                if !listed.contains(address) {
                    return Some((address.clone(), action.clone(), "not in the reviewed plan"));
                }
                match (self.ids.get(address), plan.destroyed_ids.get(address)) {
                    (Some(was), Some(is)) if was != is => {
                        Some((address.clone(), action.clone(), "another object than the reviewed plan's"))
                    }
                    _ => None,
                }
            })
            .collect()
    }
}

/// A review is a few addresses: anything larger is not one (and is not kept in memory for long).
const MAX_REVIEW_BYTES: usize = 1 << 20;

fn name(env: &str, stage: &str, content: &Key) -> String {
    format!("reviews/{env}/{stage}/{content}.json")
}

impl Remote {
    /// Store a review, replacing one of the same content (a later run of the pull request's job reviews the plan
    /// as it is then). Whatever the mode: a pull request's job writes this and nothing else. `false` (with a
    /// warning) when the store refused or did not answer.
    pub(crate) fn put_review(&self, env: &str, content: &Key, review: &Review) -> bool {
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
    pub(crate) fn review(&self, env: &str, stage: &str, content: &Key) -> Option<Review> {
        let name = name(env, stage, content);
        let bytes = match self.store.get(&name) {
            Ok(Some((bytes, _))) => bytes,
            Ok(None) => return None,
            Err(e) => {
                self.failed("reading the reviewed plan", e);
                return None;
            }
        };
        let parsed = (bytes.len() <= MAX_REVIEW_BYTES).then(|| serde_json::from_slice::<Review>(&bytes).ok()).flatten();
        match parsed {
            Some(r) if r.schema == SCHEMA && r.stage == stage => Some(r),
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

    fn destroyed(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn only_destruction_the_review_did_not_show_is_unreviewed() {
        let mut seen = plan(&["a.lb"], &["a.node[0]"]);
        seen.destroyed_ids.insert("a.lb".into(), "1111".into());
        let reviewed = Review::of("terraform-plan", None, &seen);
        let same = destroyed(&[("a.lb", "delete"), ("a.node[0]", "replace")]);
        assert!(reviewed.unreviewed(&seen, &same).is_empty());
        assert!(reviewed.unreviewed(&seen, &[]).is_empty(), "less than reviewed is fine");
        let more = destroyed(&[("a.lb", "delete"), ("a.node[1]", "delete"), ("a.lb", "replace"), ("a.x", "update")]);
        let got: Vec<(String, String)> =
            reviewed.unreviewed(&seen, &more).into_iter().map(|(a, b, _)| (a, b)).collect();
        assert_eq!(got, destroyed(&[("a.node[1]", "delete"), ("a.lb", "replace")]), "another action is another change");
        // The same address, another object: moved there in the state since the review.
        let mut now = seen.clone();
        now.destroyed_ids.insert("a.lb".into(), "2222".into());
        let got = reviewed.unreviewed(&now, &destroyed(&[("a.lb", "delete")]));
        assert_eq!(got, [("a.lb".to_string(), "delete".to_string(), "another object than the reviewed plan's")]);
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
