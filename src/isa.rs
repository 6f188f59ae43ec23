//! The one instruction-set detection of the workspace: which vector instruction sets this CPU
//! has, asked once. The encoder (`codec::encode`) and the custom-op library's CPU kernels both
//! dispatch on it the same way: an [`Isa`] picked once ([`Isa::best`], or a test's choice among
//! [`Isa::available`]), matched at the call to a `#[target_feature]` variant.

use std::sync::OnceLock;

/// Instruction sets with code variants of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, any target; the reference the others are tested against.
    Portable,
    /// x86-64 AVX2 + FMA + F16C (Haswell and later).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// x86-64 AVX-512 F/BW/VL (Skylake-SP, Ice Lake, Zen 4 and later), with everything
    /// [`Isa::Avx2`] has.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The sets this CPU can run, best last.
    pub fn available() -> &'static [Isa] {
        static DETECTED: OnceLock<Vec<Isa>> = OnceLock::new();
        DETECTED.get_or_init(|| {
            #[allow(unused_mut)]
            let mut v = vec![Isa::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as d;
                if d!("avx2") && d!("fma") && d!("f16c") {
                    v.push(Isa::Avx2);
                    if d!("avx512f") && d!("avx512bw") && d!("avx512vl") {
                        v.push(Isa::Avx512);
                    }
                }
            }
            v
        })
    }

    /// The best set this CPU has.
    pub fn best() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Portable)
    }

    /// Whether this CPU can run code for `self`.
    pub fn is_available(self) -> bool {
        Isa::available().contains(&self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_is_always_there_and_first() {
        assert_eq!(Isa::available()[0], Isa::Portable);
        assert!(Isa::best().is_available());
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512.is_available() {
            assert!(Isa::Avx2.is_available(), "AVX-512 implies the AVX2 variant's features");
        }
    }
}
