fn main() -> std::process::ExitCode {
    // The stage watchdog (src/run/watchdog.rs) is this binary with one hidden argument, checked before clap:
    // it is no subcommand, so it never shows in `--help` or completions.
    if std::env::args_os().nth(1).is_some_and(|a| a == kkpipe::run::watchdog::ARG) {
        return kkpipe::run::watchdog::serve();
    }
    std::process::ExitCode::from(kkpipe::main_entry())
}
