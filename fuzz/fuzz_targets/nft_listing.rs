//! Fuzzes the parser of `nft -j list table` output (the enforcer's read-back of the kernel):
//! any input must give a value or an error, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = egressguard::enforce::kernel::parse_table(text, "egressguard");
    }
});
