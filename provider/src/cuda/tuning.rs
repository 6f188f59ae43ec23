//! The CUDA kernels' knobs: the settings the benchmarks turn to compare paths
//! (docs/BENCHMARKS.md, "Tuning knobs"), all in one struct, read from the environment once per
//! process and parsed strictly. A value that does not parse, or lies outside its range, is an
//! error naming the variable when the first CUDA kernel is created; nothing falls back to a
//! default in silence. Unset, every knob is the measured default, which is what a user runs.

use std::sync::OnceLock;

use crate::ort_api::{Error, Result};

/// Which path prefill-sized `M` takes (`QINS_CUDA_PREFILL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefill {
    /// The launcher's time model picks the prefill kernel or decode + cuBLAS (the default).
    Auto,
    /// Never the prefill kernel.
    Off,
    /// The prefill kernel wherever it applies, whatever the model says about cuBLAS.
    On,
    /// Configuration `CONFIGS[config]` with `splits` K splits, where it applies
    /// (`scripts/gpu/check.py` runs every configuration this way).
    Fixed { config: usize, splits: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// `QINS_CUDA_GEMV_MAX_M`: largest `M` for the token (code-domain) kernels, both the
    /// tensor-core and the CUDA-core one; `None` keeps their own defaults (16 and 4).
    pub gemv_max_m: Option<usize>,
    /// `QINS_CUDA_PREFILL_MAX_M`: largest `M` for the prefill kernel (0 turns it off where
    /// ORT gives a cuBLAS handle); default 4096.
    pub prefill_max_m: usize,
    /// `QINS_CUDA_TC_MAX_TILES` (1 to 4): lowers the cap on 16-channel tiles a block of the
    /// tensor-core token kernel (1 gives the 16-channel blocks).
    pub tc_max_tiles: Option<usize>,
    /// `QINS_CUDA_PREFILL`: `auto`, `off`, `on` or `C:S`.
    pub prefill: Prefill,
    /// `QINS_CUDA_PDL` (0 or 1): let kernels overlap the one before them (sm_90+). Off by
    /// default: in Phi-3.5 end to end it measured 1-6% slower (most QINS nodes follow ORT's
    /// own kernels, which never let a successor start early), while back-to-back QINS nodes
    /// took 0.70-0.94x the time with it.
    pub pdl: bool,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning { gemv_max_m: None, prefill_max_m: 4096, tc_max_tiles: None, prefill: Prefill::Auto, pdl: false }
    }
}

/// The variables, for messages and documentation.
pub const VARIABLES: [&str; 5] =
    ["QINS_CUDA_GEMV_MAX_M", "QINS_CUDA_PREFILL_MAX_M", "QINS_CUDA_TC_MAX_TILES", "QINS_CUDA_PREFILL", "QINS_CUDA_PDL"];

impl Tuning {
    /// Parses the knobs from `get` (the environment, or a test's map). Empty counts as unset.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Tuning, String> {
        let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let count = |k: &str, what: &str| -> std::result::Result<Option<usize>, String> {
            get(k).map(|v| v.parse::<usize>().map_err(|_| format!("{k}={v}: expected {what}"))).transpose()
        };
        let gemv_max_m = count("QINS_CUDA_GEMV_MAX_M", "a row count (0 or more)")?;
        let prefill_max_m = count("QINS_CUDA_PREFILL_MAX_M", "a row count (0 or more)")?;
        let tc_max_tiles = count("QINS_CUDA_TC_MAX_TILES", "1, 2, 3 or 4")?;
        if let Some(n) = tc_max_tiles.filter(|n| !(1..=4).contains(n)) {
            return Err(format!("QINS_CUDA_TC_MAX_TILES={n}: expected 1, 2, 3 or 4"));
        }
        let mut prefill = Prefill::Auto;
        if let Some(v) = get("QINS_CUDA_PREFILL") {
            prefill = match v.as_str() {
                "auto" => Prefill::Auto,
                "off" => Prefill::Off,
                "on" => Prefill::On,
                _ => {
                    let fixed = v.split_once(':').and_then(|(c, s)| Some((c.parse().ok()?, s.parse().ok()?)));
                    match fixed {
                        Some((config, splits)) if (1..=64).contains(&splits) => Prefill::Fixed { config, splits },
                        _ => return Err(format!("QINS_CUDA_PREFILL={v}: expected auto, off, on or C:S (S in 1..=64)")),
                    }
                }
            };
        }
        let pdl = match get("QINS_CUDA_PDL").as_deref() {
            None | Some("0") => false,
            Some("1") => true,
            Some(v) => return Err(format!("QINS_CUDA_PDL={v}: expected 0 or 1")),
        };
        let default = Tuning::default();
        Ok(Tuning {
            gemv_max_m,
            prefill_max_m: prefill_max_m.unwrap_or(default.prefill_max_m),
            tc_max_tiles,
            prefill,
            pdl,
        })
    }
}

/// The process's tuning, read from the environment the first time it is asked for.
pub fn tuning() -> Result<&'static Tuning> {
    static T: OnceLock<std::result::Result<Tuning, String>> = OnceLock::new();
    T.get_or_init(|| Tuning::parse(|k| std::env::var(k).ok())).as_ref().map_err(|e| Error::invalid(e.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> std::result::Result<Tuning, String> {
        Tuning::parse(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn unset_is_the_default() {
        assert_eq!(parse(&[]), Ok(Tuning::default()));
        assert_eq!(parse(&[("QINS_CUDA_PDL", " "), ("QINS_CUDA_PREFILL", "")]), Ok(Tuning::default()));
    }

    #[test]
    fn values_are_parsed() {
        let t = parse(&[
            ("QINS_CUDA_GEMV_MAX_M", "0"),
            ("QINS_CUDA_PREFILL_MAX_M", "128"),
            ("QINS_CUDA_TC_MAX_TILES", "1"),
            ("QINS_CUDA_PREFILL", "3:2"),
            ("QINS_CUDA_PDL", " 1 "),
        ])
        .unwrap();
        assert_eq!(
            t,
            Tuning {
                gemv_max_m: Some(0),
                prefill_max_m: 128,
                tc_max_tiles: Some(1),
                prefill: Prefill::Fixed { config: 3, splits: 2 },
                pdl: true
            }
        );
        assert_eq!(parse(&[("QINS_CUDA_PREFILL", "off")]).unwrap().prefill, Prefill::Off);
    }

    /// Bad values are errors that name the variable; three of them used to fall back to the
    /// default in silence.
    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("QINS_CUDA_GEMV_MAX_M", "sixteen"),
            ("QINS_CUDA_GEMV_MAX_M", "-1"),
            ("QINS_CUDA_PREFILL_MAX_M", "4k"),
            ("QINS_CUDA_TC_MAX_TILES", "0"),
            ("QINS_CUDA_TC_MAX_TILES", "9"),
            ("QINS_CUDA_PREFILL", "maybe"),
            ("QINS_CUDA_PREFILL", "2:0"),
            ("QINS_CUDA_PDL", "off"),
        ] {
            let e = parse(&[(k, v)]).unwrap_err();
            assert!(e.starts_with(&format!("{k}={v}")), "{e}");
        }
        assert!(VARIABLES.iter().all(|v| v.starts_with("QINS_CUDA_")));
    }
}
