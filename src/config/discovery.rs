//! DNS discovery's part of the config: `dns://HOST:PORT` entries in role lists (and as
//! `instances` addresses) and the `discovery:` section. Nothing is resolved here — DNS may be
//! down when the file is read; the control side follows the names (`crate::discovery`).

use super::reader::{type_name, Reader};
use super::role::Role;
use super::schema;
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Marks an entry for discovery: `dns://HOST:PORT` is one instance per address of HOST. A
/// plain `host:port` is always one instance, whatever its name resolves to.
pub const DNS_SCHEME: &str = "dns://";

/// A role-list entry written `dns://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    pub host: String,
    pub port: u16,
    pub role: Role,
}

impl DnsName {
    /// As written in the config.
    pub fn label(&self) -> String {
        format!("{DNS_SCHEME}{}:{}", self.host, self.port)
    }

    /// Parses `dns://HOST:PORT`; HOST a DNS name or an IP address.
    pub fn parse(s: &str, role: Role) -> Result<DnsName, String> {
        let s = s.trim();
        let rest = s.strip_prefix(DNS_SCHEME).unwrap_or(s);
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(format!("`{s}` has no port (expected dns://host:port)"));
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !is_dns_name(host) && host.parse::<IpAddr>().is_err() {
            return Err(format!("`{s}`: `{host}` is not a DNS name"));
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(DnsName {
                host: host.to_string(),
                port,
                role,
            }),
            _ => Err(format!("`{s}` has an invalid port `{port}`")),
        }
    }
}

/// Letters, digits, `-` and `_` in labels of at most 63, 253 in all; a trailing dot allowed.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// `discovery:`: how `dns://` entries are resolved. A reload applies all of it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveryConfig {
    /// Re-resolve each name this often, or sooner when its records' TTL runs out.
    pub interval: Duration,
    /// One lookup's time limit.
    pub timeout: Duration,
    /// DNS servers to ask; empty: the system's (`/etc/resolv.conf`, `/etc/hosts`).
    pub nameservers: Vec<SocketAddr>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(3),
            nameservers: Vec::new(),
        }
    }
}

impl Reader<'_> {
    /// Takes `s` if it is a `dns://` entry (true), reporting it if malformed.
    pub fn dns_name(&mut self, s: &str, path: &str, role: Role) -> bool {
        if !s.trim().starts_with(DNS_SCHEME) {
            return false;
        }
        match DnsName::parse(s, role) {
            Ok(n) => self.discovered.push((n, path.to_string())),
            Err(e) => self.problem(path, e),
        }
        true
    }

    /// The `dns://` entries read for the current model.
    pub fn take_discovered(&mut self) -> Vec<DnsName> {
        let taken = std::mem::take(&mut self.discovered);
        let names = taken.iter().map(|(n, _)| n.clone()).collect();
        self.all_discovered.extend(taken);
        names
    }

    /// A name is followed once in the file (its addresses serve one role of one model).
    pub fn check_unique_names(&mut self) {
        let mut seen = HashSet::new();
        for (n, path) in std::mem::take(&mut self.all_discovered) {
            if !seen.insert((n.host.clone(), n.port)) {
                self.problem(
                    &path,
                    format!(
                        "duplicate name `{}` (a name can serve one role of one model)",
                        n.label()
                    ),
                );
            }
        }
    }

    pub fn discovery_section(&mut self, top: &Map<String, Value>) -> DiscoveryConfig {
        let p = "discovery";
        let dc = self.section(top, p, schema::DISCOVERY);
        let d = DiscoveryConfig::default();
        DiscoveryConfig {
            interval: self.seconds(dc, p, "interval_seconds", d.interval.as_secs_f64()),
            timeout: self.seconds(dc, p, "timeout_seconds", d.timeout.as_secs_f64()),
            nameservers: self.nameservers(dc),
        }
    }

    /// `discovery.nameservers`: `ip` or `ip:port` (port 53 by default); not names (a DNS
    /// server has to be reachable without DNS).
    fn nameservers(&mut self, dc: Option<&Map<String, Value>>) -> Vec<SocketAddr> {
        let path = "discovery.nameservers";
        match dc.and_then(|m| m.get("nameservers")) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .filter_map(|(i, v)| {
                    let p = format!("{path}[{i}]");
                    let Value::String(s) = v else {
                        self.wrong_type(&p, "an IP address", v);
                        return None;
                    };
                    let parsed = parse_nameserver(s);
                    if parsed.is_none() {
                        self.problem(&p, format!("`{s}` is not an IP address or ip:port"));
                    }
                    parsed
                })
                .collect(),
            Some(other) => {
                self.problem(
                    path,
                    format!(
                        "expected a list of IP addresses, found {}",
                        type_name(other)
                    ),
                );
                Vec::new()
            }
        }
    }
}

fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    s.parse::<SocketAddr>().ok().or_else(|| {
        s.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn names_parse_and_bad_ones_say_why() {
        let n = DnsName::parse("dns://decode.vllm.svc.cluster.local:8200", Role::Decode).unwrap();
        assert_eq!(n.host, "decode.vllm.svc.cluster.local");
        assert_eq!(n.port, 8200);
        assert_eq!(n.label(), "dns://decode.vllm.svc.cluster.local:8200");
        assert!(DnsName::parse("dns://[::1]:8200", Role::Dual).is_ok());
        for (bad, why) in [
            ("dns://x.local", "no port"),
            ("dns://x.local:0", "invalid port"),
            ("dns://bad name:1", "not a DNS name"),
            ("dns://a..b:1", "not a DNS name"),
            ("dns://:1", "not a DNS name"),
        ] {
            let e = DnsName::parse(bad, Role::Dual).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(
            parse_nameserver("10.96.0.10"),
            Some("10.96.0.10:53".parse().unwrap())
        );
        assert_eq!(
            parse_nameserver("[::1]:5353"),
            Some("[::1]:5353".parse().unwrap())
        );
        assert_eq!(parse_nameserver("dns.local"), None);
    }

    #[test]
    fn dns_entries_are_followed_not_resolved() {
        let c = Config::from_yaml(
            "model: m\nprefill: [\"localhost:8100\"]\ndecode: [\"dns://decode.vllm.svc.cluster.local:8200\"]\ndiscovery:\n  interval_seconds: 2\n  nameservers: [\"127.0.0.1:5353\", \"10.96.0.10\"]\n",
        )
        .unwrap();
        let m = &c.models[0];
        // A plain name stays one instance; a dns:// entry is followed.
        assert_eq!(m.instances.len(), 1);
        assert_eq!(m.discovered.len(), 1);
        assert_eq!(m.discovered[0].role, Role::Decode);
        assert_eq!(c.discovery.interval, Duration::from_secs(2));
        assert_eq!(c.discovery.nameservers.len(), 2);
        assert!(c
            .summary()
            .contains("dns://decode.vllm.svc.cluster.local:8200"));

        let c = Config::from_yaml(
            "instances:\n  - {address: \"dns://p.local:1\", role: prefill, model: a}\n  - {address: \"dns://d.local:2\", role: decode, model: a}\n",
        )
        .unwrap();
        assert_eq!(c.models[0].discovered.len(), 2);
        assert!(c.models[0].instances.is_empty());

        let e = Config::from_yaml(
            "models:\n  - name: a\n    dual: [\"dns://x.local:1\", \"dns://x.local:1\", \"dns://bad name:1\", \"dns://y.local\"]\ndiscovery:\n  nameservers: [\"dns.local\"]\n",
        )
        .unwrap_err();
        let all = e.to_string();
        assert_eq!(e.problems.len(), 4, "{all}");
        assert!(
            all.contains("models[0].dual[1]") && all.contains("duplicate name"),
            "{all}"
        );
        assert!(all.contains("`bad name` is not a DNS name"), "{all}");
        assert!(all.contains("has no port"), "{all}");
        assert!(all.contains("discovery.nameservers[0]"), "{all}");
    }

    #[test]
    fn a_single_address_is_not_a_name() {
        let e = crate::config::parse_address("dns://x.local:1").unwrap_err();
        assert!(e.to_string().contains("followed through DNS"), "{e}");
    }
}
