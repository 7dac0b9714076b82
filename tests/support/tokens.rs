//! Signed user tokens for the verified identity mode: two Ed25519 test keys
//! (`tests/fixtures/identity/`, for tests only), their JWKS document, and
//! tokens with whatever claims a test needs, forged ones included.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The issuer the tests' tokens carry.
pub const ISSUER: &str = "https://login.test.invalid/";
/// The audience the tests' tokens name.
pub const AUDIENCE: &str = "firstcome-test";

/// One of the test keys (`a` or `b`), with its key id.
pub struct TestKey {
    /// Its key id in the JWKS.
    pub kid: &'static str,
    key: EncodingKey,
}

impl TestKey {
    /// The test key `name` (`a` or `b`).
    pub fn load(name: &'static str) -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/identity")
            .join(format!("ed25519-{name}.der"));
        let der = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self {
            kid: name,
            key: EncodingKey::from_ed_der(&der),
        }
    }

    /// Its public half as a JWK.
    pub fn jwk(&self) -> Jwk {
        let mut jwk = Jwk::from_encoding_key(&self.key, Algorithm::EdDSA).unwrap();
        jwk.common.key_id = Some(self.kid.to_owned());
        jwk
    }

    /// A token signed with this key carrying `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }

    /// A valid token for `user`: right issuer and audience, an hour to live.
    pub fn token_for(&self, user: &str) -> String {
        self.sign(&claims_for(user, 3_600))
    }
}

/// Claims for `user` expiring in `ttl_secs` (negative: expired).
pub fn claims_for(user: &str, ttl_secs: i64) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({ "sub": user, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + ttl_secs })
}

/// Writes a JWKS document of `keys` to `path`.
pub fn write_jwks(path: &Path, keys: &[&TestKey]) {
    let set = JwkSet {
        keys: keys.iter().map(|k| k.jwk()).collect(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&set).unwrap()).unwrap();
    // Replaced at once, as the kubelet swaps a mounted ConfigMap.
    std::fs::rename(&tmp, path).unwrap();
}

/// A fresh directory for a test's JWKS file.
pub fn jwks_path(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("firstcome-jwks-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("jwks.json")
}
