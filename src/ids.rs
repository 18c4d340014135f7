//! Unique ids for requests and traces (not secrets, just unique and hard to collide across
//! processes). Every request gets one, so making one is a counter step, two mixes and hex
//! digits: no hashing state, no clock, no formatting machinery.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static COUNTER: AtomicU64 = AtomicU64::new(0);
static SEEDS: OnceLock<(u64, u64)> = OnceLock::new();

/// Per-process random seeds (from the standard library's random hasher keys and the clock).
fn seeds() -> (u64, u64) {
    *SEEDS.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let mut h = RandomState::new().build_hasher();
        h.write_u64(nanos);
        h.write_u32(std::process::id());
        let a = h.finish();
        h.write_u64(a);
        (a, h.finish())
    })
}

/// SplitMix64's finaliser: a bijection, so distinct counters give distinct outputs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn push_hex(out: &mut String, v: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for i in (0..digits).rev() {
        out.push(char::from(HEX[((v >> (i * 4)) & 0xf) as usize]));
    }
}

/// `prefix` followed by 24 hex digits, unique within and across processes.
pub fn new_id(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let (s1, s2) = seeds();
    let mut out = String::with_capacity(prefix.len() + 24);
    out.push_str(prefix);
    push_hex(&mut out, mix(n ^ s1), 16);
    push_hex(&mut out, mix(n.wrapping_add(s2)) & 0xffff_ffff, 8);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique() {
        let ids: std::collections::HashSet<String> =
            (0..10_000).map(|_| super::new_id("r-")).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|i| i.len() == 26));
        assert!(ids
            .iter()
            .all(|i| i[2..].bytes().all(|b| b.is_ascii_hexdigit())));
    }

    #[test]
    fn consecutive_ids_do_not_look_sequential() {
        let a = super::new_id("");
        let b = super::new_id("");
        let same = a.bytes().zip(b.bytes()).filter(|(x, y)| x == y).count();
        assert!(same < 12, "{a} vs {b}");
    }
}
