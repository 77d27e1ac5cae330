//! Human output: cargo-style status lines, stage output prefixed by the stage name, and the provider's
//! conventions in CI (GitHub `::group::` and `::error::`, GitLab collapsible sections).

use super::{Event, Sink, StageEnd, StageRow, Summary, format_duration};
use std::collections::HashMap;
use std::io::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Style {
    /// Lines stream as they come, prefixed with the stage name.
    Plain,
    /// A stage's output streams into a `::group::` as it is written; failures become `::error::`.
    Github,
    /// A stage's output streams into a collapsed section as it is written.
    Gitlab,
}

pub(crate) struct Human {
    pub color: bool,
    pub style: Style,
    pub quiet: bool,
    pub verbose: bool,
    /// Write to stderr (when stdout carries JSON).
    pub to_stderr: bool,
    /// CI styles: the stage whose group (section) is open, its output streaming into it, with the token that
    /// pauses GitHub's workflow commands. Only one group can be open: a stage that starts beside it closes
    /// it, and from then on the output of every running stage streams prefixed, as in the plain style.
    group: Option<(String, String)>,
    /// The stages running now, in the order they started.
    running: Vec<String>,
    /// The last lines of each running stage, shown again under a failure.
    tails: HashMap<String, std::collections::VecDeque<Vec<u8>>>,
    /// Stages whose failure is retried (`retry_needs_if`): no `::error` annotation, the run may still pass.
    retrying: std::collections::HashSet<String>,
    width: usize,
    /// The live "running: ..." line, on a terminal only.
    live: Option<indicatif::ProgressBar>,
    /// GitHub Actions: `$GITHUB_STEP_SUMMARY`, where a markdown table of the run is appended, and its title.
    step_summary: Option<(std::path::PathBuf, String)>,
    /// `run --dry-run`: the summary says what would run.
    pub dry_run: bool,
    /// `run --dry-run`: of the stages that would run, those that run only if a stage they need changes its
    /// outputs (early cutoff may leave them fresh).
    would_run_maybe: usize,
}

/// A token no stage output can guess, to pause GitHub's workflow commands.
fn stop_token() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

const GREEN: &str = "\x1b[1;32m";
const YELLOW: &str = "\x1b[1;33m";
const RED: &str = "\x1b[1;31m";
const CYAN: &str = "\x1b[1;36m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Human {
    pub(crate) fn new(
        color: bool,
        style: Style,
        quiet: bool,
        verbose: bool,
        to_stderr: bool,
        stage_names: &[String],
    ) -> Human {
        let width = stage_names.iter().map(|s| s.len()).max().unwrap_or(8);
        Human {
            color,
            style,
            quiet,
            verbose,
            to_stderr,
            group: None,
            running: Vec::new(),
            tails: HashMap::new(),
            retrying: Default::default(),
            width,
            live: None,
            step_summary: None,
            dry_run: false,
            would_run_maybe: 0,
        }
    }

    /// Append a markdown summary of the run to this file when it finishes (GitHub's job summary).
    pub(crate) fn with_step_summary(mut self, file: Option<std::path::PathBuf>, title: String) -> Human {
        self.step_summary = file.map(|f| (f, title));
        self
    }

    /// Show which stages are running on a line that stays under the output (terminals only).
    pub(crate) fn with_live_progress(mut self, enabled: bool) -> Human {
        if enabled && self.style == Style::Plain && !self.quiet {
            self.live = Some(super::progress::running_bar());
        }
        self
    }

    fn write(&self, bytes: &[u8]) {
        // Ignore EPIPE and friends: a closed pager must not fail the pipeline.
        let out = || {
            if self.to_stderr {
                let _ = std::io::stderr().lock().write_all(bytes);
            } else {
                let _ = std::io::stdout().lock().write_all(bytes);
            }
        };
        match &self.live {
            Some(bar) => bar.suspend(out),
            None => out(),
        }
    }

    fn paint(&self, color: &str, text: &str) -> String {
        if self.color { format!("{color}{text}{RESET}") } else { text.to_string() }
    }

    /// `   Running terraform-plan: reason`: a right-aligned verb, like cargo.
    fn status(&self, verb: &str, color: &str, rest: &str) {
        let line = format!("{} {rest}\n", self.paint(color, &format!("{verb:>9}")));
        self.write(line.as_bytes());
    }

    fn prefixed(&self, stage: &str, line: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(line.len() + self.width + 4);
        let prefix = format!("{stage:<w$} | ", w = self.width);
        out.extend_from_slice(self.paint(DIM, &prefix).as_bytes());
        out.extend_from_slice(line);
        out.push(b'\n');
        out
    }

    /// Open the group (GitHub) or section (GitLab) that `stage`'s output streams into.
    fn open_group(&mut self, stage: &str, header: &str) {
        let token = stop_token();
        let start = match self.style {
            // A stage's output is data, never workflow commands: a line it prints (a file name a pull request
            // chose, with a newline in it) must not set outputs, mask or annotate. GitHub ignores commands
            // between `::stop-commands::TOKEN` and `::TOKEN::`; the token is random, so the output cannot end
            // the pause itself.
            Style::Github => format!("::group::{header}\n::stop-commands::{token}\n"),
            Style::Gitlab => {
                let ts = jiff::Timestamp::now().as_second();
                format!("\x1b[0Ksection_start:{ts}:{}[collapsed=true]\r\x1b[0K{header}\n", section_id(stage))
            }
            Style::Plain => return,
        };
        self.write(start.as_bytes());
        self.group = Some((stage.to_string(), token));
    }

    fn close_group(&mut self) {
        let Some((stage, token)) = self.group.take() else { return };
        let end = match self.style {
            Style::Github => format!("::{token}::\n::endgroup::\n"),
            Style::Gitlab => {
                let ts = jiff::Timestamp::now().as_second();
                format!("\x1b[0Ksection_end:{ts}:{}\r\x1b[0K\n", section_id(&stage))
            }
            Style::Plain => return,
        };
        self.write(end.as_bytes());
    }

    /// A CI log ends a line at a carriage return too: one inside a stage's line would start a new line there,
    /// out of reach of the prefix (and of the pause, once printed outside a group), where it could be a
    /// workflow command. In CI it is shown as a space (a terminal would overwrite).
    fn one_line<'a>(&self, line: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        if self.style == Style::Plain || !line.contains(&b'\r') {
            return std::borrow::Cow::Borrowed(line);
        }
        std::borrow::Cow::Owned(line.iter().map(|&b| if b == b'\r' { b' ' } else { b }).collect())
    }

    /// CI styles stream into a group only while one stage runs (groups cannot interleave).
    fn streams_grouped(&self) -> bool {
        self.style != Style::Plain && !self.quiet
    }
}

fn section_id(stage: &str) -> String {
    format!("kkpipe_{}", stage.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

/// How many of a stage's last lines a failure shows again under its status line (CI styles).
const TAIL: usize = 20;

impl Sink for Human {
    fn event(&mut self, e: &Event) {
        match e {
            Event::Warning { message } => self.warning(message),
            Event::Notice(n) => {
                if let super::Notice::Retrying { stage, .. } = n {
                    self.retrying.insert(stage.clone());
                }
                if !self.quiet {
                    self.write(format!("{n}\n").as_bytes());
                }
            }
            Event::Fresh { stage, restored, .. } => self.fresh(stage, restored),
            Event::Started { stage, reason } => self.started(stage, reason),
            Event::Probing { stage } => {
                if self.verbose {
                    self.status("Verifying", CYAN, stage);
                }
            }
            Event::Line { stage, line } => self.line(stage, line),
            Event::Finished { stage, end, duration, log } => self.finished(stage, end, *duration, log),
            Event::Skipped { stage, because } => {
                if !self.quiet {
                    self.status("Skipped", YELLOW, &format!("{stage}: {because}"));
                }
            }
            Event::WouldRun { stage, masked, reason } => {
                self.would_run_maybe += usize::from(matches!(reason, crate::fresh::Reason::UpstreamStale { .. }));
                self.status("Would run", YELLOW, &format!("{stage}: {masked}"))
            }
            Event::Drift { stage, output, resources } => self.drift(stage, output, resources),
            Event::Summary(s) => self.summary(s),
            Event::Report { stages, summary } => self.report(stages, summary),
        }
    }

    fn tick(&mut self, running: &[(String, std::time::Duration)]) {
        if let Some(bar) = &self.live {
            if running.is_empty() {
                bar.set_message("");
            } else {
                let list: Vec<String> = running.iter().map(|(n, d)| format!("{n} ({})", format_duration(*d))).collect();
                bar.set_message(format!("running: {}", list.join(", ")));
            }
        }
    }
}

impl Human {
    /// A warning goes to stderr whatever the output stream, above the live line.
    fn warning(&self, w: &str) {
        let line = format!("{} {w}\n", self.paint(YELLOW, "warning:"));
        let write = || {
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        };
        match &self.live {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    /// `Fresh stage`, or `Restored` with the outputs that were brought back from the cache.
    fn fresh(&self, stage: &str, restored: &[String]) {
        if self.quiet {
            return;
        }
        if restored.is_empty() {
            self.status("Fresh", GREEN, stage);
        } else {
            let list = restored.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ");
            self.status("Restored", GREEN, &format!("{stage} (fresh; outputs restored: {list})"));
        }
    }

    /// `Running stage: reason`; in CI, its group opens now unless another stage is running, in which case
    /// the open group closes and both stream prefixed.
    fn started(&mut self, stage: &str, reason: &crate::fresh::Reason) {
        self.running.push(stage.to_string());
        self.tails.insert(stage.to_string(), Default::default());
        if self.streams_grouped()
            && self.running.len() > 1
            && let Some((other, _)) = self.group.clone()
        {
            let note = format!("(`{other}` goes on below, its lines prefixed: `{stage}` runs beside it)");
            let l = self.prefixed(&other, note.as_bytes());
            self.write(&l);
            self.close_group();
        }
        if !self.quiet {
            self.status("Running", CYAN, &format!("{stage}: {reason}"));
        }
        if self.streams_grouped() && self.running.len() == 1 {
            self.open_group(stage, &format!("{stage}: {reason}"));
        }
    }

    /// A line of stage output, as it comes: into the open group, else prefixed with the stage's name. Tools
    /// colour their output whatever it is written to (terraform does): without colour, it is taken out.
    fn line(&mut self, stage: &str, line: &[u8]) {
        let plain;
        let line = if self.color {
            line
        } else {
            plain = anstream::adapter::strip_bytes(line).into_vec();
            &plain
        };
        let line = &*self.one_line(line);
        if let Some(tail) = self.tails.get_mut(stage) {
            if tail.len() == TAIL {
                tail.pop_front();
            }
            tail.push_back(line.to_vec());
        }
        if self.quiet {
            return;
        }
        if self.group.as_ref().is_some_and(|(g, _)| g == stage) {
            let mut l = line.to_vec();
            l.push(b'\n');
            self.write(&l);
        } else {
            let l = self.prefixed(stage, line);
            self.write(&l);
        }
    }

    /// A stage's end: its group closed (and a failure's last lines, or, quiet, its log), then `Ok`, `Failed` or
    /// `Stopped`.
    fn finished(&mut self, stage: &str, end: &StageEnd, duration: std::time::Duration, log: &[u8]) {
        let d = format_duration(duration);
        let ok = matches!(end, StageEnd::Ok | StageEnd::Adopted);
        let header = match end {
            StageEnd::Ok => format!("{stage} ({d})"),
            StageEnd::Adopted => format!("{stage}: already in sync, recorded as deployed ({d})"),
            StageEnd::Failed { detail } => format!("{stage} failed: {detail} ({d})"),
            StageEnd::Interrupted => format!("{stage} was interrupted ({d})"),
            StageEnd::NotStarted { detail } => format!("{stage} not started: {detail}"),
        };
        self.running.retain(|s| s != stage);
        let tail = self.tails.remove(stage).unwrap_or_default();
        if self.group.as_ref().is_some_and(|(g, _)| g == stage) {
            self.close_group();
        }
        if self.quiet && !ok {
            // Quiet mode hides output as it streams; show a failing stage's log when it fails.
            for l in log.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let l = self.prefixed(stage, &self.one_line(l));
                self.write(&l);
            }
        } else if self.streams_grouped() && !ok && !tail.is_empty() {
            // Its group is collapsed (or long): the lines that say why, again under it.
            for l in &tail {
                let l = self.prefixed(stage, l);
                self.write(&l);
            }
        }
        match end {
            StageEnd::Ok if !self.quiet => self.status("Ok", GREEN, &format!("{stage} ({d})")),
            StageEnd::Ok => {}
            StageEnd::Adopted => self.status("Adopted", GREEN, &header),
            StageEnd::Interrupted => self.status("Stopped", YELLOW, &header),
            StageEnd::Failed { .. } if self.retrying.remove(stage) => self.status("Failed", YELLOW, &header),
            StageEnd::Failed { .. } | StageEnd::NotStarted { .. } => {
                self.status("Failed", RED, &header);
                if self.style == Style::Github {
                    // Workflow commands are paused inside another stage's open group: close it (that stage goes
                    // on prefixed) so the annotation counts.
                    self.close_group();
                    self.write(format!("::error title=kkpipe::{header}\n").as_bytes());
                }
            }
        }
    }

    /// `Drift` and the first lines of what verify printed.
    fn drift(&self, stage: &str, output: &str, resources: &[crate::tfplan::TextChange]) {
        match resources {
            [] => self.status("Drift", RED, &format!("{stage}: drift detected by verify")),
            r => {
                let named = crate::tfplan::name_changes(r, 0, 10, &|a| format!("`{a}`"));
                let named = crate::relpath::escape_controls(&named);
                self.status("Drift", RED, &format!("{stage}: drift detected by verify: {named}"))
            }
        }
        for l in output.lines().filter(|l| !l.trim().is_empty()).take(20) {
            let l = self.prefixed(stage, &self.one_line(l.as_bytes()));
            self.write(&l);
        }
    }

    /// The closing line, once the live line is gone: what would run (dry run), or the totals.
    fn summary(&mut self, s: &Summary) {
        if let Some(bar) = self.live.take() {
            bar.finish_and_clear();
        }
        let line = if s.would_run > 0 || self.dry_run {
            format!("{}\n", super::status::dry_run_line(s, self.would_run_maybe))
        } else {
            summary_line(s, self.color)
        };
        self.write(line.as_bytes())
    }

    fn report(&mut self, rows: &[StageRow], summary: &Summary) {
        if let Some(bar) = self.live.take() {
            bar.finish_and_clear();
        }
        if let Some((file, title)) = &self.step_summary {
            let md = markdown_summary(title, rows, summary);
            let appended = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(file)
                .and_then(|mut f| f.write_all(md.as_bytes()));
            if let Err(e) = appended {
                let _ = writeln!(std::io::stderr(), "warning: cannot write the job summary `{}`: {e}", file.display());
            }
        }
    }
}

/// The job summary: one row per stage (ran / fresh / restored / failed, duration, why) and the totals.
pub(super) fn markdown_summary(title: &str, rows: &[StageRow], s: &Summary) -> String {
    use std::fmt::Write as _;
    let mut t = format!("### kkpipe: {title}\n\n| stage | result | duration | why |\n|---|---|---:|---|\n");
    for r in rows {
        let icon = match r.state {
            super::StageState::Ran => "🔄",
            super::StageState::Fresh | super::StageState::Restored | super::StageState::Adopted => "✅",
            super::StageState::Failed | super::StageState::Interrupted | super::StageState::Drifted => "❌",
            _ => "⏭️",
        };
        let dur = r
            .duration_ms
            .map(|d| format_duration(std::time::Duration::from_millis(d.max(0) as u64)))
            .unwrap_or_default();
        let dur = match r.state {
            super::StageState::Fresh | super::StageState::Restored if !dur.is_empty() => format!("{dur} saved"),
            _ => dur,
        };
        let why = match (r.reasons.first(), &r.note) {
            // Why it ran, and how it failed.
            (Some(reason), Some(note)) if r.state == super::StageState::Failed => format!("{reason}; {note}"),
            (Some(reason), _) => reason.to_string(),
            (None, Some(note)) => note.clone(),
            (None, None) if r.state == super::StageState::SkippedByEvent => {
                "not selected by this event (on a pull request, the preview says what the merge runs)".into()
            }
            (None, None) if !r.restored.is_empty() => format!("outputs restored: {}", r.restored.join(", ")),
            _ => String::new(),
        };
        // One row each: a reason or note of several lines (a hint) is one line here.
        let why = why.replace('|', "\\|").replace(['\n', '\r'], " ");
        let _ = writeln!(t, "| `{}` | {icon} {} | {dur} | {why} |", r.name, r.state.word());
    }
    // Every row is counted: those the event does not select too.
    let unselected = rows.iter().filter(|r| r.state == super::StageState::SkippedByEvent).count();
    let unselected = if unselected > 0 { format!(", {unselected} not selected by this event") } else { String::new() };
    let _ = writeln!(
        t,
        "\n**{} ran, {}, {} failed, {} skipped{unselected}** in {}; skipping saved ~{}.\n",
        s.ran,
        fresh_text(s),
        s.failed,
        s.skipped,
        format_duration(std::time::Duration::from_millis(s.duration_ms)),
        format_duration(std::time::Duration::from_millis(s.saved_ms))
    );
    let _ = writeln!(t, "```mermaid\n{}```\n", super::graph::mermaid(rows));
    t
}

/// "9 fresh (1 restored, 2 adopted)": restored and adopted stages are fresh too.
fn fresh_text(s: &Summary) -> String {
    let notes: Vec<String> = [(s.restored, "restored"), (s.adopted, "adopted")]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
    let fresh = s.fresh + s.restored + s.adopted;
    match notes.is_empty() {
        true => format!("{fresh} fresh"),
        false => format!("{fresh} fresh ({})", notes.join(", ")),
    }
}

fn summary_line(s: &Summary, color: bool) -> String {
    let mut parts = Vec::new();
    if s.verified > 0 || s.drifted > 0 {
        parts.push(format!("{} in sync", s.verified));
        match s.drift_applied {
            0 => parts.push(format!("{} drifted", s.drifted)),
            n => parts.push(format!("{} drifted ({n} deployed again)", s.drifted)),
        }
    }
    if s.would_run > 0 {
        parts.push(format!("{} would run", s.would_run));
    }
    parts.push(format!("{} ran", s.ran));
    parts.push(fresh_text(s));
    if s.failed > 0 {
        parts.push(format!("{} failed", s.failed));
    }
    if s.skipped > 0 {
        parts.push(format!("{} skipped", s.skipped));
    }
    if s.interrupted > 0 {
        parts.push(format!("{} interrupted", s.interrupted));
    }
    let saved = if s.saved_ms > 0 {
        format!("; skipping saved ~{}", format_duration(std::time::Duration::from_millis(s.saved_ms)))
    } else {
        String::new()
    };
    let bad = s.failed > 0 || s.interrupted > 0 || s.drifted > s.drift_applied;
    let verb = if bad { "Failed" } else { "Finished" };
    let verb = if color { format!("{}{verb:>9}{RESET}", if bad { RED } else { GREEN }) } else { format!("{verb:>9}") };
    format!(
        "{verb} {} in {}{saved}\n",
        parts.join(", "),
        format_duration(std::time::Duration::from_millis(s.duration_ms))
    )
}
