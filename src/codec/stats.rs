//! Round-trip error statistics.

/// Sums over one output channel, in f64 so that large tensors add up exactly enough.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowErr {
    /// `sum x^2`
    pub sxx: f64,
    /// `sum y^2` (y: decoded)
    pub syy: f64,
    /// `sum x y`
    pub sxy: f64,
    /// `sum (x - y)^2`
    pub see: f64,
    /// `max |x - y|`
    pub max_abs: f64,
    pub count: u64,
}

impl RowErr {
    #[inline(always)]
    pub fn add(&mut self, x: f32, y: f32) {
        let (x, y) = (x as f64, y as f64);
        let e = x - y;
        self.sxx += x * x;
        self.syy += y * y;
        self.sxy += x * y;
        self.see += e * e;
        self.max_abs = self.max_abs.max(e.abs());
        self.count += 1;
    }

    /// Relative L2 error of this channel (0 for an exactly reproduced all-zero channel).
    pub fn rel(&self) -> f64 {
        if self.sxx > 0.0 {
            (self.see / self.sxx).sqrt()
        } else if self.see == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    }
}

/// Per-tensor round-trip report, as printed by `qins report` and `qins rewrite`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TensorStats {
    /// Cosine similarity of the flattened original and decoded tensors.
    pub cosine: f64,
    /// `||W - W'||_F / ||W||_F`.
    pub rel_fro: f64,
    /// 99th percentile over output channels of the channel's relative L2 error.
    pub p99_rel: f64,
    /// Largest absolute error of any weight.
    pub max_abs: f64,
    /// Stored bits per weight, scales and padding included.
    pub bits_per_weight: f64,
}

impl TensorStats {
    pub fn from_rows(rows: &[RowErr], bits_per_weight: f64) -> TensorStats {
        let mut t = RowErr::default();
        for r in rows {
            t.sxx += r.sxx;
            t.syy += r.syy;
            t.sxy += r.sxy;
            t.see += r.see;
            t.max_abs = t.max_abs.max(r.max_abs);
        }
        // 1 - cos = ((|x| - |y|)^2 + |x - y|^2) / (2 |x| |y|): no cancellation between
        // nearly equal sums, so the cosine of a near-perfect round trip stays meaningful.
        let cosine = if t.sxx > 0.0 && t.syy > 0.0 {
            let (nx, ny) = (t.sxx.sqrt(), t.syy.sqrt());
            1.0 - ((nx - ny).powi(2) + t.see) / (2.0 * nx * ny)
        } else if t.sxx == 0.0 && t.syy == 0.0 {
            1.0
        } else {
            0.0
        };
        let mut rel: Vec<f64> = rows.iter().map(RowErr::rel).collect();
        rel.sort_by(f64::total_cmp);
        let p99_rel =
            if rel.is_empty() { 0.0 } else { rel[((rel.len() as f64 * 0.99).ceil() as usize).clamp(1, rel.len()) - 1] };
        TensorStats { cosine, rel_fro: t.rel(), p99_rel, max_abs: t.max_abs, bits_per_weight }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_copy_is_perfect_and_errors_show() {
        let mut r = RowErr::default();
        for v in [1.0f32, -2.0, 0.5] {
            r.add(v, v);
        }
        let s = TensorStats::from_rows(&[r], 8.0);
        assert_eq!(s.cosine, 1.0);
        assert_eq!(s.rel_fro, 0.0);
        let mut bad = RowErr::default();
        bad.add(1.0, 0.0);
        bad.add(0.0, 1.0);
        let s = TensorStats::from_rows(&[r, bad], 8.0);
        assert!(s.cosine < 1.0);
        assert_eq!(s.max_abs, 1.0);
        assert!(s.p99_rel > 0.9);
    }
}
