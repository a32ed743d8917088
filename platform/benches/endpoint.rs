//! Endpoint benchmark (placeholder until written).
fn main() {}
