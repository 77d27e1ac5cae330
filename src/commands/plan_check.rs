//! `kkpipe plan-check PLAN`: a terraform plan against a policy (crate::tfplan), what a stage's `plan_policy`
//! runs after its plan and again before a deploy applies it.

use crate::cli::PlanCheckArgs;
use crate::error::{Error, exit};
use std::path::Path;

pub fn plan_check(args: &PlanCheckArgs) -> Result<u8, Error> {
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
