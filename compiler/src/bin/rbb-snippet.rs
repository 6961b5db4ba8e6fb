//! `rbb-snippet`: the snippet runner as a program of its own (the compiler's tests use it;
//! `rbb` runs the same code as `rbb snippet-runner`).

fn main() {
    std::process::exit(rbb_compiler::runner::main(std::env::args().skip(1)));
}
