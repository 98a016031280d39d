//! The simulator's random numbers: xoshiro256** seeded through SplitMix64
//! (Blackman and Vigna). Written out here rather than taken from `rand`'s
//! `StdRng`/`SmallRng`, whose algorithms may change between releases: a
//! seed must give the same trace and the same figures in every build.

/// A seeded xoshiro256** generator (implements `rand::RngCore`, so
/// `rand_distr` distributions sample from it).
#[derive(Debug, Clone)]
pub struct SimRng {
    /// The 256-bit state.
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SimRng {
    /// The generator for `stream` (one per purpose: arrivals, each stage's
    /// service times, trace noise) under `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut x = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Self {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    fn step(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.step() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Exponential with mean 1.
    pub fn exp1(&mut self) -> f64 {
        -(1.0 - self.unit()).ln()
    }
}

impl rand::RngCore for SimRng {
    fn next_u32(&mut self) -> u32 {
        (self.step() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.step()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let bytes = self.step().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_is_pinned() {
        // Changing the generator changes every published figure: this test
        // says so.
        let mut r = SimRng::new(1, 0);
        let first: Vec<u64> = (0..3).map(|_| r.step()).collect();
        let mut again = SimRng::new(1, 0);
        assert_eq!(first, (0..3).map(|_| again.step()).collect::<Vec<_>>());
        assert_ne!(SimRng::new(1, 1).step(), first[0]);
        assert_eq!(first[0], PINNED);
        let u = SimRng::new(7, 3).unit();
        assert!((0.0..1.0).contains(&u));
    }

    const PINNED: u64 = 12_966_619_160_104_079_557;
}
