#![no_main]
// See fuzz/harness/src/lib.rs for what the target reaches and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qins_fuzz::attention_inputs(data);
});
