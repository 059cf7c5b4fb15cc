//! Node liveness from heartbeats. A node is departed when its heartbeat has not moved
//! for `timeout`, measured on this node's own monotonic clock (so clock skew between
//! nodes does not matter), *and* this node's own heartbeat has moved at least
//! `OWN_BEATS` times meanwhile: proof that the datastore took and showed heartbeats all
//! along. During a datastore outage (etcd down or frozen) no heartbeat moves, not even
//! ours, so no node is dropped and no route is taken away from running pods.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use calyx_ipam::model::NodeRecord;

/// Own heartbeats seen while another node's stood still before that node is judged:
/// in that time a live node, beating as often as we do, has beaten too.
const OWN_BEATS: u64 = 3;

pub struct Liveness {
    me: String,
    timeout: Duration,
    /// Per node: the heartbeat last seen, when it last moved, and our own heartbeat then.
    last_change: HashMap<String, (u64, Instant, u64)>,
    own_heartbeat: u64,
}

impl Liveness {
    pub fn new(me: &str, timeout: Duration) -> Liveness {
        Liveness {
            me: me.to_string(),
            timeout,
            last_change: HashMap::new(),
            own_heartbeat: 0,
        }
    }

    /// Records the heartbeats seen now; forgets nodes no longer registered.
    pub fn observe(&mut self, nodes: &[NodeRecord], now: Instant) {
        if let Some(me) = nodes.iter().find(|n| n.name == self.me) {
            self.own_heartbeat = me.heartbeat;
        }
        let own = self.own_heartbeat;
        let registered: std::collections::HashSet<&str> =
            nodes.iter().map(|n| n.name.as_str()).collect();
        self.last_change
            .retain(|name, _| registered.contains(name.as_str()));
        for node in nodes {
            match self.last_change.get_mut(&node.name) {
                Some((beat, since, own_then)) if *beat != node.heartbeat => {
                    *beat = node.heartbeat;
                    *since = now;
                    *own_then = own;
                }
                Some(_) => {}
                None => {
                    self.last_change
                        .insert(node.name.clone(), (node.heartbeat, now, own));
                }
            }
        }
    }

    pub fn is_live(&self, node: &str, now: Instant) -> bool {
        self.last_change
            .get(node)
            .is_some_and(|(_, since, own_then)| {
                now.duration_since(*since) <= self.timeout
                    || self.own_heartbeat.saturating_sub(*own_then) < OWN_BEATS
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, heartbeat: u64) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            underlay_ip: "192.0.2.1".parse().unwrap(),
            vtep_ipv4: None,
            vtep_ipv6: None,
            vtep_mac: "66:00:00:00:00:01".into(),
            heartbeat,
        }
    }

    #[test]
    fn a_node_whose_heartbeat_stops_departs_after_the_timeout() {
        let mut live = Liveness::new("me", Duration::from_secs(30));
        let t0 = Instant::now();
        live.observe(&[node("me", 1), node("a", 1), node("b", 1)], t0);
        live.observe(
            &[node("me", 5), node("a", 2), node("b", 1)],
            t0 + Duration::from_secs(20),
        );
        let t = t0 + Duration::from_secs(40);
        live.observe(&[node("me", 9), node("a", 2), node("b", 1)], t);
        assert!(live.is_live("a", t));
        assert!(!live.is_live("b", t));
        assert!(!live.is_live("unknown", t));
        // It comes back when its heartbeat moves again.
        live.observe(&[node("me", 9), node("a", 2), node("b", 2)], t);
        assert!(live.is_live("b", t));
    }

    #[test]
    fn no_node_departs_while_our_own_heartbeat_stands_still_too() {
        let mut live = Liveness::new("me", Duration::from_secs(30));
        let t0 = Instant::now();
        live.observe(&[node("me", 1), node("b", 1)], t0);
        // The datastore stops answering: nobody's heartbeat moves, ours neither.
        let later = t0 + Duration::from_secs(600);
        live.observe(&[node("me", 2), node("b", 1)], later);
        assert!(live.is_live("b", later), "dropped during an outage");
        // Back: ours moves again; b, dead, does not, and goes after OWN_BEATS of ours.
        live.observe(&[node("me", 4), node("b", 1)], later);
        assert!(!live.is_live("b", later));
    }
}
