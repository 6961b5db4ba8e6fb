//! Rebuilds the crate when any file under `assets/` changes, is added or is removed (the
//! embedding macro only tracks the files it saw).

fn main() {
    println!("cargo:rerun-if-changed=assets");
}
