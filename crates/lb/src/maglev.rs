//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of
//! prime size M where each backend owns about M/N slots, and removing one of
//! N backends reassigns only about 1/N of the slots.

/// 64-bit FNV-1a with a seed, so one name gives two independent hashes.
fn hash(seed: u64, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // final avalanche (splitmix64)
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// True when `m` is prime.
pub fn is_prime(m: u32) -> bool {
    if m < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= m as u64 {
        if m % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

/// Builds the table: `backends` are (id, name) with names unique and stable
/// (e.g. "10.0.1.2:8080"); `m` must be prime and larger than the backend
/// count. Returns one backend ID per slot (empty when there are none).
pub fn table(backends: &[(u32, String)], m: u32) -> Vec<u32> {
    if backends.is_empty() || m == 0 {
        return vec![];
    }
    let m64 = m as u64;
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|(_, name)| {
            let offset = hash(1, name.as_bytes()) % m64;
            let skip = hash(2, name.as_bytes()) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0u64;
    'outer: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m64;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m64;
            }
            entry[c as usize] = backends[i].0;
            next[i] += 1;
            filled += 1;
            if filled == m64 {
                break 'outer;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<(u32, String)> {
        (1..=n).map(|i| (i, format!("10.0.{}.{}:8080", i / 200, i % 200 + 1))).collect()
    }

    #[test]
    fn default_size_is_prime() {
        assert!(is_prime(crate::DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(!is_prime(16384));
    }

    #[test]
    fn slots_are_shared_evenly() {
        let t = table(&backends(10), 16381);
        assert_eq!(t.len(), 16381);
        for id in 1..=10 {
            let n = t.iter().filter(|b| **b == id).count();
            assert!((1600..=1680).contains(&n), "backend {id} owns {n} slots");
        }
    }

    /// Removing one of N backends moves only about 1/N of the flows: the slots
    /// of the removed backend, and very few others.
    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        for n in [3u32, 10, 50] {
            let all = backends(n);
            let before = table(&all, 16381);
            for victim in [1u32, n / 2 + 1, n] {
                let rest: Vec<_> = all.iter().filter(|(id, _)| *id != victim).cloned().collect();
                let after = table(&rest, 16381);
                let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64 / 16381.0;
                let ideal = 1.0 / n as f64;
                assert!(moved >= ideal * 0.95 && moved <= ideal * 2.0, "n={n} victim={victim}: {moved:.4} of flows moved, ideal {ideal:.4}");
                // flows of the other backends stay where they were, almost all
                let disturbed = before.iter().zip(&after).filter(|(b, a)| **b != victim && b != a).count() as f64 / 16381.0;
                assert!(disturbed < ideal, "n={n}: {disturbed:.4} of others' flows moved");
            }
        }
    }

    #[test]
    fn same_input_same_table() {
        assert_eq!(table(&backends(7), 251), table(&backends(7), 251));
        assert!(table(&[], 251).is_empty());
    }
}
