//! The capped group table of [`super`]: exact counts per group, a bounded number of groups.
//!
//! Eviction: while the table holds fewer than its cap, every new group is added. At the cap, a
//! new group evicts the group with the smallest count, the least recently seen among equal
//! counts, and starts at 1. The evicted group's events go to `dropped_events`, the eviction to
//! `dropped_groups`. A group that is evicted and seen again starts again from 1 (its earlier
//! events stay in `dropped_events`), so a reported count, first and last seen cover the time
//! since the group was last admitted: the count is a lower bound of its true count; groups
//! never evicted are exact. Only the bottom of the table churns: a group is evicted only while
//! it is the smallest and the least recent, so one that recurs before the newer, smaller
//! groups fill the table stays (a test: 50 groups recurring among 1,000 one-off groups with a
//! cap of 120 keep their exact counts). Deterministic: the outcome depends only on the order of
//! the records.
//!
//! Cost: a hash lookup per event; the order index (count, recency) exists only once the cap has
//! been reached, and then adds an ordered-map update per event.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use super::{Dropped, Group, Source};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct GroupKey {
    pub instance_id: String,
    pub source: Source,
    pub event_source: String,
    pub event_name: String,
}

#[derive(Debug)]
struct Slot {
    count: u64,
    first_seen: String,
    last_seen: String,
    advice: Option<String>,
    /// The table's event counter when this group last got an event (recency, unique).
    touched: u64,
}

#[derive(Debug)]
pub(super) struct GroupTable {
    cap: usize,
    map: HashMap<Rc<GroupKey>, Slot>,
    /// (count, touched) of every group, built when the cap is first reached.
    order: Option<BTreeMap<(u64, u64), Rc<GroupKey>>>,
    events: u64,
    dropped: Dropped,
}

impl GroupTable {
    pub fn new(cap: usize) -> GroupTable {
        GroupTable {
            cap: cap.max(1),
            map: HashMap::new(),
            order: None,
            events: 0,
            dropped: Dropped::default(),
        }
    }

    /// Counts one event. `advice` is kept from the group's first event only (the `FnOnce` is not
    /// called for later ones).
    pub fn add(
        &mut self,
        key: GroupKey,
        time: Option<String>,
        advice: impl FnOnce() -> Option<String>,
    ) {
        self.events += 1;
        let touched = self.events;
        let time = time.unwrap_or_default();
        if let Some(slot) = self.map.get_mut(&key) {
            if let Some(order) = &mut self.order
                && let Some(k) = order.remove(&(slot.count, slot.touched))
            {
                order.insert((slot.count + 1, touched), k);
            }
            slot.count += 1;
            slot.touched = touched;
            if !time.is_empty() {
                if slot.first_seen.is_empty() || time < slot.first_seen {
                    slot.first_seen.clone_from(&time);
                }
                if time > slot.last_seen {
                    slot.last_seen = time;
                }
            }
            return;
        }
        if self.map.len() >= self.cap {
            self.evict_smallest();
        }
        let key = Rc::new(key);
        if let Some(order) = &mut self.order {
            order.insert((1, touched), Rc::clone(&key));
        }
        self.map.insert(
            key,
            Slot {
                count: 1,
                first_seen: time.clone(),
                last_seen: time,
                advice: advice(),
                touched,
            },
        );
    }

    fn evict_smallest(&mut self) {
        let map = &self.map;
        let order = self.order.get_or_insert_with(|| {
            map.iter()
                .map(|(k, s)| ((s.count, s.touched), Rc::clone(k)))
                .collect()
        });
        if let Some((_, key)) = order.pop_first()
            && let Some(slot) = self.map.remove(&key)
        {
            self.dropped.groups += 1;
            self.dropped.events += slot.count;
        }
    }

    pub fn dropped(&self) -> Dropped {
        self.dropped
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The groups, by count (largest first), then by key. Built straight from the table (the
    /// order index is freed first, so every key is moved out of its `Rc`, never copied).
    pub fn into_groups(self) -> Vec<Group> {
        drop(self.order);
        let mut groups: Vec<Group> = self
            .map
            .into_iter()
            .map(|(k, s)| {
                let k = Rc::try_unwrap(k).unwrap_or_else(|k| (*k).clone());
                Group {
                    instance_id: k.instance_id,
                    source: k.source,
                    event_source: k.event_source,
                    event_name: k.event_name,
                    count: s.count,
                    first_seen: s.first_seen,
                    last_seen: s.last_seen,
                    advice: s.advice,
                }
            })
            .collect();
        groups.sort_unstable_by(|a, b| {
            b.count.cmp(&a.count).then_with(|| {
                (&a.instance_id, &a.source, &a.event_source, &a.event_name).cmp(&(
                    &b.instance_id,
                    &b.source,
                    &b.event_source,
                    &b.event_name,
                ))
            })
        });
        groups
    }
}
