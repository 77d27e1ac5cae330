fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(kkpipe::main_entry())
}
