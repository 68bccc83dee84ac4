//! numpy's default random generator, only as far as seeded permutations need it: `SeedSequence`
//! entropy mixing, the PCG64 (XSL-RR 128/64) bit generator and `Generator.permutation`.
//! `datasets.Dataset.shuffle(seed=...)`, which TRL's `shuffle_dataset` calls, draws its order from
//! `np.random.default_rng(seed).permutation(n)`; reproducing it keeps nibble's row order equal to
//! TRL's. Checked against numpy in the golden tests.

/// 32-bit constants of numpy's `SeedSequence` hash (`numpy/random/bit_generator.pyx`).
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;

/// PCG's default 128-bit LCG multiplier.
const PCG_MULT: u128 = 0x2360_ed05_1fc6_5da4_4385_df64_9fcc_f645;

/// Little-endian 32-bit words of each integer (`0` is one zero word), concatenated, as
/// `SeedSequence` reads a seed or a list of seeds.
fn entropy_words(entropy: &[u64]) -> Vec<u32> {
    let mut words = Vec::new();
    for &e in entropy {
        if e == 0 {
            words.push(0);
        }
        let mut n = e;
        while n > 0 {
            words.push(n as u32);
            n >>= 32;
        }
    }
    words
}

/// `SeedSequence(entropy).generate_state(n_words, np.uint32)`.
fn seed_sequence_state(entropy: &[u64], n_words: usize) -> Vec<u32> {
    let words = entropy_words(entropy);
    let mut hash_const = INIT_A;
    let mut hashmix = |value: u32| {
        let mut v = value ^ hash_const;
        hash_const = hash_const.wrapping_mul(MULT_A);
        v = v.wrapping_mul(hash_const);
        v ^ (v >> XSHIFT)
    };
    let mix = |x: u32, y: u32| {
        let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
        r ^ (r >> XSHIFT)
    };
    let mut pool = [0u32; POOL_SIZE];
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(words.get(i).copied().unwrap_or(0));
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                let h = hashmix(pool[src]);
                pool[dst] = mix(pool[dst], h);
            }
        }
    }
    for &w in words.iter().skip(POOL_SIZE) {
        for p in pool.iter_mut() {
            let h = hashmix(w);
            *p = mix(*p, h);
        }
    }
    let mut hash_const = INIT_B;
    (0..n_words)
        .map(|i| {
            let mut v = pool[i % POOL_SIZE] ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_B);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> XSHIFT)
        })
        .collect()
}

/// numpy's `PCG64` bit generator, with its buffered 32-bit draws.
#[derive(Debug, Clone)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    spare: Option<u32>,
}

impl Pcg64 {
    /// `np.random.PCG64(SeedSequence(entropy))`: `entropy` is one seed or a list of them.
    pub fn new(entropy: &[u64]) -> Self {
        let s = seed_sequence_state(entropy, 8);
        let w = |i: usize| u64::from(s[i]) | (u64::from(s[i + 1]) << 32);
        let initstate = (u128::from(w(0)) << 64) | u128::from(w(2));
        let initseq = (u128::from(w(4)) << 64) | u128::from(w(6));
        let mut rng = Pcg64 { state: 0, inc: (initseq << 1) | 1, spare: None };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        (((s >> 64) as u64) ^ (s as u64)).rotate_right((s >> 122) as u32)
    }

    /// The next 32-bit output: the halves of a 64-bit one, low half first.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let n = self.next_u64();
        self.spare = Some((n >> 32) as u32);
        n as u32
    }

    /// A uniform integer in `0..=max` by masked rejection (numpy's `random_interval`).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        loop {
            let v = if max <= u64::from(u32::MAX) {
                u64::from(self.next_u32()) & mask
            } else {
                self.next_u64() & mask
            };
            if v <= max {
                return v;
            }
        }
    }
}

/// `np.random.default_rng(entropy).permutation(n)`.
pub fn permutation(entropy: &[u64], n: usize) -> Vec<usize> {
    let mut rng = Pcg64::new(entropy);
    let mut out: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        out.swap(i, j);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_is_split_into_little_endian_words() {
        assert_eq!(entropy_words(&[0]), vec![0]);
        assert_eq!(entropy_words(&[(1 << 32) + 5, 7]), vec![5, 1, 7]);
    }

    #[test]
    fn permutation_is_a_permutation() {
        let mut p = permutation(&[9], 257);
        p.sort_unstable();
        assert_eq!(p, (0..257).collect::<Vec<_>>());
        assert!(permutation(&[1], 0).is_empty());
    }

    #[test]
    fn seeds_give_different_orders() {
        assert_ne!(permutation(&[1], 50), permutation(&[2], 50));
        assert_eq!(permutation(&[1, 2], 50), permutation(&[1, 2], 50));
    }
}
