//! Role lists: `prefill:` / `decode:` / `dual:` as a list of addresses, or the topology
//! form (`nodes`, `tp_size`, `dp_size`, `world_size_per_node`) expanded into one instance
//! per tensor-parallel group (docs/config.md).

use super::address::parse_address;
use super::reader::{join, Reader};
use super::role::{Role, RoleGap, AGGREGATED};
use super::schema::TOPOLOGY_KEYS;
use super::InstanceConfig;
use serde_json::{Map, Value};

/// Where the instances of a topology are: `(node index, port offset from its base port)`,
/// in order; or why the arithmetic does not work out. Pure, for unit tests.
pub fn tp_dp_layout(
    tp: u64,
    dp: u64,
    wspn: u64,
    nodes: usize,
) -> Result<Vec<(usize, u64)>, String> {
    let gpus = tp * dp;
    if !gpus.is_multiple_of(wspn) {
        return Err(format!("tp_size × dp_size = {gpus} GPUs is not a whole number of nodes of world_size_per_node = {wspn}"));
    }
    let used = (gpus / wspn) as usize;
    if used > nodes {
        return Err(format!("tp_size × dp_size = {gpus} GPUs needs {used} nodes of {wspn} GPUs, but only {nodes} are listed"));
    }
    if tp <= wspn {
        // Several TP groups per node, on consecutive ports.
        if !wspn.is_multiple_of(tp) {
            return Err(format!(
                "world_size_per_node = {wspn} is not a multiple of tp_size = {tp}"
            ));
        }
        Ok((0..used)
            .flat_map(|n| (0..wspn / tp).map(move |k| (n, k)))
            .collect())
    } else {
        // One TP group spans several nodes; its first node serves it.
        if !tp.is_multiple_of(wspn) {
            return Err(format!(
                "tp_size = {tp} is not a multiple of world_size_per_node = {wspn}"
            ));
        }
        let span = (tp / wspn) as usize;
        Ok((0..dp as usize).map(|i| (i * span, 0)).collect())
    }
}

/// Whether the mapping lists instances under `key`; anything written counts (a wrong type
/// is reported on its own).
pub fn listed(m: &Map<String, Value>, key: &str) -> bool {
    match m.get(key) {
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Null) | None => false,
        Some(_) => true,
    }
}

impl Reader<'_> {
    /// The instances of a mapping's `prefill` / `decode` / `dual` keys.
    pub fn model_roles(&mut self, m: &Map<String, Value>, path: &str) -> Vec<InstanceConfig> {
        let mut out = Vec::new();
        for role in Role::ALL {
            if let Some(v) = m.get(role.as_str()) {
                self.role_list(v, &join(path, role.as_str()), role, &mut out);
            }
        }
        if let Some(v) = m.get(AGGREGATED) {
            self.role_list(v, &join(path, AGGREGATED), Role::Dual, &mut out);
        }
        out
    }

    /// A model needs prefill + decode, or dual; judged by what was written so that a bad
    /// address is not also reported as a missing role.
    pub fn check_roles(&mut self, m: &Map<String, Value>, path: &str, name: &str) {
        let listed = |key: &str| listed(m, key);
        let gap = RoleGap::of(
            listed("prefill"),
            listed("decode"),
            listed("dual") || listed(AGGREGATED),
        );
        if let Some(gap) = gap {
            let at = match gap.at() {
                Some(role) => join(path, role.as_str()),
                None => path.to_string(),
            };
            self.problem(&at, gap.message(name));
        }
    }

    /// A role list: addresses, or the topology form.
    fn role_list(&mut self, v: &Value, path: &str, role: Role, out: &mut Vec<InstanceConfig>) {
        match v {
            Value::Null => {}
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    match item {
                        Value::String(s) => self.address(s, &p, role, out),
                        other => self.wrong_type(&p, "an address string host:port", other),
                    }
                }
            }
            Value::Object(_) => self.topology(v, path, role, out),
            Value::String(s) => self.problem(
                path,
                format!("expected a list of addresses; write [\"{s}\"]"),
            ),
            other => self.wrong_type(path, "a list of addresses or a topology mapping", other),
        }
    }

    pub fn address(&mut self, s: &str, path: &str, role: Role, out: &mut Vec<InstanceConfig>) {
        if self.dns_name(s, path, role) {
            return;
        }
        match parse_address(s) {
            Ok(sa) => out.push(InstanceConfig {
                address: s.trim().to_string(),
                socket_addr: sa,
                role,
            }),
            Err(e) => self.problem(path, e),
        }
    }

    /// A positive integer the topology form needs.
    fn size(&mut self, m: &Map<String, Value>, path: &str, key: &str) -> Option<u64> {
        let Some(v) = m.get(key) else {
            self.problem(path, format!("topology form needs `{key}`"));
            return None;
        };
        match v.as_i64() {
            Some(x) if x > 0 => Some(x as u64),
            Some(x) => {
                self.problem(
                    &join(path, key),
                    format!("must be a positive integer, got {x}"),
                );
                None
            }
            None => {
                self.wrong_type(&join(path, key), "a positive integer", v);
                None
            }
        }
    }

    fn topology(&mut self, v: &Value, path: &str, role: Role, out: &mut Vec<InstanceConfig>) {
        let Some(m) = self.mapping(v, path, TOPOLOGY_KEYS) else {
            return;
        };
        let nodes: Vec<String> = match m.get("nodes") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .filter_map(|(i, n)| match n {
                    Value::String(s) => Some(s.trim().to_string()),
                    other => {
                        self.wrong_type(&format!("{path}.nodes[{i}]"), "an address string", other);
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.wrong_type(&join(path, "nodes"), "a list of host:base_port", other);
                return;
            }
            None => {
                self.problem(
                    path,
                    "topology form needs `nodes` (a list of host:base_port)",
                );
                return;
            }
        };
        let (tp, dp, wspn) = (
            self.size(m, path, "tp_size"),
            self.size(m, path, "dp_size"),
            self.size(m, path, "world_size_per_node"),
        );
        let (Some(tp), Some(dp), Some(wspn)) = (tp, dp, wspn) else {
            return;
        };
        if nodes.is_empty() {
            self.problem(&join(path, "nodes"), "no nodes listed");
            return;
        }
        let layout = match tp_dp_layout(tp, dp, wspn, nodes.len()) {
            Ok(l) => l,
            Err(e) => return self.problem(path, e),
        };
        // Every node a group spans must be a valid address, not only the one serving it.
        let used = (tp * dp / wspn) as usize;
        let mut bases = Vec::new();
        for (i, n) in nodes.iter().enumerate().take(used) {
            match parse_address(n) {
                Ok(sa) => bases.push((n.rsplit_once(':').map_or("", |x| x.0).to_string(), sa)),
                Err(e) => self.problem(&format!("{path}.nodes[{i}]"), e),
            }
        }
        if bases.len() < used {
            return;
        }
        for (node, offset) in layout {
            let (host, base) = &bases[node];
            let port = u16::try_from(offset)
                .ok()
                .and_then(|k| base.port().checked_add(k));
            let Some(port) = port else {
                return self.problem(path, format!("port range from {} overflows", base.port()));
            };
            let mut sa = *base;
            sa.set_port(port);
            out.push(InstanceConfig {
                address: format!("{host}:{port}"),
                socket_addr: sa,
                role,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tp_below_node_size_packs_groups_on_consecutive_ports() {
        // 8 GPUs per node, TP 2, DP 8: two nodes, four groups each.
        let l = tp_dp_layout(2, 8, 8, 3).unwrap();
        assert_eq!(
            l,
            [
                (0, 0),
                (0, 1),
                (0, 2),
                (0, 3),
                (1, 0),
                (1, 1),
                (1, 2),
                (1, 3)
            ]
        );
    }

    #[test]
    fn tp_equal_and_above_node_size() {
        assert_eq!(tp_dp_layout(8, 2, 8, 2).unwrap(), [(0, 0), (1, 0)]);
        // TP 16 over 8-GPU nodes: each group spans two nodes, served by the first.
        assert_eq!(tp_dp_layout(16, 2, 8, 4).unwrap(), [(0, 0), (2, 0)]);
    }

    #[test]
    fn arithmetic_that_does_not_work_out() {
        assert!(tp_dp_layout(3, 1, 8, 1)
            .unwrap_err()
            .contains("whole number"));
        assert!(tp_dp_layout(8, 4, 8, 2)
            .unwrap_err()
            .contains("only 2 are listed"));
        assert!(tp_dp_layout(3, 8, 8, 3)
            .unwrap_err()
            .contains("not a multiple of tp_size"));
        assert!(tp_dp_layout(12, 2, 8, 3)
            .unwrap_err()
            .contains("not a multiple of world_size"));
    }
}
