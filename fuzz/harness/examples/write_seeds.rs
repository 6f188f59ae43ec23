//! Writes each fuzz target's seeds (`qins_fuzz::seeds`) into `DIR/<target>/seed-<i>`, the
//! corpus folders scripts/fuzz.sh hands to libFuzzer.

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into()));
    for t in qins_fuzz::seeds::TARGETS {
        let d = dir.join(t);
        std::fs::create_dir_all(&d)?;
        for (i, s) in qins_fuzz::seeds::of(t).iter().enumerate() {
            std::fs::write(d.join(format!("seed-{i}")), s)?;
        }
    }
    Ok(())
}
