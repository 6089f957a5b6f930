//! `/instances/add` and `/instances/remove`: authenticated with `X-API-Key` (compared in
//! constant time), carried out by the control thread, which publishes the new snapshot.

use super::control::{Command, ControlError};
use super::route::AdminAction;
use super::Worker;
use crate::config::Role;
use crate::http::ApiError;
use http::StatusCode;
use serde_json::Value;
use std::time::{Duration, Instant};

/// Whether a presented key equals a configured one (admin key, client API keys), in time
/// that does not depend on where they differ (`subtle`). Keys of different lengths are
/// unequal whatever their bytes.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

pub fn authorize(w: &Worker, key: Option<&str>) -> Result<(), ApiError> {
    let policy = w.policy();
    let Some(expected) = policy.admin_api_key.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "the admin API is disabled: no admin_api_key is configured",
        ));
    };
    let Some(key) = key else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "missing X-API-Key header",
        ));
    };
    if !constant_time_eq(key.as_bytes(), expected.as_bytes()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "invalid admin API key",
        ));
    }
    Ok(())
}

fn field<'a>(v: &'a Value, name: &'static str) -> Result<&'a str, ApiError> {
    v.get(name).and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request(format!("`{name}` is required (a string)")).with_param(name)
    })
}

/// `name`, or the field xpyd-proxy 1.2 called it (`instance` for `address`, `type` for
/// `role`): 1.2's admin scripts keep working.
fn field_or<'a>(
    v: &'a Value,
    name: &'static str,
    python: &'static str,
) -> Result<&'a str, ApiError> {
    match v.get(python).and_then(Value::as_str) {
        Some(s) if v.get(name).is_none() => Ok(s),
        _ => field(v, name),
    }
}

/// 1.2's answer line, kept beside ours: `Added 10.0.0.1:8200 to decode_instances.`
fn python_message(action: AdminAction, address: &str, role: &str) -> Option<String> {
    match action {
        AdminAction::AddInstance => Some(format!("Added {address} to {role}_instances.")),
        AdminAction::RemoveInstance if !role.is_empty() => {
            Some(format!("Removed {address} from {role}_instances."))
        }
        _ => None,
    }
}

pub async fn handle(w: &Worker, action: AdminAction, body: &[u8]) -> Result<Value, ApiError> {
    if action == AdminAction::SyncPrefixes {
        // Atomic stores into the shared index, here on the worker: no control round trip.
        return super::prefix_sync::apply(&w.topology(), body);
    }
    let v: Value = if body.is_empty() && action == AdminAction::Reload {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))?
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut message = None;
    let cmd = match action {
        AdminAction::AddInstance => {
            let role_name = field_or(&v, "role", "type")?.trim();
            let role: Role = role_name.parse().map_err(|e: crate::config::UnknownRole| {
                ApiError::bad_request(e.to_string()).with_param("role")
            })?;
            let address = field_or(&v, "address", "instance")?;
            message = python_message(action, address, role_name);
            let topo = w.topology();
            let model = match v.get("model").and_then(Value::as_str) {
                Some(m) => m.to_string(),
                None if topo.models.len() == 1 => topo.models[0].name.clone(),
                None => {
                    return Err(ApiError::bad_request("`model` is required").with_param("model"))
                }
            };
            let create_model = match v.get("create_model") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::bad_request("`create_model` must be a boolean")
                        .with_param("create_model"))
                }
            };
            Command::Add {
                address: address.to_string(),
                role,
                model,
                create_model,
                reply: tx,
            }
        }
        AdminAction::Reload => Command::Reload { reply: Some(tx) },
        AdminAction::SyncPrefixes => unreachable!("answered above"),
        AdminAction::RemoveInstance => {
            let address = field_or(&v, "address", "instance")?;
            let role = v.get("type").and_then(Value::as_str).unwrap_or("");
            message = python_message(action, address, role);
            Command::Remove {
                address: address.to_string(),
                reply: tx,
            }
        }
    };
    w.control
        .send(cmd)
        .map_err(|_| ApiError::unavailable("the control thread is not running"))?;
    // The admin path is rare: polling the reply keeps the worker's loop free meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match rx.try_recv() {
            Ok(Ok(mut v)) => {
                if let (Some(m), Some(obj)) = (message, v.as_object_mut()) {
                    obj.insert("message".into(), Value::String(m));
                }
                return Ok(v);
            }
            Ok(Err(e)) => return Err(refusal(e)),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                return Err(ApiError::unavailable(
                    "the control thread dropped the request",
                ))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) if Instant::now() > deadline => {
                return Err(ApiError::unavailable(
                    "the control thread did not answer in time",
                ))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                monoio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// The HTTP answer for a refused admin command.
fn refusal(e: ControlError) -> ApiError {
    match e {
        ControlError::NotFound(m) => ApiError::not_found(m),
        ControlError::Conflict(m) => {
            ApiError::new(StatusCode::CONFLICT, "invalid_request_error", m).with_code("conflict")
        }
        ControlError::Invalid(m) | ControlError::Reload(m) => ApiError::bad_request(m),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_is_eq() {
        use super::constant_time_eq as eq;
        assert!(eq(b"secret", b"secret"));
        assert!(eq(b"", b""));
        assert!(!eq(b"secret", b"secreT"), "last byte differs");
        assert!(!eq(b"secret", b"Secret"), "first byte differs");
    }

    #[test]
    fn keys_of_different_lengths_never_match() {
        use super::constant_time_eq as eq;
        assert!(!eq(b"secret", b"secret1"), "a longer key");
        assert!(!eq(b"secret1", b"secret"), "a shorter key");
        assert!(!eq(b"", b"x"));
        assert!(!eq(b"x", b""));
        // Lengths differing by multiples of 256 and 65,536, the extra bytes NUL: a
        // comparison that folds the length difference into a few bits, and pads the shorter
        // key with zeros, takes these for equal.
        for extra in [256usize, 65_536, 131_072] {
            let mut long = b"secret".to_vec();
            long.resize(6 + extra, 0);
            assert!(!eq(b"secret", &long), "+{extra} NUL bytes");
            assert!(!eq(&long, b"secret"), "-{extra} NUL bytes");
        }
    }
}
