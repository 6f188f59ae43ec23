//! The workspace's one pseudo-random generator (SplitMix64): the seeded sampling of the
//! generation engine, and the data of every test that makes its own. Deterministic and
//! dependency-free, so a seed names the same numbers on every machine.

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit counter passed through a mixing
/// function.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

/// The counter's step (2^64 / the golden ratio).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl SplitMix64 {
    /// A generator whose counter starts at `state`.
    pub fn new(state: u64) -> SplitMix64 {
        SplitMix64(state)
    }

    /// A generator for a user's seed: the counter starts at `seed` mixed with the step, so
    /// that small seeds (0, 1, 2) do not start at the bottom of the counter.
    pub fn seeded(seed: u64) -> SplitMix64 {
        SplitMix64(seed ^ GOLDEN)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn gauss(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is below 2^-40 for any `n` a test uses).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference sequence for state 0 (the published SplitMix64 test vector).
    #[test]
    fn matches_the_reference_sequence() {
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let u = SplitMix64::seeded(7).unit();
        assert!((0.0..1.0).contains(&u));
    }
}
