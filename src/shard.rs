//! Which kiam server "owns" a pod: rendezvous (highest random weight)
//! hashing of the pod IP over the servers' addresses.
//!
//! The surprise: agents and servers compute this separately, in different
//! processes, on different machines, so the hash is a fixed function of the
//! bytes (FNV-1a 64 over the canonical address bytes, then a 64-bit
//! finaliser), never std's per-process `RandomState`. Agents ask a pod's
//! owner first; a server prefetches only the pods it owns. Ownership decides
//! nothing about identity: any server answers any pod, so a stale or wrong
//! membership costs an STS call or a cold request, never a wrong answer.
//!
//! Rendezvous hashing: each (key, member) pair gets a weight and members are
//! ranked by it. Removing a member moves only the keys it owned (each to its
//! next in rank); adding one takes about 1/n of the keys from the others.

use std::cmp::Reverse;
use std::net::{IpAddr, SocketAddr};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 over `bytes`, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The splitmix64 finaliser: FNV alone mixes the last bytes poorly, and
/// members often differ only there (the last octet, the port).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The address's canonical bytes: a family tag then the octets, so an
/// IPv4-mapped IPv6 address hashes as the IPv4 address it is.
fn hash_ip(h: u64, ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => fnv1a(fnv1a(h, &[4]), &v4.octets()),
        IpAddr::V6(v6) => fnv1a(fnv1a(h, &[6]), &v6.octets()),
    }
}

/// The weight of `member` for `key`: FNV-1a 64 over the key's canonical
/// bytes, then the member's address bytes and port (big-endian), finalised.
pub fn weight(key: IpAddr, member: SocketAddr) -> u64 {
    let h = hash_ip(FNV_OFFSET, key);
    let h = hash_ip(h, member.ip());
    mix(fnv1a(h, &member.port().to_be_bytes()))
}

/// Indices into `members`, best first, for `key` (a pod IP). The same
/// members in any order rank the same addresses in the same order; ties
/// (only between equal addresses) go to the lower address, then index.
pub fn rank(key: IpAddr, members: &[SocketAddr]) -> Vec<usize> {
    let mut order: Vec<(Reverse<u64>, SocketAddr, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (Reverse(weight(key, *m)), canonical(*m), i))
        .collect();
    order.sort_unstable();
    order.into_iter().map(|(_, _, i)| i).collect()
}

/// The index of the member that owns `key`; `None` when there are none.
pub fn owner(key: IpAddr, members: &[SocketAddr]) -> Option<usize> {
    members
        .iter()
        .enumerate()
        .max_by_key(|(i, m)| (weight(key, **m), Reverse(canonical(**m)), Reverse(*i)))
        .map(|(i, _)| i)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u8) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::new(IpAddr::from([198, 18, 1, 10 + i]), 443))
            .collect()
    }

    fn pod(i: u32) -> IpAddr {
        let [_, b, c, d] = i.to_be_bytes();
        // 198.18.0.0/15 holds 2^17 addresses; spill into 2001:2::/48 past it.
        if i < (1 << 17) {
            IpAddr::from([198, 18 + (b & 1), c, d])
        } else {
            IpAddr::from([
                0x2001,
                2,
                0,
                0,
                0,
                0,
                u16::from(b),
                u16::from_be_bytes([c, d]),
            ])
        }
    }

    #[test]
    fn owner_is_first_in_rank_and_rank_is_a_permutation() {
        let m = members(5);
        for i in 0..1000 {
            let r = rank(pod(i), &m);
            assert_eq!(Some(r[0]), owner(pod(i), &m));
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        }
        assert_eq!(owner(pod(1), &[]), None);
        assert!(rank(pod(1), &[]).is_empty());
    }

    #[test]
    fn same_answer_whatever_the_member_order() {
        let m = members(4);
        let mut rev = m.clone();
        rev.reverse();
        let rot: Vec<SocketAddr> = m.iter().cycle().skip(2).take(4).copied().collect();
        for i in 0..2000 {
            let ranked = |ms: &[SocketAddr]| -> Vec<SocketAddr> {
                rank(pod(i), ms).into_iter().map(|j| ms[j]).collect()
            };
            assert_eq!(ranked(&m), ranked(&rev));
            assert_eq!(ranked(&m), ranked(&rot));
        }
    }

    #[test]
    fn removing_a_member_moves_only_its_keys() {
        let m = members(4);
        let gone = m[2];
        let rest: Vec<SocketAddr> = m.iter().copied().filter(|a| *a != gone).collect();
        let mut moved = 0;
        for i in 0..20_000 {
            let before = m[owner(pod(i), &m).unwrap()];
            let after = rest[owner(pod(i), &rest).unwrap()];
            if before == gone {
                moved += 1;
                // To its next in rank.
                let second = m[rank(pod(i), &m)[1]];
                assert_eq!(after, second);
            } else {
                assert_eq!(before, after, "key {i} moved though its owner stayed");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn balanced_over_100k_keys_and_3_members() {
        let m = members(3);
        let mut counts = [0u32; 3];
        for i in 0..100_000 {
            counts[owner(pod(i), &m).unwrap()] += 1;
        }
        for c in counts {
            // Within 3% of a third.
            assert!((32_333..=34_333).contains(&c), "unbalanced: {counts:?}");
        }
        // Also with members one port apart on one address.
        let ports: Vec<SocketAddr> = (0..3)
            .map(|p| SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 9610 + p))
            .collect();
        let mut counts = [0u32; 3];
        for i in 0..100_000 {
            counts[owner(pod(i), &ports).unwrap()] += 1;
        }
        for c in counts {
            assert!((32_333..=34_333).contains(&c), "unbalanced: {counts:?}");
        }
    }

    #[test]
    fn mapped_addresses_are_the_ipv4_ones() {
        let m = members(3);
        let v4: IpAddr = "198.18.3.4".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.3.4".parse().unwrap();
        assert_eq!(rank(v4, &m), rank(mapped, &m));
    }

    #[test]
    fn the_hash_is_fixed() {
        // Agents and servers of different builds must agree: pin one value.
        let w = weight(
            "198.18.0.1".parse().unwrap(),
            "198.18.1.10:443".parse().unwrap(),
        );
        assert_eq!(
            w,
            weight(
                "198.18.0.1".parse().unwrap(),
                "198.18.1.10:443".parse().unwrap()
            )
        );
        assert_eq!(format!("{w:016x}"), PINNED);
    }
    // Computed independently (a few lines of Python over the same bytes).
    const PINNED: &str = "962fc99e45c0c4cc";
}
