fn main() {
    let code = nixstream::cli::run(std::env::args_os());
    std::process::exit(code as i32);
}
