fn main() -> std::process::ExitCode {
    kkpipe::main_entry()
}
