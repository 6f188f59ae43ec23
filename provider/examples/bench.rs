//! CPU timings of QinsMatMul per path and instruction set, against a plain f32 sgemm
//! (`matrixmultiply`, single-threaded) on the decoded weight.
//!
//! `cargo run --release -p qins-provider --example bench -- [K] [N] [format] [group] [threads]`
//! (defaults: 2048 2048 q8 128 1). `threads` > 1 runs the kernel's loops on a rayon pool of
//! that size; 1 runs them on the calling thread. Prints the fastest of several runs per M:
//! the kernel's choice, each path forced, each slower instruction set (chosen path), and the
//! f32 sgemm, with the weight bytes read per second of the chosen path.
//!
//! For profiling (`perf stat`, `perf record`), `QINS_BENCH_ONLY=dot|gemm|auto` runs just that
//! path, 200 times per M, timed by the thread's CPU clock (wall clock with threads > 1), and
//! `QINS_BENCH_M=1,128` picks the M values.

use std::time::Instant;

use qins::codec::{encode_rows, Format, Layout};
use qins_provider::cpu::parallel::{ParallelFor, Rayon, Sequential};
use qins_provider::cpu::qins_matmul::{qins_matmul_f32_with, Isa, Options, OwnedWeights, Path};

fn min_ms(mut f: impl FnMut()) -> f64 {
    f();
    let t: Vec<f64> = (0..9)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    // The minimum: the least disturbed run of a CPU-bound loop.
    t.into_iter().fold(f64::INFINITY, f64::min)
}

fn wall_ms() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3
}

/// This thread's CPU time (wall time off Linux): on a shared machine, time spent descheduled
/// is not the kernel's. Only meaningful for single-threaded runs.
fn cpu_ms() -> f64 {
    #[cfg(target_os = "linux")]
    {
        #[repr(C)]
        struct Timespec {
            sec: i64,
            nsec: i64,
        }
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
        }
        const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: a valid clock id and out pointer.
        if unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0 {
            return ts.sec as f64 * 1e3 + ts.nsec as f64 * 1e-6;
        }
    }
    wall_ms()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let k: usize = args.first().map_or(2048, |s| s.parse().expect("K"));
    let n: usize = args.get(1).map_or(2048, |s| s.parse().expect("N"));
    let format = args.get(2).map_or(Format::Q8, |s| Format::parse(s).expect("format"));
    let group: usize = args.get(3).map_or(128, |s| s.parse().expect("group"));
    let threads: usize = args.get(4).map_or(1, |s| s.parse().expect("threads"));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
    let par: &(dyn ParallelFor + Sync) = if threads > 1 { &Rayon } else { &Sequential };
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
    let isas = Isa::available();
    println!("K={k} N={n} {format} group={} threads={threads} isas={isas:?}", layout.group);
    print!("{:>5} {:>9} {:>9} {:>9}", "M", "qins ms", "dot ms", "gemm ms");
    for isa in isas.iter().rev().skip(1) {
        print!(" {:>10}", format!("{isa:?} ms"));
    }
    println!(" {:>9} {:>8} {:>7}", "sgemm ms", "GFLOP/s", "GB/s");
    let ms: Vec<usize> = std::env::var("QINS_BENCH_M").map_or(vec![1, 2, 3, 4, 5, 8, 16, 32, 64, 128, 512], |v| {
        v.split(',').map(|m| m.trim().parse().expect("QINS_BENCH_M")).collect()
    });
    let only = std::env::var("QINS_BENCH_ONLY").ok().map(|v| match v.as_str() {
        "dot" => Some(Path::Dot),
        "gemm" => Some(Path::Gemm),
        _ => None,
    });
    pool.install(|| {
        for &m in &ms {
            if let Some(path) = only {
                let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let mut y = vec![0f32; m * n];
                let opts = Options { path, ..Options::default() };
                let clock = if threads > 1 { wall_ms } else { cpu_ms };
                let mut t: Vec<f64> = (0..200)
                    .map(|_| {
                        let s = clock();
                        qins_matmul_f32_with(&opts, par, &a, m, &w, &mut y).expect("run");
                        clock() - s
                    })
                    .collect();
                t.sort_by(f64::total_cmp);
                let gflops = |t: f64| 2.0 * (m * k * n) as f64 / (t * 1e-3) / 1e9;
                println!(
                    "M={m} {}: min {:.3} ms ({:.1} GFLOP/s), median {:.3} ms",
                    path.map_or("auto".to_string(), |p| format!("{p:?}")),
                    t[0],
                    gflops(t[0]),
                    t[t.len() / 2]
                );
                continue;
            }
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut y = vec![0f32; m * n];
            let mut run = |opts: Options| min_ms(|| qins_matmul_f32_with(&opts, par, &a, m, &w, &mut y).expect("run"));
            let t = run(Options::default());
            let td = run(Options { path: Some(Path::Dot), ..Options::default() });
            let tg = run(Options { path: Some(Path::Gemm), ..Options::default() });
            print!("{m:>5} {t:>9.3} {td:>9.3} {tg:>9.3}");
            for &isa in isas.iter().rev().skip(1) {
                print!(" {:>10.3}", run(Options { isa: Some(isa), ..Options::default() }));
            }
            let ts = min_ms(|| unsafe {
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
            let gbs = layout.stored_bytes() as f64 / (t * 1e-3) / 1e9;
            println!(" {ts:>9.3} {gflops:>8.1} {gbs:>7.1}");
        }
    });
}
