//! Partition placement by rendezvous (highest-random-weight) hashing.
//!
//! Every broker-eligible member gets a pseudo-random weight for each
//! partition, computed from the member's id and the partition's key alone;
//! the partition's replicas are the members with the highest weights, the
//! first of them its home. Because a weight does not depend on the other
//! members, a join moves to the new member only the partitions where it wins
//! (about 1/N of them), and a leave moves only the leaver's partitions.

/// Identifies a partition: its namespace, topic and number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartitionKey<'a> {
    /// Kubernetes namespace owning the topic.
    pub namespace: &'a str,
    /// Topic name.
    pub topic: &'a str,
    /// Partition number.
    pub partition: u32,
}

/// A member as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    /// Stable identity (the agent's node name).
    pub id: String,
    /// Whether it may hold partitions (`--broker=false` agents may not).
    pub broker: bool,
}

impl Member {
    /// A broker-eligible member.
    pub fn broker(id: impl Into<String>) -> Self {
        Member {
            id: id.into(),
            broker: true,
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The splitmix64 finalizer: spreads FNV's weak low bits over the whole word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The weight of `member` for `key`. Stable across versions and platforms:
/// changing it moves every partition, so it is part of the wire contract.
pub fn weight(member: &str, key: &PartitionKey<'_>) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, member.as_bytes());
    h = fnv1a(h, &[0xff]);
    h = fnv1a(h, key.namespace.as_bytes());
    h = fnv1a(h, &[0xff]);
    h = fnv1a(h, key.topic.as_bytes());
    h = fnv1a(h, &[0xff]);
    h = fnv1a(h, &key.partition.to_le_bytes());
    mix(h)
}

/// The `r` broker members with the highest weights for `key`, highest first.
/// Ties (astronomically rare) break by member id so every agent agrees.
pub fn replicas<'m>(members: &'m [Member], key: &PartitionKey<'_>, r: usize) -> Vec<&'m Member> {
    let mut ranked: Vec<(u64, &Member)> = members
        .iter()
        .filter(|m| m.broker)
        .map(|m| (weight(&m.id, key), m))
        .collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.id.cmp(&b.1.id)));
    ranked.dedup_by(|a, b| a.1.id == b.1.id);
    ranked.into_iter().take(r).map(|(_, m)| m).collect()
}

/// The home (first replica) of `key`, if any member is broker-eligible.
pub fn home<'m>(members: &'m [Member], key: &PartitionKey<'_>) -> Option<&'m Member> {
    replicas(members, key, 1).into_iter().next()
}

#[cfg(test)]
mod tests;
