//! Rough CPU timings of QinsMatMul against a plain f32 sgemm on the decoded weight.
//!
//! `cargo run --release -p qins-provider --example bench -- [K] [N] [format] [group]`
//! (defaults: 2048 2048 q8 128). Prints the median of several runs per M, for the kernel's
//! chosen path, both paths forced, and `matrixmultiply::sgemm(A, W)` with W decoded up front.

use std::time::Instant;

use qins::codec::{encode_rows, Format, Layout};
use qins_provider::cpu::qins_matmul::{qins_matmul_f32, qins_matmul_f32_path, Blocking, OwnedWeights, BLOCKING};

fn median_ms(mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..7)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let k: usize = args.first().map_or(2048, |s| s.parse().expect("K"));
    let n: usize = args.get(1).map_or(2048, |s| s.parse().expect("N"));
    let format = args.get(2).map_or(Format::Q8, |s| Format::parse(s).expect("format"));
    let group: usize = args.get(3).map_or(128, |s| s.parse().expect("group"));
    let layout = Layout::new(format, k, n, group);
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let rows: Vec<f32> = (0..k * n).map(|_| rnd() * 0.1).collect();
    let enc = encode_rows(&rows, layout).expect("encode").0;
    let owned = OwnedWeights::from_encoded(&enc);
    let w = owned.view().expect("weights");
    let wkn = enc.decode_kn();
    println!("K={k} N={n} {format} group={} threads={}", layout.group, rayon::current_num_threads());
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "M", "qins ms", "gemv ms", "gemm ms", "f32 sgemm ms", "GFLOP/s"
    );
    for m in [1usize, 2, 4, 8, 16, 32, 128, 512] {
        let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let mut y = vec![0f32; m * n];
        let t = median_ms(|| qins_matmul_f32(&a, m, &w, &mut y).expect("run"));
        let tv = median_ms(|| qins_matmul_f32_path(&a, m, &w, &mut y, None).expect("run"));
        let tm = median_ms(|| qins_matmul_f32_path(&a, m, &w, &mut y, Some(BLOCKING)).expect("run"));
        let ts = median_ms(|| unsafe {
            // SAFETY: a is [m, k], wkn is [k, n], y is [m, n], all row-major.
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                wkn.as_ptr(),
                n as isize,
                1,
                0.0,
                y.as_mut_ptr(),
                n as isize,
                1,
            )
        });
        let gflops = 2.0 * (m * k * n) as f64 / (t * 1e-3) / 1e9;
        println!("{m:>5} {t:>10.3} {tv:>10.3} {tm:>10.3} {ts:>12.3} {gflops:>8.1}");
    }
    if std::env::var_os("QINS_BENCH_BLOCKING").is_none() {
        return;
    }
    // Blocking alternatives for the GEMM path.
    let variants = [
        BLOCKING,
        Blocking { nb: 128, mb: 64, kc: 168, ..BLOCKING },
        Blocking { nb: 64, mb: 128, kc: 168, ..BLOCKING },
        Blocking { nb: 96, mb: 96, kc: 168, ..BLOCKING },
        Blocking { nb: 32, mb: 64, kc: 336, ..BLOCKING },
        Blocking { nb: 64, mb: 64, kc: 512, ..BLOCKING },
        Blocking { nb: 256, serial_tiles: true, ..BLOCKING },
        Blocking { nb: 1024, serial_tiles: true, ..BLOCKING },
    ];
    for m in [16usize, 128, 512] {
        let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let mut y = vec![0f32; m * n];
        for b in variants {
            let t = median_ms(|| qins_matmul_f32_path(&a, m, &w, &mut y, Some(b)).expect("run"));
            println!("M={m:<4} {b:?}: {t:.3} ms");
        }
    }
}
