//! Live progress on a terminal (indicatif): hashing a large tree, and which stages are running. Never in CI
//! or when output is not a terminal, where plain lines are printed instead.

use indicatif::{ProgressBar, ProgressStyle};
use std::time::Duration;

/// A spinner showing files and bytes hashed so far; cleared when dropped.
pub(crate) struct HashProgress(Option<ProgressBar>);

impl HashProgress {
    /// `counts`: files seen and bytes read so far.
    pub(crate) fn start(
        enabled: bool,
        what: &'static str,
        counts: impl Fn() -> (u64, u64) + Clone + Send + Sync + 'static,
    ) -> HashProgress {
        if !enabled {
            return HashProgress(None);
        }
        let style = ProgressStyle::with_template("{spinner} {prefix}: {counts} ({elapsed})")
            .expect("valid template")
            .with_key("counts", move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let (files, bytes) = counts();
                let _ = write!(w, "{files} files, {:.1} MB read", bytes as f64 / 1e6);
            });
        let bar = ProgressBar::new_spinner().with_style(style).with_prefix(what);
        bar.enable_steady_tick(Duration::from_millis(100));
        HashProgress(Some(bar))
    }
}

impl Drop for HashProgress {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

/// The "running: a (3s), b (1s)" line under streaming stage output.
pub(crate) fn running_bar() -> ProgressBar {
    let bar =
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}
