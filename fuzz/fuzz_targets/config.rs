//! Config loading: `config::from_yaml_str` on arbitrary UTF-8 text, with an environment
//! that has no variables and one where every variable is set.
//!
//! Invariant: no panic, no hang; a rejected config names at least one problem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_edge::config::from_yaml_str;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for env in [&|_: &str| None as Option<String>, &|name: &str| {
        Some(format!("secret-value-of-{name}"))
    }] as [&dyn Fn(&str) -> Option<String>; 2]
    {
        if let Err(e) = from_yaml_str(text, env) {
            assert!(!e.problems.is_empty(), "an error without a problem");
        }
    }
});
