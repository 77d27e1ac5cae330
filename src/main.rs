// Many small allocations (one path per file) dominate a no-op check of a large tree: mimalloc makes them cheap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(kkpipe::main_entry())
}
