//! Node liveness from heartbeats. A node is departed when its heartbeat has not moved
//! for `timeout`, measured on this node's own monotonic clock, so clock skew between
//! nodes does not matter.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use calyx_ipam::model::NodeRecord;

pub struct Liveness {
    timeout: Duration,
    last_change: HashMap<String, (u64, Instant)>,
}

impl Liveness {
    pub fn new(timeout: Duration) -> Liveness {
        Liveness {
            timeout,
            last_change: HashMap::new(),
        }
    }

    /// Records the heartbeats seen now; forgets nodes no longer registered.
    pub fn observe(&mut self, nodes: &[NodeRecord], now: Instant) {
        let registered: std::collections::HashSet<&str> =
            nodes.iter().map(|n| n.name.as_str()).collect();
        self.last_change
            .retain(|name, _| registered.contains(name.as_str()));
        for node in nodes {
            match self.last_change.get_mut(&node.name) {
                Some((beat, since)) if *beat != node.heartbeat => {
                    *beat = node.heartbeat;
                    *since = now;
                }
                Some(_) => {}
                None => {
                    self.last_change
                        .insert(node.name.clone(), (node.heartbeat, now));
                }
            }
        }
    }

    pub fn is_live(&self, node: &str, now: Instant) -> bool {
        self.last_change
            .get(node)
            .is_some_and(|(_, since)| now.duration_since(*since) <= self.timeout)
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
        let mut live = Liveness::new(Duration::from_secs(30));
        let t0 = Instant::now();
        live.observe(&[node("a", 1), node("b", 1)], t0);
        live.observe(&[node("a", 2), node("b", 1)], t0 + Duration::from_secs(20));
        let t = t0 + Duration::from_secs(40);
        assert!(live.is_live("a", t));
        assert!(!live.is_live("b", t));
        assert!(!live.is_live("unknown", t));
        // It comes back when its heartbeat moves again.
        live.observe(&[node("a", 2), node("b", 2)], t);
        assert!(live.is_live("b", t));
    }
}
