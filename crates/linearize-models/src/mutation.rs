//! Seeded input mutation for the readers' robustness tests (`tests/fuzz_*.rs` of each crate):
//! valid seed files are damaged the ways fuzzers damage them (bit flips, boundary integers
//! written over length and offset fields, cuts, repeats, splices), interleaved with random
//! bytes. A reader passes when every case gives `Ok` or `Err`: no panic, no abort, and no
//! allocation over [`CappedAlloc`]'s limit. Stable Rust, deterministic for a seed, bounded by a
//! case count and a time budget (`LINEARIZE_FUZZ_CASES`, `LINEARIZE_FUZZ_SECONDS`).
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Values that break length and offset arithmetic.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
];

/// A damaged copy of one of `seeds` (or, one case in eight, random bytes).
pub fn mutate(rng: &mut impl Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if seeds.is_empty() || rng.random_ratio(1, 8) {
        let len = rng.random_range(0..512);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut data = seeds[rng.random_range(0..seeds.len())].clone();
    for _ in 0..rng.random_range(1..=4) {
        let len = data.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = position(rng, len);
                data[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = position(rng, len);
                data[i] = rng.random();
            }
            2 if len >= 8 => {
                // A little-endian integer over a (likely) length or offset field.
                let i = position(rng, len - 7);
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                data[i..i + 8].copy_from_slice(&value.to_le_bytes());
            }
            3 if len > 0 => data.truncate(rng.random_range(0..len)),
            4 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = rng.random_range(start..=len.min(start + 64));
                let piece = data[start..end].to_vec();
                let at = rng.random_range(0..=len);
                data.splice(at..at, piece);
            }
            5 if len > 0 => {
                let start = rng.random_range(0..len);
                let end = rng.random_range(start..=len);
                data.drain(start..end);
            }
            6 => {
                // A piece of another seed: keeps the structure of valid files.
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let start = rng.random_range(0..other.len());
                    let end = rng.random_range(start..=other.len());
                    let at = rng.random_range(0..=len);
                    data.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ => {}
        }
    }
    data
}

/// A position in `0..len`, half the time in the first 1 KiB, where headers (and their lengths
/// and offsets) are.
fn position(rng: &mut impl Rng, len: usize) -> usize {
    if rng.random_bool(0.5) {
        rng.random_range(0..len.min(1024))
    } else {
        rng.random_range(0..len)
    }
}

/// Every file in `dir` (the seed corpus), in name order.
pub fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| e.expect("listing the seed corpus").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no seeds in {}", dir.display());
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// What a fuzzing run did.
#[derive(Debug)]
pub struct Summary {
    pub cases: u64,
    pub ok: u64,
    pub elapsed: Duration,
}

/// Runs `target` on mutated inputs until `default_cases` (or `LINEARIZE_FUZZ_CASES`) cases or
/// `LINEARIZE_FUZZ_SECONDS` have passed. A panic fails at once, naming the case and writing its
/// input to the temporary directory (reproduce with the same seed and case).
pub fn run(
    name: &str,
    seeds: &[Vec<u8>],
    default_cases: u64,
    mut target: impl FnMut(&[u8]) -> bool,
) -> Summary {
    let env = |key: &str| std::env::var(key).ok().and_then(|v| v.parse::<u64>().ok());
    let cases = env("LINEARIZE_FUZZ_CASES").unwrap_or(default_cases);
    let budget = env("LINEARIZE_FUZZ_SECONDS").map(Duration::from_secs);
    let seed = env("LINEARIZE_FUZZ_SEED").unwrap_or(0x5eed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let started = Instant::now();
    let mut summary = Summary {
        cases: 0,
        ok: 0,
        elapsed: Duration::ZERO,
    };
    // The seeds themselves first: they must be read without a panic too.
    let mut pending: Vec<Vec<u8>> = seeds.to_vec();
    loop {
        let done = match budget {
            Some(budget) => started.elapsed() >= budget,
            None => summary.cases >= cases,
        };
        if done {
            break;
        }
        let input = pending.pop().unwrap_or_else(|| mutate(&mut rng, seeds));
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(ok) => summary.ok += u64::from(ok),
            Err(_) => {
                let path = std::env::temp_dir().join(format!("fuzz-{name}-{}.bin", summary.cases));
                std::fs::write(&path, &input).unwrap();
                panic!(
                    "{name}: case {} (seed {seed}) panicked; its input is in {}",
                    summary.cases,
                    path.display()
                );
            }
        }
        summary.cases += 1;
    }
    summary.elapsed = started.elapsed();
    eprintln!(
        "fuzz {name}: {} cases ({} accepted) in {:.1} s without a finding",
        summary.cases,
        summary.ok,
        summary.elapsed.as_secs_f64()
    );
    summary
}

/// The system allocator, refusing any single allocation over 1 GiB: a reader that sizes a
/// buffer from a damaged header aborts the test instead of going unnoticed (or taking the
/// machine's memory). Install with `#[global_allocator]` in a fuzz test binary.
pub struct CappedAlloc;

/// The largest allocation a reader of our small seed inputs may make.
pub const ALLOCATION_CAP: usize = 1 << 30;

// SAFETY: defers to `System`, only refusing (null) requests over the cap, as an allocator may.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_CAP {
            report_large();
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOCATION_CAP {
            report_large();
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOCATION_CAP {
            report_large();
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
}

/// Says why the process is about to abort, without allocating.
fn report_large() {
    use std::io::Write;
    let _ = std::io::stderr()
        .write_all(b"fuzz: an allocation over 1 GiB was refused (a size taken from the input?)\n");
}
