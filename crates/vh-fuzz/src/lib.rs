//! A coverage-less mutation fuzzer for valuehead's parsers, on the stable toolchain.
//!
//! The library holds what the `vh-fuzz` binary and the regression tests share: the targets
//! (what each feeds its input to), the mutators and the seeded random number generator. The
//! binary adds the engine: worker processes, crash and hang detection, the corpus. See
//! docs/fuzzing.md.

pub mod mutate;
pub mod pickle;
pub mod rng;
pub mod targets;
pub mod zipfmt;

pub use rng::Rng;
pub use targets::{FuzzError, Target, TargetKind};
