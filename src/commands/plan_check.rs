//! `kkpipe plan-check PLAN`: a terraform plan against a policy (crate::tfplan), what a stage's `plan_policy`
//! runs after its plan and again before a deploy applies it.

use crate::cli::PlanCheckArgs;
use crate::error::{Error, exit};
use crate::remote::review::Review;
use crate::settings::Settings;
use std::path::Path;

pub(super) fn plan_check(settings: &Settings, args: &PlanCheckArgs) -> Result<u8, Error> {
    if let Some(a) = args.deny.iter().find(|a| !crate::tfplan::ACTIONS.contains(&a.as_str())) {
        return Err(Error::Usage(format!("unknown action `{a}`; known: {}", crate::tfplan::ACTIONS.join(", "))));
    }
    let (policy, forced) = (globs(&args.allow)?, globs(&args.allow_destroy)?);
    let reviewed = match &args.reviewed {
        Some(file) => Some(review(file)?),
        None => None,
    };
    let summary = crate::tfplan::show(&args.plan, Path::new("."), None).map_err(Error::Usage)?;
    let plan = args.plan.display().to_string();
    eprintln!("kkpipe: plan `{plan}`: {}", summary.counts());
    let (let_through, denied): (Vec<Change>, Vec<Change>) =
        summary.denied(&args.deny, &|a| policy.is_match(a)).into_iter().partition(|(a, _)| forced.is_match(a));
    for (address, action) in &let_through {
        eprintln!("kkpipe: allowed by KKPIPE_ALLOW_DESTROY for this run: {action} `{address}`");
    }
    for (address, action) in &denied {
        eprintln!("kkpipe: denied by the plan policy: {action} `{address}`");
    }
    // What the override let through must also be what the reviewer saw (unless named one by one).
    let unreviewed = match &reviewed {
        Some(r) => unreviewed(r, &summary, &let_through, &args.allow_destroy),
        None => Vec::new(),
    };
    let mut notes: Vec<String> =
        denied.iter().map(|(address, action)| format!("the plan policy denies {action} `{address}`")).collect();
    notes.extend(unreviewed.iter().map(|(address, action, _)| format!("not reviewed: {action} `{address}`")));
    note(settings, &notes);
    if !denied.is_empty() {
        let list: Vec<&str> = denied.iter().map(|(a, _)| a.as_str()).collect();
        let actions: std::collections::BTreeSet<&str> = denied.iter().map(|(_, a)| a.as_str()).collect();
        eprintln!(
            "kkpipe: plan `{plan}` would {} {} resource(s) that the policy denies\n  hint: if that is intended, run \
             with KKPIPE_ALLOW_DESTROY='{}' (or `*`), or allow the addresses in the stage's `plan_policy.allow`",
            actions.into_iter().collect::<Vec<_>>().join("/"),
            denied.len(),
            list.join(",")
        );
    }
    if let (Some(r), false) = (&reviewed, unreviewed.is_empty()) {
        report_unreviewed(&plan, r, &unreviewed, &let_through);
    }
    Ok(if denied.is_empty() && unreviewed.is_empty() { exit::OK } else { exit::FAILED })
}

/// A resource's address and the action on it.
type Change = (String, String);

/// A reviewed plan (kkpipe.review.v1), as the scheduler fetched it from the remote.
fn review(file: &Path) -> Result<Review, Error> {
    let text = std::fs::read(file).map_err(|source| Error::Io {
        action: "read the reviewed plan",
        path: file.into(),
        source,
    })?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::Usage(format!("`{}` is not a reviewed plan (kkpipe.review.v1): {e}", file.display())))
}

/// Of what the override let through, what the review did not show, less the addresses the override names one by
/// one (a pattern with `*` is consent to the policy, not to a change nobody saw): (address, action, why).
fn unreviewed(
    r: &Review,
    summary: &crate::tfplan::PlanSummary,
    let_through: &[(String, String)],
    allow: &[String],
) -> Vec<(String, String, &'static str)> {
    let named: Vec<&str> =
        allow.iter().flat_map(|a| a.split(',')).map(str::trim).filter(|a| !a.contains('*')).collect();
    r.unreviewed(summary, let_through)
        .into_iter()
        .filter(|(address, _, _)| !named.contains(&address.as_str()))
        .collect()
}

fn report_unreviewed(
    plan: &str,
    r: &Review,
    unreviewed: &[(String, String, &'static str)],
    let_through: &[(String, String)],
) {
    for (address, action, why) in unreviewed {
        eprintln!("kkpipe: {why}: {action} `{address}`");
    }
    let commit = r.commit.as_deref().map(|c| format!(" of commit {}", crate::report::short_commit(c, 12)));
    // Naming addresses replaces a `*`: every one the override must let through is named.
    let mut all: Vec<&str> = let_through.iter().map(|(a, _)| a.as_str()).collect();
    all.dedup();
    eprintln!(
        "kkpipe: plan `{plan}` destroys what its review did not show (the review{}, {}: {}): the state changed \
         since, and nothing is applied\n  hint: review it again (re-run the pull request's job: its preview stores \
         the plan as it is now), then run this again; or, to apply it as it is, name each address in \
         KKPIPE_ALLOW_DESTROY='{}'",
        commit.unwrap_or_default(),
        r.reviewed_at,
        r.counts,
        all.join(",")
    );
}

fn globs(patterns: &[String]) -> Result<globset::GlobSet, Error> {
    let split = patterns.iter().flat_map(|p| p.split(','));
    crate::tfplan::address_patterns(split).map_err(Error::Usage)
}

/// Inside a stage, what is denied or was not reviewed becomes the stage's failure detail (the summary's row
/// names it).
fn note(settings: &Settings, lines: &[String]) {
    let Some(path) = settings.caller_env.get(crate::run::exec::FAILURE_NOTE_VAR) else { return };
    if lines.is_empty() {
        return;
    }
    let mut text: String = lines.iter().take(4).map(|l| format!("{l}\n")).collect();
    if lines.len() > 4 {
        text.push_str(&format!("and {} more (the log names them)\n", lines.len() - 4));
    }
    // Best effort: the log says it all the same.
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
}
