//! `kkpipe preview`: the push to the target branch evaluated as `status` would (the same decision as `run`),
//! and the terraform plans this job made, summarised (crate::tfplan). Nothing runs but `terraform show`.

use super::Opened;
use super::status::status_evaluations;
use crate::cli::{PreviewArgs, Selection};
use crate::error::{Error, exit};
use crate::pipeline::Kind;
use crate::report::preview::{
    Denied, DriftOnMerge, OnMerge, PlanPreview, Preview, PreviewStage, ProbeSeen, ProbeState, SCHEMA,
};
use crate::report::{StageRow, StageState, json};
use crate::settings::Settings;

pub(super) fn preview(settings: &Settings, args: &PreviewArgs) -> Result<u8, Error> {
    let sel = push_selection(settings, &args.selection)?;
    let o = Opened::open(settings, &sel)?;
    let (rows, evals) = status_evaluations(settings, &o)?;
    let masker = o.masker(settings);
    let mask = |t: &str| masker.mask_str(t);
    let stages: Vec<PreviewStage> = rows.iter().map(|r| PreviewStage::from_row(r, &mask)).collect();
    let plans = plans(settings, &o, &rows, &stages, &mask);
    let var = |k: &str| settings.caller_env.get(k).cloned();
    let commit = crate::ci::detect(&var).and_then(|p| crate::ci::pr_head(p, &var));
    let context = json::Context::new(o.event.as_ref(), &o.env);
    store_reviews(settings, &o, &evals, &plans, commit.as_deref());
    let probes = probes(&o, &stages, &mask)?;
    let preview = Preview { schema: SCHEMA, context, commit, stages, plans, probes };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&preview).expect("serialisable"));
    } else {
        print!("{}", preview.markdown());
    }
    Ok(exit::OK)
}

/// What was last seen of each deploy stage's live system in this environment (kept by `run` and `verify`,
/// carried by cache archives), and for drift no deploy has applied over since, what the push after the merge
/// does about it.
fn probes(o: &Opened, stages: &[PreviewStage], mask: &dyn Fn(&str) -> String) -> Result<Vec<ProbeSeen>, Error> {
    use crate::cache::probes::Seen;
    let mut out = Vec::new();
    for p in o.cache.probes(Some(&o.env))? {
        let Some(stage) = o.pipeline.stages.iter().find(|s| s.name == p.stage && s.is_deploy()) else { continue };
        let probed_at = crate::clock::timestamp(p.at_ms);
        let seen = |state| ProbeSeen {
            stage: p.stage.clone(),
            probed_at: probed_at.clone(),
            state,
            resources: Vec::new(),
            more: 0,
            detail: None,
            on_merge: None,
        };
        let Seen::Drifted { resources, more, detail } = &p.seen else {
            out.push(seen(if p.seen == Seen::Deployed { ProbeState::Deployed } else { ProbeState::InSync }));
            continue;
        };
        // Masked again with this run's secrets; a stage whose probe is gone is not probed by the push.
        let resources: Vec<crate::tfplan::TextChange> = resources
            .iter()
            .map(|r| crate::tfplan::TextChange { address: mask(&r.address), change: r.change.clone() })
            .collect();
        let detail = resources.is_empty().then(|| mask(detail)).filter(|d| !d.is_empty());
        let on_merge = match (stages.iter().find(|s| s.name == p.stage).map(|s| s.on_merge), &stage.verify) {
            (Some(OnMerge::Deploys), _) => DriftOnMerge::Deploys,
            (Some(OnMerge::Fresh | OnMerge::IfUpstreamChanges), Some(_)) => match stage.on_drift {
                crate::pipeline::OnDrift::Apply => DriftOnMerge::ProbesAndDeploys,
                crate::pipeline::OnDrift::Fail => DriftOnMerge::ProbesAndFails,
            },
            _ => DriftOnMerge::Nothing,
        };
        out.push(ProbeSeen { resources, more: *more, detail, on_merge: Some(on_merge), ..seen(ProbeState::Drifted) });
    }
    Ok(out)
}

/// A merge is a push to the target branch: the pull request's, from the CI, unless `--branch` says.
fn push_selection(settings: &Settings, sel: &Selection) -> Result<Selection, Error> {
    if let Some(e) = sel.event.as_deref().filter(|e| *e != "push") {
        return Err(Error::Usage(format!(
            "`kkpipe preview` previews a merge, which is a push: `--event {e}` does not apply (leave it out)"
        )));
    }
    let branch = sel.branch.clone().or_else(|| settings.ci_event().and_then(|e| e.branch)).ok_or_else(|| {
        Error::Usage(
            "`kkpipe preview` needs the branch the merge goes to: pass `--branch main` (in a pull request's CI job \
             it is the target branch)"
                .into(),
        )
    })?;
    Ok(Selection { event: Some("push".into()), branch: Some(branch), ..sel.clone() })
}

/// Every output named `*.tfplan` is a terraform plan. It is what the merge applies when a deploy stage that
/// needs it will run; it is summarised then if its stage is fresh (the plan on disk was made from the current
/// inputs, as the pull request's job just did), else said why not. When no such stage runs, the plan on disk is
/// one already applied, and the merge applies none.
fn plans(
    settings: &Settings,
    o: &Opened,
    rows: &[StageRow],
    stages: &[PreviewStage],
    mask: &dyn Fn(&str) -> String,
) -> Vec<PlanPreview> {
    let runs = |name: &str| {
        stages.iter().any(|s| s.name == name && matches!(s.on_merge, OnMerge::Deploys | OnMerge::IfUpstreamChanges))
    };
    let mut out = Vec::new();
    for stage in &o.pipeline.stages {
        let Some(row) = rows.iter().find(|r| r.name == stage.name) else { continue };
        let appliers: Vec<&StageRow> =
            rows.iter().filter(|r| r.kind == Kind::Deploy && r.needs.contains(&stage.name)).collect();
        let applied = appliers.iter().any(|r| runs(&r.name));
        for output in stage.plans() {
            let plan = output.path.display();
            let (summary, note) = match row.state {
                _ if !applied => {
                    let names: Vec<String> = appliers.iter().map(|r| format!("`{}`", r.name)).collect();
                    let note = format!("The merge applies no plan: {} stays as deployed.", names.join(", "));
                    (None, Some(note))
                }
                StageState::Fresh => match crate::tfplan::show(
                    &output.path.under(&o.pipeline.root),
                    &stage.dir.under(&o.pipeline.root),
                    Some(crate::run::exec::stage_env(stage, &settings.caller_env, &o.env)),
                ) {
                    Ok(s) => (Some(s), None),
                    Err(why) => (None, Some(mask(&why))),
                },
                StageState::Restored => (None, Some("the plan file is not in this workspace".to_string())),
                _ => (
                    None,
                    Some(format!(
                        "not planned from these inputs in this job (`{}` is {}): run the pull request's stages first",
                        stage.name,
                        row.state.word()
                    )),
                ),
            };
            let denied = match (&summary, &stage.plan_policy) {
                (Some(s), Some(policy)) => denied(settings, s, policy),
                _ => Vec::new(),
            };
            out.push(PlanPreview { stage: stage.name.clone(), plan, summary, denied, note });
        }
    }
    out
}

/// What the policy denies in a plan, each marked when `KKPIPE_ALLOW_DESTROY` here allows it for this run (a
/// label on the pull request): the merge's push needs the override again, so it is shown either way.
fn denied(settings: &Settings, s: &crate::tfplan::PlanSummary, policy: &crate::pipeline::PlanPolicy) -> Vec<Denied> {
    // pipeline.toml's patterns were checked when it loaded; a broken override allows nothing (plan-check refuses
    // it).
    let patterns = |p: &mut dyn Iterator<Item = &str>| {
        crate::tfplan::address_patterns(p).unwrap_or_else(|_| globset::GlobSet::empty())
    };
    let allowed = patterns(&mut policy.allow.iter().map(String::as_str));
    let env = settings.caller_env.get("KKPIPE_ALLOW_DESTROY").cloned().unwrap_or_default();
    let overridden = patterns(&mut env.split(','));
    s.denied(&policy.deny, &|a| allowed.is_match(a))
        .into_iter()
        .map(|(address, action)| Denied { overridden: overridden.is_match(&address), address, action })
        .collect()
}

/// With a shared remote, in a pull request's CI job, each plan summarised is stored as what was reviewed, under
/// its stage's content: the push after the merge checks the plan it applies against it (crate::remote::review).
/// The one thing a pull request's job writes; a store that refuses (read-only credentials) is a warning.
fn store_reviews(
    settings: &Settings,
    o: &Opened,
    evals: &[Option<crate::evaluate::Evaluation>],
    plans: &[PlanPreview],
    commit: Option<&str>,
) {
    let reviewed: Vec<(usize, &crate::tfplan::PlanSummary)> = plans
        .iter()
        .filter_map(|p| Some((o.pipeline.stages.iter().position(|s| s.name == p.stage)?, p.summary.as_ref()?)))
        // One review per plan stage: a stage with several plans is not reviewed as one.
        .filter(|(i, _)| o.pipeline.stages[*i].plans().count() == 1)
        .collect();
    // Only a pull request's job reviews (a preview made locally shows no reviewer anything), `--remote
    // read-only|off` writes nothing, and a pull request writes no ref of a `git:` store.
    let in_pull_request = settings.ci_event().is_some_and(|e| e.name == crate::pipeline::Trigger::PullRequest);
    if reviewed.is_empty() || !in_pull_request || o.remote_lower.is_some() {
        return;
    }
    let takes_reviews = |r: &crate::remote::Resolved| {
        let url = r.url.as_deref().and_then(|u| url::Url::parse(u).ok());
        url.as_ref().and_then(crate::store::scheme_of).is_some_and(|s| s.reviews)
    };
    let remote = match o.resolve_remote(settings) {
        Ok(r) if !takes_reviews(&r) => return,
        r => r.and_then(|r| o.open_remote(settings, r)),
    };
    let remote = match remote {
        Ok(Some(remote)) => remote,
        Ok(None) => return,
        Err(e) => return eprintln!("warning: the reviewed plans are not stored: {e}"),
    };
    for (i, summary) in reviewed {
        let Some(keyed) = evals.get(i).and_then(|e| e.as_ref()).and_then(|e| e.keyed.as_ref()) else { continue };
        let stage = &o.pipeline.stages[i].name;
        let review = crate::remote::review::Review::of(stage, commit.map(str::to_string), summary);
        if remote.put_review(&o.env, &keyed.manifest.content_key(), &review) {
            eprintln!("kkpipe: stored the reviewed plan of `{stage}` on the remote `{}`", remote.url);
        }
    }
    for w in remote.take_warnings() {
        eprintln!("warning: {w}");
    }
}
