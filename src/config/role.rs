//! What an instance does for its model: the one place a role is named and parsed.

use std::fmt;
use std::str::FromStr;

/// Also the simulated node's `--mode` (xpyd-dummy plays one role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Role {
    Prefill,
    Decode,
    Dual,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Prefill, Role::Decode, Role::Dual];
    pub const NAMES: [&'static str; 3] = ["prefill", "decode", "dual"];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Dual => "dual",
        }
    }
}

/// 1.8's spelling of `dual`, accepted wherever a role is named.
pub const AGGREGATED: &str = "aggregated";

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A word that is not a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRole(pub String);

impl fmt::Display for UnknownRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown role `{}` (expected prefill, decode or dual)",
            self.0
        )
    }
}

impl std::error::Error for UnknownRole {}

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        match s.trim() {
            // xpyd-proxy 1.8's name for a node that serves requests whole.
            AGGREGATED => Ok(Role::Dual),
            t => Role::ALL
                .into_iter()
                .find(|r| r.as_str() == t)
                .ok_or_else(|| UnknownRole(s.to_string())),
        }
    }
}

/// Which roles a model has instances in, and what is missing: a model needs prefill and
/// decode instances, or dual ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleGap {
    NoInstances,
    PrefillWithoutDecode,
    DecodeWithoutPrefill,
}

impl RoleGap {
    pub fn of(prefill: bool, decode: bool, dual: bool) -> Option<RoleGap> {
        match (prefill, decode, dual) {
            (false, false, false) => Some(RoleGap::NoInstances),
            (true, false, _) => Some(RoleGap::PrefillWithoutDecode),
            (false, true, false) => Some(RoleGap::DecodeWithoutPrefill),
            _ => None,
        }
    }

    /// The role list the problem is reported at (None: the model itself).
    pub fn at(self) -> Option<Role> {
        match self {
            RoleGap::NoInstances => None,
            RoleGap::PrefillWithoutDecode => Some(Role::Prefill),
            RoleGap::DecodeWithoutPrefill => Some(Role::Decode),
        }
    }

    pub fn message(self, model: &str) -> String {
        match self {
            RoleGap::NoInstances => format!(
                "model `{model}` has no instances: list `prefill` and `decode`, or `dual`"
            ),
            RoleGap::PrefillWithoutDecode => {
                format!("model `{model}` has prefill instances but no decode instances")
            }
            RoleGap::DecodeWithoutPrefill => format!(
                "model `{model}` has decode instances but no prefill instances (list `dual` instances for single-pass serving)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(" dual ".parse::<Role>(), Ok(Role::Dual));
        assert_eq!("aggregated".parse::<Role>(), Ok(Role::Dual));
        assert_eq!(
            "Prefill".parse::<Role>().unwrap_err().to_string(),
            "unknown role `Prefill` (expected prefill, decode or dual)"
        );
    }

    #[test]
    fn role_gaps() {
        assert_eq!(RoleGap::of(true, true, false), None);
        assert_eq!(RoleGap::of(false, false, true), None);
        assert_eq!(RoleGap::of(true, true, true), None);
        assert_eq!(RoleGap::of(false, false, false), Some(RoleGap::NoInstances));
        assert_eq!(
            RoleGap::of(true, false, true),
            Some(RoleGap::PrefillWithoutDecode)
        );
        assert_eq!(
            RoleGap::of(false, true, false),
            Some(RoleGap::DecodeWithoutPrefill)
        );
        assert_eq!(RoleGap::of(false, true, true), None);
    }
}
