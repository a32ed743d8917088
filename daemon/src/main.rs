//! molecule-credd: placeholder while the daemon is written.
fn main() {}
