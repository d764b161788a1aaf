//! hostbind-benches: criterion benches (benches/) and the `hostbind-loadgen` load generator
//! (src/bin/loadgen.rs). See docs/benchmarks.md for the commands and the numbers.
