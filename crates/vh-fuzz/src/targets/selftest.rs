//! Target `selftest` (not part of `--all`): inputs that panic, abort, overflow the stack,
//! allocate without bound or hang on purpose, so that tests can check that the engine catches
//! each kind of failure and keeps the input that caused it.

use super::Target;

/// The `selftest` target.
pub struct SelfTestTarget;

// Endless on purpose: the stack overflow is what this input tests.
#[allow(unconditional_recursion)]
#[inline(never)]
fn recurse(depth: u64, buf: &mut [u8; 1024]) -> u64 {
    buf[depth as usize % 1024] = depth as u8;
    let mut local = [0u8; 1024];
    local[0] = buf[0];
    // `black_box` keeps the recursion (and its frames) from being optimised away.
    std::hint::black_box(recurse(depth + 1, std::hint::black_box(&mut local))) + 1
}

impl Target for SelfTestTarget {
    fn execute(&mut self, input: &[u8]) -> Vec<String> {
        match input {
            b"panic" => panic!("selftest panic"),
            b"abort" => std::process::abort(),
            b"stack" => vec![recurse(0, &mut [0; 1024]).to_string()],
            b"oom" => {
                // Grows until the address-space cap refuses: the allocator then aborts.
                let mut blocks: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 256 << 20];
                    block[0] = 1;
                    blocks.push(std::hint::black_box(block));
                }
            }
            b"hang" => loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            other => vec![format!("ok:{}", other.len().min(3))],
        }
    }
}
