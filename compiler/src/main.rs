//! The `modelc` binary; everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    modelc::cli::main()
}
