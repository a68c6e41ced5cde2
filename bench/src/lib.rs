//! Benchmark helpers. The runner is `bench/run`; this crate only holds the slow upstream.
