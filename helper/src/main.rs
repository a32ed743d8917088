//! credd: placeholder while the helper is written.
fn main() {}
