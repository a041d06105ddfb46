//! Progress of long offline jobs (answer generation, feature extraction,
//! training): a bar on a terminal, a line per tenth in logs.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on a terminal; otherwise (logs, CI) a line per tenth.
pub fn bar(len: usize, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        let bar = ProgressBar::hidden();
        bar.set_length(len as u64);
        bar.set_prefix(what.to_string());
        return bar;
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// Advances `bar`; when it is hidden, prints a line at each tenth.
pub fn tick(bar: &ProgressBar, n: u64) {
    let len = bar.length().unwrap_or(1).max(1);
    let before = bar.position() * 10 / len;
    bar.inc(n);
    if bar.is_hidden() && bar.position() * 10 / len > before {
        eprintln!(
            "{}: {}/{len} ({:.0} s) {}",
            bar.prefix(),
            bar.position(),
            bar.elapsed().as_secs_f64(),
            bar.message()
        );
    }
}
