//! What the store holds, and how each object is checked when it is read back.
//!
//! ```text
//! PREFIX/blobs/<blake3>              contents: output files, and each attempt's manifest (named by its key)
//! PREFIX/entries/<stage>/<key>       a check stage's signed success with `key`: its outputs (create-only)
//! PREFIX/ledger/<env>/<stage>        a deploy stage's signed latest attempt in `env`, with the outputs of a
//!                                    success (compare-and-swap: a deploy's outputs are live state, so they
//!                                    belong to the attempt, not to the key)
//! PREFIX/history/<env>/<stage>/<seq> every ledger record ever written, under its sequence number (create-only):
//!                                    a head replaced by an older record (a replay) is found out by a newer
//!                                    one here, as long as the bucket keeps these objects (docs/remote.md)
//! PREFIX/leases/<env>/<stage>        who deploys `stage` in `env` now, until when (create, then swap)
//! ```
//!
//! Entries and ledger records are envelopes: the body's exact bytes, signed (see `sign`), so nothing has to
//! be re-encoded to be checked. A body names what it is about (stage, key, environment) and the reader
//! checks that against the name it asked for, so a valid object copied to another name is refused.

use crate::cache::archive::OutputDoc;
use crate::fresh::State;
use crate::sign::{PrivateKey, PublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub(crate) const VERSION: u32 = 1;
const FORMAT: &str = "kkpipe-remote";
/// No entry or record is larger (a stage's output list is far smaller).
pub(crate) const MAX_OBJECT: usize = 16 << 20;

pub(crate) fn blob(hash: &str) -> String {
    format!("blobs/{hash}")
}
pub(crate) fn entry(stage: &str, key: &str) -> String {
    format!("entries/{stage}/{key}")
}
pub(crate) fn ledger(env: &str, stage: &str) -> String {
    format!("ledger/{env}/{stage}")
}
/// Where the ledger record with `seq` is kept for good; zero-padded so names sort by sequence.
pub(crate) fn history(env: &str, stage: &str, seq: u64) -> String {
    format!("{}/{seq:020}", history_of(env, stage))
}
pub(crate) fn history_of(env: &str, stage: &str) -> String {
    format!("history/{env}/{stage}")
}
pub(crate) fn lease(env: &str, stage: &str) -> String {
    format!("leases/{env}/{stage}")
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    format: String,
    kind: String,
    body: String,
    signer: String,
    signature: String,
}

/// A signed object's body.
pub(crate) trait Signed: Serialize + DeserializeOwned {
    const KIND: &'static str;
}

/// A successful stage run, shared: what a hit on another runner restores.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EntryBody {
    pub version: u32,
    pub stage: String,
    /// The stage key; the manifest is the blob of that name.
    pub key: String,
    pub outputs: Vec<OutputDoc>,
    pub duration_ms: i64,
    pub commit: Option<String>,
    pub who: String,
    pub created_ms: i64,
}

impl Signed for EntryBody {
    const KIND: &'static str = "entry";
}

/// The latest deploy attempt of a stage in an environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LedgerBody {
    pub version: u32,
    pub env: String,
    pub stage: String,
    /// The ledger's order: each record is one more than the one it replaced.
    pub seq: u64,
    pub key: String,
    /// `running` while the deploy runs: read as interrupted by anyone who finds it without a live lease.
    pub state: State,
    pub who: String,
    pub at_ms: i64,
    pub commit: Option<String>,
    /// A success's outputs (none for other states).
    #[serde(default)]
    pub outputs: Vec<OutputDoc>,
    #[serde(default)]
    pub duration_ms: i64,
    /// Branch, dirty tree, actor and CI run of the deploy (absent from records of kkpipe before 0.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::fresh::Audit>,
}

impl Signed for LedgerBody {
    const KIND: &'static str = "ledger";
}

/// A deploy lease (not signed: it only keeps trusted writers apart, and anyone who can write the store can
/// delete it anyway).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub holder: String,
    pub who: String,
    /// Unix milliseconds by the holder's clock; renewed while the stage runs.
    pub expires_ms: i64,
    #[serde(default)]
    pub released: bool,
    /// The holder's `lease_seconds`, in milliseconds: a waiter honours the longer of this and its own (0 from a
    /// kkpipe that did not write it).
    #[serde(default)]
    pub ttl_ms: i64,
}

pub(crate) fn seal<T: Signed>(body: &T, key: &PrivateKey) -> Vec<u8> {
    let bytes = serde_json::to_vec(body).expect("serializable");
    let env = Envelope {
        format: FORMAT.into(),
        kind: T::KIND.into(),
        signature: B64.encode(key.sign(T::KIND, &bytes)),
        body: B64.encode(&bytes),
        signer: key.public().to_string(),
    };
    serde_json::to_vec_pretty(&env).expect("serializable")
}

/// Why a stored object is not believed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refused {
    #[error("it is not a kkpipe {0} (or from a newer kkpipe)")]
    Malformed(&'static str),
    #[error("it is signed by `{0}`, which is not in `trusted_keys`")]
    Untrusted(String),
    #[error("its signature does not verify")]
    BadSignature,
    #[error("it is about {0}, not what its name says")]
    Misplaced(String),
}

/// The body of a stored object, if it is signed by a trusted key.
pub(crate) fn open<T: Signed>(bytes: &[u8], trusted: &[PublicKey]) -> Result<T, Refused> {
    if bytes.len() > MAX_OBJECT {
        return Err(Refused::Malformed(T::KIND));
    }
    let env: Envelope = serde_json::from_slice(bytes).map_err(|_| Refused::Malformed(T::KIND))?;
    if env.format != FORMAT || env.kind != T::KIND {
        return Err(Refused::Malformed(T::KIND));
    }
    let signer = PublicKey::parse(&env.signer).map_err(|_| Refused::Malformed(T::KIND))?;
    if !trusted.contains(&signer) {
        return Err(Refused::Untrusted(env.signer));
    }
    let body = B64.decode(&env.body).map_err(|_| Refused::Malformed(T::KIND))?;
    let sig = B64.decode(&env.signature).map_err(|_| Refused::BadSignature)?;
    if !signer.verifies(T::KIND, &body, &sig) {
        return Err(Refused::BadSignature);
    }
    serde_json::from_slice(&body).map_err(|_| Refused::Malformed(T::KIND))
}

/// The body of a stored object without checking who signed it: only for retention and display, never for a
/// decision.
pub(crate) fn peek<T: Signed>(bytes: &[u8]) -> Option<T> {
    let env: Envelope = serde_json::from_slice(bytes).ok()?;
    (env.kind == T::KIND).then_some(())?;
    serde_json::from_slice(&B64.decode(&env.body).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> LedgerBody {
        LedgerBody {
            version: VERSION,
            env: "prod".into(),
            stage: "apply".into(),
            seq: 3,
            key: "k".into(),
            state: State::Success,
            who: "ci".into(),
            at_ms: 1,
            commit: None,
            outputs: Vec::new(),
            duration_ms: 0,
            audit: None,
        }
    }

    #[test]
    fn a_sealed_record_opens_only_with_its_signer_trusted_and_untouched() {
        let k = PrivateKey::generate();
        let sealed = seal(&body(), &k);
        let opened: LedgerBody = open(&sealed, &[k.public()]).unwrap();
        assert_eq!(opened.seq, 3);
        assert!(matches!(open::<LedgerBody>(&sealed, &[PrivateKey::generate().public()]), Err(Refused::Untrusted(_))));
        assert!(matches!(open::<EntryBody>(&sealed, &[k.public()]), Err(Refused::Malformed(_))));
        // Change one byte of the body (the seq) and keep the signature.
        let mut env: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        let mut b = body();
        b.seq = 4;
        env["body"] = B64.encode(serde_json::to_vec(&b).unwrap()).into();
        let forged = serde_json::to_vec(&env).unwrap();
        assert!(matches!(open::<LedgerBody>(&forged, &[k.public()]), Err(Refused::BadSignature)));
    }
}
