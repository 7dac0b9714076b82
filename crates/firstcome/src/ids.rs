//! Validated identifiers. Every id that enters the system from outside (HTTP
//! path or body, a Kafka record) goes through `parse` once at the edge; the
//! rest of the code holds the newtype and never re-checks the string.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// Longest accepted `coupon_id` / `user_id`.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// The string is longer than [`MAX_ID_LEN`].
    #[error("{0} must be at most {MAX_ID_LEN} characters")]
    TooLong(&'static str),
    /// The string holds a character outside `[A-Za-z0-9_-]`.
    #[error("{0} may only contain A-Z, a-z, 0-9, '_' and '-'")]
    BadCharacter(&'static str),
    /// The string is not a UUID.
    #[error("{0} must be a UUID")]
    NotUuid(&'static str),
}

fn check_id(what: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty(what));
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(what));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(IdError::BadCharacter(what));
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `s`: 1–64 characters from `[A-Za-z0-9_-]`.
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check_id($what, &s)?;
                Ok(Self(s))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_id!(
    /// The id of a coupon campaign, chosen by the admin who creates it.
    CouponId,
    "coupon_id"
);
string_id!(
    /// The id of an end user, as the calling service knows them.
    UserId,
    "user_id"
);

/// The id the ingress gives an accepted issue request: a UUIDv7, so ids sort
/// roughly by acceptance time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(Uuid);

impl RequestId {
    /// A fresh UUIDv7.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a request id given by a client.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::NotUuid("request_id"))
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl From<Uuid> for RequestId {
    fn from(u: Uuid) -> Self {
        Self(u)
    }
}

impl RequestId {
    /// The id as text (hyphenated, lower case) in `buf`, without a
    /// formatter: keys and channel messages are built from it per record.
    pub fn encode<'b>(&self, buf: &'b mut [u8; 36]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode(&mut [0; 36]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_accept_the_documented_alphabet_up_to_64_characters() {
        assert!(CouponId::parse("summer-Sale_2026").is_ok());
        assert!(UserId::parse("a".repeat(64)).is_ok());
    }

    #[test]
    fn ids_reject_empty_long_and_foreign_characters() {
        assert_eq!(UserId::parse(""), Err(IdError::Empty("user_id")));
        assert_eq!(
            UserId::parse("a".repeat(65)),
            Err(IdError::TooLong("user_id"))
        );
        for bad in ["a b", "a:b", "a{b}", "ü", "a/b", "a.b"] {
            assert_eq!(
                CouponId::parse(bad),
                Err(IdError::BadCharacter("coupon_id")),
                "{bad}"
            );
        }
    }

    #[test]
    fn deserializing_an_id_validates_it() {
        assert!(serde_json::from_str::<UserId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<UserId>("\"not ok\"").is_err());
    }

    #[test]
    fn request_ids_round_trip_through_text() {
        let id = RequestId::new();
        assert_eq!(RequestId::parse(&id.to_string()), Ok(id));
        assert!(RequestId::parse("nope").is_err());
    }

    #[test]
    fn a_request_id_is_written_as_its_uuid_hyphenated_in_lower_case() {
        for _ in 0..100 {
            let id = RequestId::new();
            let text = id.as_uuid().hyphenated().to_string();
            assert_eq!(id.to_string(), text);
            assert_eq!(format!("{id}"), text);
        }
    }
}
