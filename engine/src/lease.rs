//! KV partitions leased to routers, so that several routers can share one
//! engine.
//!
//! Each router does its own KV block accounting. An engine started with
//! `--max-routers N` splits its blocks into N equal partitions and leases
//! one to each router that attaches. A router numbers blocks `1..=P` and
//! sequences as it likes; the engine maps them into its partition:
//!
//! ```text
//!   engine block = local block + partition * P      (local 1..=P; 0 is reserved)
//!   engine seq   = partition << 48 | router's seq id (router ids below 2^48)
//! ```
//!
//! A lease lives while its router talks to the engine (steps, releases,
//! `Info` with the lease id); after `timeout` of silence, with no step in
//! flight, another router may take the partition. Attaching again with the
//! same router id replaces that router's own lease. Whoever takes a
//! partition over gets it empty: the sequences left in it are released.
//!
//! A lease's numbered steps go to the engine in their order (1, 2, ...
//! from each attach), so its router may send a step before the one
//! before it has answered.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Bits of a router's sequence id.
pub const SEQ_ID_BITS: u32 = 48;

struct Lease {
    id: u64,
    router_id: u64,
    last_seen: Instant,
    in_flight: usize,
    /// The number of the lease's next step (from 1).
    next_step: u64,
    /// Engine sequence ids this lease's router has run and not released.
    seqs: HashSet<u64>,
}

/// Where a numbered step stands in its lease's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Its turn (taken): it goes to the engine now.
    Now,
    /// A step numbered before it has not arrived yet.
    Later,
    /// Its number was already run.
    Past,
}

/// A lease just granted.
#[derive(Debug)]
pub struct Grant {
    pub lease_id: u64,
    pub partition: usize,
    /// Engine sequence ids left in the partition, to release.
    pub stale: Vec<u64>,
}

pub struct Leases {
    partitions: Vec<Option<Lease>>,
    blocks_per_partition: usize,
    timeout: Duration,
    next_id: u64,
}

impl Leases {
    /// `num_blocks` includes the engine's reserved block 0.
    pub fn new(num_blocks: usize, partitions: usize, timeout: Duration) -> Result<Self, String> {
        if partitions == 0 {
            return Err("--max-routers must be at least 1".into());
        }
        let blocks_per_partition = num_blocks.saturating_sub(1) / partitions;
        if blocks_per_partition < 1 {
            return Err(format!(
                "{} KV blocks cannot be split between {partitions} routers: raise --kv-cache-memory or lower --max-routers",
                num_blocks.saturating_sub(1)
            ));
        }
        Ok(Leases {
            partitions: (0..partitions).map(|_| None).collect(),
            blocks_per_partition,
            timeout,
            // Ids differ across engine starts and leases.
            next_id: rand::random::<u32>() as u64 + 1,
        })
    }

    /// Usable blocks of one partition (`P`).
    pub fn blocks_per_partition(&self) -> usize {
        self.blocks_per_partition
    }

    pub fn num_partitions(&self) -> usize {
        self.partitions.len()
    }

    /// A partition for `router_id`: its own (replacing its lease), else a
    /// free or expired one; `None` when all are held by live routers.
    pub fn attach(&mut self, router_id: u64, now: Instant) -> Option<Grant> {
        let timeout = self.timeout;
        let partition = self
            .partitions
            .iter()
            .position(|p| p.as_ref().is_some_and(|l| l.router_id == router_id))
            .or_else(|| self.partitions.iter().position(Option::is_none))
            .or_else(|| {
                self.partitions.iter().position(|p| {
                    p.as_ref()
                        .is_some_and(|l| l.in_flight == 0 && now.duration_since(l.last_seen) > timeout)
                })
            })?;
        let stale = self.partitions[partition]
            .take()
            .map(|l| l.seqs.into_iter().collect())
            .unwrap_or_default();
        let lease_id = self.next_id;
        self.next_id += 1;
        self.partitions[partition] = Some(Lease {
            id: lease_id,
            router_id,
            last_seen: now,
            in_flight: 0,
            next_step: 1,
            seqs: HashSet::new(),
        });
        Some(Grant {
            lease_id,
            partition,
            stale,
        })
    }

    fn find(&mut self, lease_id: u64) -> Option<(usize, &mut Lease)> {
        self.partitions
            .iter_mut()
            .enumerate()
            .find_map(|(i, p)| p.as_mut().filter(|l| l.id == lease_id).map(|l| (i, l)))
    }

    /// Starts a call under `lease_id`: its partition, or `None` when the
    /// lease is not held (expired and taken over, or replaced).
    pub fn begin(&mut self, lease_id: u64, now: Instant) -> Option<usize> {
        let (partition, lease) = self.find(lease_id)?;
        lease.in_flight += 1;
        lease.last_seen = now;
        Some(partition)
    }

    /// Whether step `number` of `lease_id` goes to the engine now: it is
    /// the lease's next (then it takes its turn), or unnumbered (0).
    /// `None` when the lease is not held.
    pub fn take_turn(&mut self, lease_id: u64, number: u64) -> Option<Turn> {
        let (_, lease) = self.find(lease_id)?;
        Some(if number == 0 {
            Turn::Now
        } else if number < lease.next_step {
            Turn::Past
        } else if number > lease.next_step {
            Turn::Later
        } else {
            lease.next_step += 1;
            Turn::Now
        })
    }

    /// Ends a call started by [`begin`](Self::begin).
    pub fn end(&mut self, lease_id: u64, now: Instant) {
        if let Some((_, lease)) = self.find(lease_id) {
            lease.in_flight = lease.in_flight.saturating_sub(1);
            lease.last_seen = now;
        }
    }

    /// Keeps `lease_id` alive; false when it is not held.
    pub fn renew(&mut self, lease_id: u64, now: Instant) -> bool {
        match self.find(lease_id) {
            Some((_, lease)) => {
                lease.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// Ends `lease_id` (its router gave it back): the partition is free
    /// and the sequences left in it are returned, to release; `None` when
    /// the lease is not held.
    pub fn detach(&mut self, lease_id: u64) -> Option<Vec<u64>> {
        let (partition, _) = self.find(lease_id)?;
        let lease = self.partitions[partition].take()?;
        Some(lease.seqs.into_iter().collect())
    }

    /// Records engine sequence ids run (`ran`) and released under a lease.
    pub fn track(&mut self, lease_id: u64, ran: &[u64], released: &[u64]) {
        if let Some((_, lease)) = self.find(lease_id) {
            lease.seqs.extend(ran);
            for id in released {
                lease.seqs.remove(id);
            }
        }
    }

    /// The engine's id for a router's sequence in `partition`.
    pub fn engine_seq(partition: usize, seq_id: u64) -> Result<u64, String> {
        if seq_id >> SEQ_ID_BITS != 0 {
            return Err(format!("sequence id {seq_id} must be below 2^{SEQ_ID_BITS}"));
        }
        Ok((partition as u64) << SEQ_ID_BITS | seq_id)
    }

    /// The router's id for an engine sequence id.
    pub fn router_seq(engine_seq: u64) -> u64 {
        engine_seq & ((1 << SEQ_ID_BITS) - 1)
    }

    /// The engine's block for a router's block in `partition`.
    pub fn engine_block(&self, partition: usize, local: u32) -> Result<u32, String> {
        let p = self.blocks_per_partition;
        if local == 0 || local as usize > p {
            return Err(format!("KV block {local} is outside this router's partition (1..={p})"));
        }
        Ok(local + (partition * p) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_steps_take_their_turns_in_order_from_each_attach() {
        let t0 = Instant::now();
        let mut leases = Leases::new(1 + 10, 1, Duration::from_secs(5)).unwrap();
        let a = leases.attach(1, t0).unwrap();
        assert_eq!(leases.take_turn(a.lease_id, 2), Some(Turn::Later), "step 1 first");
        assert_eq!(leases.take_turn(a.lease_id, 1), Some(Turn::Now));
        assert_eq!(leases.take_turn(a.lease_id, 1), Some(Turn::Past), "each number once");
        assert_eq!(leases.take_turn(a.lease_id, 0), Some(Turn::Now), "unnumbered: any time");
        assert_eq!(leases.take_turn(a.lease_id, 2), Some(Turn::Now));
        let again = leases.attach(1, t0).unwrap();
        assert_eq!(leases.take_turn(a.lease_id, 3), None, "the old lease is gone");
        assert_eq!(
            leases.take_turn(again.lease_id, 1),
            Some(Turn::Now),
            "a new lease counts from 1"
        );
    }

    #[test]
    fn partitions_are_disjoint_and_leases_expire_only_when_idle() {
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut leases = Leases::new(1 + 3 * 10, 3, timeout).unwrap();
        assert_eq!(leases.blocks_per_partition(), 10);
        let a = leases.attach(1, t0).unwrap();
        let b = leases.attach(2, t0).unwrap();
        let c = leases.attach(3, t0).unwrap();
        assert_ne!(a.partition, b.partition);
        assert!(leases.attach(4, t0).is_none(), "all partitions held");

        // Every partition's blocks are distinct engine blocks, never block 0.
        let mut seen = HashSet::new();
        for g in [&a, &b, &c] {
            for local in 1..=10 {
                let block = leases.engine_block(g.partition, local).unwrap();
                assert!(block > 0 && block <= 30 && seen.insert(block));
            }
            assert!(leases.engine_block(g.partition, 0).is_err());
            assert!(leases.engine_block(g.partition, 11).is_err());
        }

        // Sequence ids are namespaced per partition and map back.
        let sa = Leases::engine_seq(a.partition, 7).unwrap();
        let sb = Leases::engine_seq(b.partition, 7).unwrap();
        assert_ne!(sa, sb);
        assert_eq!(Leases::router_seq(sb), 7);
        assert!(Leases::engine_seq(0, 1 << 48).is_err());

        // A lease with a step in flight does not expire; an idle one does,
        // and whoever takes it over gets its sequences to release.
        let late = t0 + timeout * 2;
        assert_eq!(leases.begin(a.lease_id, t0), Some(a.partition));
        leases.track(a.lease_id, &[sa], &[]);
        leases.track(b.lease_id, &[sb], &[]);
        assert!(leases.renew(c.lease_id, late));
        let d = leases.attach(4, late).expect("b's lease is idle and old");
        assert_eq!(d.partition, b.partition);
        assert_eq!(d.stale, vec![sb]);
        assert!(leases.begin(b.lease_id, late).is_none(), "b's lease is gone");
        assert!(leases.attach(5, late).is_none(), "a is busy, c and d are fresh");
        leases.end(a.lease_id, late);

        // Attaching again replaces the router's own lease, same partition.
        let a2 = leases.attach(1, late).unwrap();
        assert_eq!(a2.partition, a.partition);
        assert_eq!(a2.stale, vec![sa]);
        assert!(!leases.renew(a.lease_id, late));
        assert!(leases.renew(a2.lease_id, late));
    }

    #[test]
    fn a_detached_lease_frees_its_partition_at_once() {
        let t0 = Instant::now();
        let mut leases = Leases::new(1 + 2 * 10, 1, Duration::from_secs(60)).unwrap();
        let a = leases.attach(1, t0).unwrap();
        let seq = Leases::engine_seq(a.partition, 3).unwrap();
        leases.track(a.lease_id, &[seq], &[]);
        assert!(leases.attach(2, t0).is_none(), "the one partition is held");
        assert_eq!(leases.detach(a.lease_id), Some(vec![seq]));
        assert!(leases.detach(a.lease_id).is_none(), "already given back");
        let b = leases.attach(2, t0).expect("free at once, no timeout");
        assert_eq!(b.partition, a.partition);
        assert!(b.stale.is_empty(), "detach handed the sequences over already");
    }

    #[test]
    fn too_few_blocks_for_the_routers_is_an_error() {
        let err = Leases::new(3, 4, Duration::from_secs(1)).err().unwrap();
        assert!(err.contains("--max-routers"), "{err}");
        assert!(Leases::new(10, 0, Duration::from_secs(1)).is_err());
    }
}
