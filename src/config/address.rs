//! Instance addresses: `host:port`, names resolved once (at load, and when the admin API
//! adds an instance), so that the workers only ever see socket addresses.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};

/// Why an address is not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    NoPort(String),
    NoHost(String),
    /// `http://host:port`: a URL where an address is expected.
    Scheme {
        address: String,
        scheme: String,
        rest: String,
    },
    BadPort {
        address: String,
        port: String,
    },
    PortZero(String),
    /// `dns://host:port` where one address is expected (the admin API, a topology node).
    Discovery(String),
    Unresolved {
        address: String,
        host: String,
    },
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::NoPort(s) => write!(f, "address `{s}` has no port (expected host:port)"),
            AddressError::NoHost(s) => write!(f, "address `{s}` has no host (expected host:port)"),
            AddressError::Scheme {
                address,
                scheme,
                rest,
            } => write!(
                f,
                "address `{address}` has a scheme: drop `{scheme}://` and write `{rest}` (host:port)"
            ),
            AddressError::BadPort { address, port } => {
                write!(f, "address `{address}` has an invalid port `{port}`")
            }
            AddressError::PortZero(s) => write!(f, "address `{s}`: port 0 is not a reachable port"),
            AddressError::Discovery(s) => write!(
                f,
                "`{s}` names a set of instances followed through DNS: write it in a role list or an `instances` address of the config file (docs/config.md), not here"
            ),
            AddressError::Unresolved { address, host } => {
                write!(f, "address `{address}`: host `{host}` does not resolve")
            }
        }
    }
}

impl std::error::Error for AddressError {}

impl From<AddressError> for String {
    fn from(e: AddressError) -> String {
        e.to_string()
    }
}

/// Splits `host:port` (IPv6 hosts in brackets) and checks the port, without resolving.
pub fn split_address(s: &str) -> Result<(&str, u16), AddressError> {
    let s = s.trim();
    if s.starts_with(super::DNS_SCHEME) {
        return Err(AddressError::Discovery(s.to_string()));
    }
    if let Some((scheme, rest)) = s.split_once("://") {
        return Err(AddressError::Scheme {
            address: s.to_string(),
            scheme: scheme.to_string(),
            rest: rest.trim_end_matches('/').to_string(),
        });
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(AddressError::NoPort(s.to_string()));
    };
    if host.is_empty() {
        return Err(AddressError::NoHost(s.to_string()));
    }
    let port_n: u16 = port.parse().map_err(|_| AddressError::BadPort {
        address: s.to_string(),
        port: port.to_string(),
    })?;
    if port_n == 0 {
        return Err(AddressError::PortZero(s.to_string()));
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port_n))
}

/// Parses `host:port`, resolving names (`localhost`) to the first address.
pub fn parse_address(s: &str) -> Result<SocketAddr, AddressError> {
    let (host, port) = split_address(s)?;
    let unresolved = || AddressError::Unresolved {
        address: s.trim().to_string(),
        host: host.to_string(),
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|_| unresolved())?
        .next()
        .ok_or_else(unresolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_addresses() {
        assert_eq!(
            parse_address(" 127.0.0.1:8100 ").unwrap(),
            "127.0.0.1:8100".parse().unwrap()
        );
        assert_eq!(
            parse_address("[::1]:9").unwrap(),
            "[::1]:9".parse().unwrap()
        );
        assert_eq!(split_address("node-a:81").unwrap(), ("node-a", 81));
    }

    #[test]
    fn each_mistake_has_its_error() {
        assert_eq!(
            parse_address("10.0.0.1"),
            Err(AddressError::NoPort("10.0.0.1".into()))
        );
        assert_eq!(
            parse_address("http://127.0.0.1:8100/").unwrap_err().to_string(),
            "address `http://127.0.0.1:8100/` has a scheme: drop `http://` and write `127.0.0.1:8100` (host:port)"
        );
        assert_eq!(
            parse_address(":80"),
            Err(AddressError::NoHost(":80".into()))
        );
        assert!(matches!(
            parse_address("h:http"),
            Err(AddressError::BadPort { .. })
        ));
        assert!(matches!(
            parse_address("h:70000"),
            Err(AddressError::BadPort { .. })
        ));
        assert_eq!(
            parse_address("127.0.0.1:0"),
            Err(AddressError::PortZero("127.0.0.1:0".into()))
        );
        assert_eq!(
            parse_address("127.0.0.1:0").unwrap_err().to_string(),
            "address `127.0.0.1:0`: port 0 is not a reachable port"
        );
    }
}
