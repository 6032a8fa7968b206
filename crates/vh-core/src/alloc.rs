//! Process-wide allocator settings for libtorch's CPU tensors.
//!
//! libtorch allocates CPU tensors with the C library's `posix_memalign`. With glibc's defaults
//! the heap's free top is handed back to the kernel once it exceeds a threshold of a few tens of
//! MB, so a forward whose temporaries swing by more than that (every GPT-2-small MLP at b8x128
//! does) returns pages after one layer and faults them in again, zero-filled, for the next. On
//! the 2-core CPU this cost about a tenth of a scoring pass. PyTorch's own tuning guide answers
//! the same problem with jemalloc or tcmalloc; raising glibc's thresholds does it without
//! another allocator. Process-wide settings are the application's choice, so nothing here runs
//! unless called: our binaries (`vh`, the examples, the bench workers) call it at start.

/// What [`keep_freed_tensor_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    /// glibc's thresholds were raised to these values (bytes).
    Applied {
        /// `M_TRIM_THRESHOLD`: free memory at the heap's top kept up to this size.
        trim_threshold: usize,
        /// `M_MMAP_THRESHOLD`: allocations from this size on get their own mapping.
        mmap_threshold: usize,
    },
    /// The environment already sets glibc's malloc thresholds (`MALLOC_TRIM_THRESHOLD_`,
    /// `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`): the user's choice stands.
    LeftToEnvironment,
    /// Not glibc (or a call was refused): nothing changed.
    Unsupported,
}

/// glibc's environment variables for the same thresholds; any of them set means the user chose.
pub const MALLOC_VARIABLES: [&str; 3] = ["MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_"];
/// The trim threshold set: freed memory at the heap's top kept up to 256 MB.
pub const TRIM_THRESHOLD: usize = 256 << 20;
/// The mmap threshold set: 32 MB, the largest glibc accepts on 64-bit targets.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Keeps up to 256 MB of freed heap memory for reuse instead of returning it to the kernel after
/// every large free, and serves allocations below 32 MB (glibc's largest mmap threshold on 64-bit
/// targets) from the heap. glibc only; elsewhere a no-op. Call once at the start of a program,
/// before loading models.
pub fn keep_freed_tensor_memory() -> AllocatorTuning {
    if environment_sets_thresholds() {
        return AllocatorTuning::LeftToEnvironment;
    }
    set_thresholds(TRIM_THRESHOLD, MMAP_THRESHOLD)
}

fn environment_sets_thresholds() -> bool {
    MALLOC_VARIABLES.iter().any(|k| std::env::var_os(k).is_some())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_thresholds(trim: usize, mmap: usize) -> AllocatorTuning {
    // SAFETY: mallopt only adjusts the allocator's parameters, which is safe at any time.
    let trim_ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, trim as libc::c_int) } == 1;
    let mmap_ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, mmap as libc::c_int) } == 1;
    if trim_ok && mmap_ok {
        AllocatorTuning::Applied {
            trim_threshold: trim,
            mmap_threshold: mmap,
        }
    } else {
        AllocatorTuning::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds(_trim: usize, _mmap: usize) -> AllocatorTuning {
    AllocatorTuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_applied_on_glibc_unless_the_environment_sets_them() {
        let env_set = environment_sets_thresholds();
        let got = keep_freed_tensor_memory();
        if env_set {
            assert_eq!(got, AllocatorTuning::LeftToEnvironment);
        } else if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(
                got,
                AllocatorTuning::Applied {
                    trim_threshold: TRIM_THRESHOLD,
                    mmap_threshold: MMAP_THRESHOLD
                }
            );
            // Allocations still work and are served after the change.
            let v = vec![1u8; 48 << 20];
            assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 48 << 20);
        } else {
            assert_eq!(got, AllocatorTuning::Unsupported);
        }
    }
}
