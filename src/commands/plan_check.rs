//! `kkpipe plan-check PLAN`: a terraform plan against a policy (crate::tfplan), what a stage's `plan_policy`
//! runs after its plan and again before a deploy applies it.

use crate::cli::PlanCheckArgs;
use crate::error::{Error, exit};
use crate::settings::Settings;
use std::path::Path;

pub fn plan_check(settings: &Settings, args: &PlanCheckArgs) -> Result<u8, Error> {
    if let Some(a) = args.deny.iter().find(|a| !crate::tfplan::ACTIONS.contains(&a.as_str())) {
        return Err(Error::Usage(format!("unknown action `{a}`; known: {}", crate::tfplan::ACTIONS.join(", "))));
    }
    let (policy, forced) = (globs(&args.allow)?, globs(&args.allow_destroy)?);
    let summary = crate::tfplan::show(&args.plan, Path::new("."), None).map_err(Error::Usage)?;
    let plan = args.plan.display();
    eprintln!("kkpipe: plan `{plan}`: {}", summary.counts());
    let overridden = summary.denied(&args.deny, &|a| policy.is_match(a));
    let denied: Vec<&(String, String)> = overridden.iter().filter(|(a, _)| !forced.is_match(a)).collect();
    for (address, action) in overridden.iter().filter(|(a, _)| forced.is_match(a)) {
        eprintln!("kkpipe: allowed by KKPIPE_ALLOW_DESTROY for this run: {action} `{address}`");
    }
    if denied.is_empty() {
        return Ok(exit::OK);
    }
    for (address, action) in &denied {
        eprintln!("kkpipe: denied by the plan policy: {action} `{address}`");
    }
    note(settings, &denied);
    let list: Vec<&str> = denied.iter().map(|(a, _)| a.as_str()).collect();
    eprintln!(
        "kkpipe: plan `{plan}` would {} {} resource(s) that the policy denies\n  hint: if that is intended, run with \
         KKPIPE_ALLOW_DESTROY='{}' (or `*`), or allow the addresses in the stage's `plan_policy.allow`",
        denied
            .iter()
            .map(|(_, a)| a.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join("/"),
        denied.len(),
        list.join(",")
    );
    Ok(exit::FAILED)
}

fn globs(patterns: &[String]) -> Result<globset::GlobSet, Error> {
    let split = patterns.iter().flat_map(|p| p.split(','));
    crate::tfplan::address_patterns(split).map_err(Error::Usage)
}

/// Inside a stage, what is denied becomes the stage's failure detail (the summary's row names it).
fn note(settings: &Settings, denied: &[&(String, String)]) {
    let Some(path) = settings.caller_env.get(crate::run::exec::FAILURE_NOTE_VAR) else { return };
    let mut text = String::new();
    for (address, action) in denied.iter().take(4) {
        text.push_str(&format!("the plan policy denies {action} `{address}`\n"));
    }
    if denied.len() > 4 {
        text.push_str(&format!("and {} more (the log names them)\n", denied.len() - 4));
    }
    // Best effort: the log says it all the same.
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
}
