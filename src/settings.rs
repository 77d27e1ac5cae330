//! Flags + CI environment -> the settings the core sees. Nothing below this module reads the process
//! environment or the command line.

use crate::ci::{self, Provider};
use crate::cli::{Cli, ColorChoice, Selection};
use crate::error::Error;
use crate::graph::CiEvent;
use crate::pipeline::Trigger;
use crate::report::Style;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Where to start looking for pipeline.toml.
    pub start_dir: PathBuf,
    pub color: bool,
    pub quiet: bool,
    pub verbose: bool,
    pub provider: Option<Provider>,
    pub style: Style,
    pub caller_env: HashMap<String, String>,
    /// A person is watching a terminal (not CI, not piped, not quiet): live progress is shown.
    pub interactive: bool,
    /// A CI provider's variables, or `CI` set (and not "false").
    pub in_ci: bool,
}

impl Settings {
    pub(crate) fn from_cli(cli: &Cli) -> Settings {
        let caller_env: HashMap<String, String> =
            std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect();
        let provider = ci::detect(&|k| caller_env.get(k).cloned());
        let color = match cli.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                caller_env.get("NO_COLOR").is_none_or(|v| v.is_empty())
                    && caller_env.get("TERM").is_none_or(|t| t != "dumb")
                    && (std::io::stdout().is_terminal() || provider.is_some())
            }
        };
        let style = provider.map_or(Style::Plain, |p| p.conventions().style);
        // `CI` as the CI services set it (`true`); empty, `0` and `false` (any case) say "not CI".
        let ci_var = |v: &String| !matches!(v.trim().to_ascii_lowercase().as_str(), "" | "0" | "false");
        let in_ci = provider.is_some() || caller_env.get("CI").is_some_and(ci_var);
        let interactive = !in_ci && !cli.quiet && std::io::stderr().is_terminal();
        Settings {
            interactive,
            in_ci,
            start_dir: cli.dir.clone().unwrap_or_else(|| PathBuf::from(".")),
            color,
            quiet: cli.quiet,
            verbose: cli.verbose > 0,
            provider,
            style,
            caller_env,
        }
    }

    /// Whether a run that may deploy goes ahead: `--yes` or CI, else a question on a terminal, else no.
    pub(crate) fn consent(&self, yes: bool) -> crate::run::Consent {
        use crate::run::Consent;
        if yes || self.in_ci {
            Consent::Given
        } else if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
            Consent::Ask
        } else {
            Consent::Refused
        }
    }

    /// How long stages get to stop after a forwarded SIGINT/SIGTERM, or after kkpipe died, before SIGKILL:
    /// `KKPIPE_STOP_GRACE` seconds (fractions allowed), default 7: within GitHub Actions' 7.5 s between the
    /// SIGINT of a cancel and its SIGTERM, so kkpipe records the stop before the runner moves on.
    pub(crate) fn stop_grace(&self) -> Result<std::time::Duration, Error> {
        const VAR: &str = "KKPIPE_STOP_GRACE";
        let Some(text) = self.caller_env.get(VAR).filter(|t| !t.trim().is_empty()) else {
            return Ok(std::time::Duration::from_secs(7));
        };
        text.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && (0.0..=86_400.0).contains(s))
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| Error::Usage(format!("{VAR}=`{text}` is not a number of seconds (0 to 86400)")))
    }

    /// The event the CI's variables say, whatever the flags say.
    pub(crate) fn ci_event(&self) -> Option<CiEvent> {
        self.provider.and_then(|p| ci::event_from_env(p, &|k| self.caller_env.get(k).cloned()))
    }

    /// The event a command is for: explicit flags win over what the CI's variables say.
    pub(crate) fn event(&self, sel: &Selection) -> Result<Option<CiEvent>, Error> {
        let detected = self.ci_event();
        let event = match (&sel.event, detected) {
            (Some(text), detected) => {
                let name = Trigger::parse(text).ok_or_else(|| {
                    Error::Usage(format!("unknown event `{text}`; known events: {}", Trigger::known()))
                })?;
                // An explicit event keeps the CI's branch when the branch means the same for both: the branch the
                // job runs on for push, schedule and manual runs (a manual run given `--event push` is a push of
                // its branch, with the branch filter), the target branch for pull requests.
                let same_meaning = |e: &CiEvent| (e.name == Trigger::PullRequest) == (name == Trigger::PullRequest);
                let branch = sel.branch.clone().or_else(|| detected.filter(same_meaning).and_then(|e| e.branch));
                Some(CiEvent { name, branch })
            }
            (None, Some(mut e)) => {
                if let Some(b) = &sel.branch {
                    e.branch = Some(b.clone());
                }
                Some(e)
            }
            (None, None) => {
                if sel.branch.is_some() {
                    return Err(Error::Usage(
                        "`--branch` needs `--event` outside CI (for example `--event push --branch main`)".into(),
                    ));
                }
                None
            }
        };
        Ok(event)
    }
}
