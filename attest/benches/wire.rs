//! Criterion benches for the wire framing (placeholder while being written).
fn main() {}
