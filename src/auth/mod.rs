//! Signatures, all checked in constant time: channel authorisation (`socket_id:channel[:data]`),
//! user sign-in (`socket_id::user::user_data`) and Pusher HTTP API request signing.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The hex HMAC-SHA256 of `message` with `secret`.
pub fn sign(secret: &str, message: &str) -> String {
    hex::encode(mac(secret, message).finalize().into_bytes())
}

fn mac(secret: &str, message: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(message.as_bytes());
    m
}

/// Whether `signature_hex` is the HMAC of `message`, compared in constant time.
pub fn verify(secret: &str, message: &str, signature_hex: &str) -> bool {
    let Ok(given) = hex::decode(signature_hex) else { return false };
    mac(secret, message).verify_slice(&given).is_ok()
}

/// Checks a subscribe `auth` string (`key:signature`).
pub fn verify_channel(
    app_key: &str,
    secret: &str,
    socket_id: &str,
    channel: &str,
    channel_data: Option<&str>,
    auth: &str,
) -> bool {
    let Some((key, signature)) = auth.split_once(':') else { return false };
    if key != app_key {
        return false;
    }
    let message = match channel_data {
        Some(data) => format!("{socket_id}:{channel}:{data}"),
        None => format!("{socket_id}:{channel}"),
    };
    verify(secret, &message, signature)
}

/// Checks a `pusher:signin` `auth` string.
pub fn verify_signin(app_key: &str, secret: &str, socket_id: &str, user_data: &str, auth: &str) -> bool {
    let Some((key, signature)) = auth.split_once(':') else { return false };
    key == app_key && verify(secret, &format!("{socket_id}::user::{user_data}"), signature)
}

/// Why an API request was refused (401 unless noted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiAuthError {
    #[error("missing query parameter {0}")]
    Missing(&'static str),
    #[error("duplicate query parameter {0}")]
    Duplicate(String),
    #[error("auth_key does not match the app")]
    WrongKey,
    #[error("auth_version must be 1.0")]
    Version,
    #[error("auth_timestamp is not within {0} seconds of the server's clock")]
    Timestamp(u64),
    #[error("body_md5 is required with a body")]
    BodyMd5Missing,
    #[error("body_md5 does not match the body")]
    BodyMd5Mismatch,
    #[error("invalid signature")]
    Signature,
    /// A decoded parameter holds `&` or `=`: the joined string to sign would then read as other
    /// parameters, so one signature would verify another query. No Pusher SDK sends one.
    #[error("query parameter {0} contains an encoded '&' or '='")]
    Ambiguous(String),
}

/// A request as the signature sees it.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The raw query string (without `?`).
    pub query: &'a str,
    pub body: &'a [u8],
}

/// The decoded query parameters, refusing duplicates (which would make the signed string
/// ambiguous).
pub fn query_params(query: &str) -> Result<Vec<(String, String)>, ApiAuthError> {
    let params: Vec<(String, String)> =
        form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    // Duplicates are found by sorting, not by comparing each key with all before it: this runs
    // before the signature is checked, and the quadratic scan let one unsigned 64 KB query
    // (hyper's URI limit, ~14 000 keys) cost a large fraction of a second of CPU.
    let mut keys: Vec<&str> = params.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(ApiAuthError::Duplicate(pair[0].chars().take(32).collect()));
    }
    // The signature is over the decoded pairs joined with `&` and `=`; a decoded key or value
    // holding either makes that join ambiguous (`a=x%26b%3Dy` would sign as `a=x&b=y`).
    if let Some((k, _)) = params.iter().find(|(k, v)| k.contains(['&', '=']) || v.contains(['&', '='])) {
        return Err(ApiAuthError::Ambiguous(k.chars().take(32).collect()));
    }
    Ok(params)
}

/// Verifies Pusher request signing: `auth_key`, `auth_timestamp` within `tolerance_s` of `now`,
/// `auth_version=1.0`, `body_md5` (required with a body) and `auth_signature` over
/// `METHOD\npath\nsorted query`.
pub fn verify_api_request(
    app_key: &str,
    secret: &str,
    req: &SignedRequest<'_>,
    now_unix: u64,
    tolerance_s: u64,
) -> Result<(), ApiAuthError> {
    let params = query_params(req.query)?;
    let get = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let key = get("auth_key").ok_or(ApiAuthError::Missing("auth_key"))?;
    let timestamp = get("auth_timestamp").ok_or(ApiAuthError::Missing("auth_timestamp"))?;
    let signature = get("auth_signature").ok_or(ApiAuthError::Missing("auth_signature"))?;
    if let Some(version) = get("auth_version") {
        if version != "1.0" {
            return Err(ApiAuthError::Version);
        }
    }
    if key != app_key {
        return Err(ApiAuthError::WrongKey);
    }
    let ts: u64 = timestamp.parse().map_err(|_| ApiAuthError::Timestamp(tolerance_s))?;
    if ts.abs_diff(now_unix) > tolerance_s {
        return Err(ApiAuthError::Timestamp(tolerance_s));
    }
    match get("body_md5") {
        Some(md5) if !md5.eq_ignore_ascii_case(&hex::encode(Md5::digest(req.body))) => {
            return Err(ApiAuthError::BodyMd5Mismatch)
        }
        Some(_) => {}
        None if !req.body.is_empty() => return Err(ApiAuthError::BodyMd5Missing),
        None => {}
    }
    let mut signed: Vec<(&str, &str)> =
        params.iter().filter(|(k, _)| k != "auth_signature").map(|(k, v)| (k.as_str(), v.as_str())).collect();
    signed.sort_unstable();
    let mut canonical = String::with_capacity(req.query.len() + req.path.len() + 8);
    canonical.push_str(&req.method.to_ascii_uppercase());
    canonical.push('\n');
    canonical.push_str(req.path);
    canonical.push('\n');
    for (i, (k, v)) in signed.iter().enumerate() {
        if i > 0 {
            canonical.push('&');
        }
        canonical.push_str(k);
        canonical.push('=');
        canonical.push_str(v);
    }
    if verify(secret, &canonical, signature) {
        Ok(())
    } else {
        Err(ApiAuthError::Signature)
    }
}

/// The hex MD5 of a body, as `body_md5` carries it.
pub fn body_md5(body: &[u8]) -> String {
    hex::encode(Md5::digest(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pusher_docs_example() {
        // From Pusher's authentication docs.
        let sig = sign("7ad3773142a6692b25b8", "1234.1234:private-foobar");
        assert_eq!(sig, "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4");
        assert!(verify_channel(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1234",
            "private-foobar",
            None,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        ));
        assert!(!verify_channel(
            "278d425bdf160c739803",
            "7ad3773142a6692b25b8",
            "1234.1234",
            "private-foobar",
            None,
            "x:y"
        ));
    }

    #[test]
    fn api_signature() {
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let md5 = body_md5(body);
        let ts = 1_353_088_179u64;
        let q = format!("auth_key=k&auth_timestamp={ts}&auth_version=1.0&body_md5={md5}");
        let sig = sign("s", &format!("POST\n/apps/3/events\n{q}"));
        let query = format!("{q}&auth_signature={sig}");
        let req = SignedRequest { method: "POST", path: "/apps/3/events", query: &query, body };
        assert_eq!(verify_api_request("k", "s", &req, ts, 600), Ok(()));
        assert_eq!(verify_api_request("k", "s", &req, ts + 601, 600), Err(ApiAuthError::Timestamp(600)));
        assert_eq!(verify_api_request("k", "t", &req, ts, 600), Err(ApiAuthError::Signature));
        let req2 = SignedRequest { body: b"{}", ..req };
        assert_eq!(verify_api_request("k", "s", &req2, ts, 600), Err(ApiAuthError::BodyMd5Mismatch));
        let dup = format!("{query}&auth_key=k");
        let req3 = SignedRequest { method: "POST", path: "/apps/3/events", query: &dup, body };
        assert!(matches!(verify_api_request("k", "s", &req3, ts, 600), Err(ApiAuthError::Duplicate(_))));
    }

    /// The longest query hyper accepts (64 KB) is checked for duplicates in far less than the
    /// seconds a quadratic scan took (fuzz/regressions/api_query/timeout-quadratic-duplicate-scan).
    #[test]
    fn long_queries_are_checked_quickly() {
        let mut keys: Vec<String> = (0..13_000u32).map(|i| format!("{i:x}")).collect();
        let started = std::time::Instant::now();
        assert_eq!(query_params(&keys.join("&")).map(|p| p.len()), Ok(13_000));
        keys.push("0".into());
        assert_eq!(query_params(&keys.join("&")), Err(ApiAuthError::Duplicate("0".into())));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
    }

    /// A signature over `filter_by_prefix=presence-&info=user_count` must not verify the query
    /// that carries the same bytes percent-encoded inside one value.
    #[test]
    fn encoded_separators_cannot_reuse_a_signature() {
        let ts = 1_353_088_179u64;
        let signed =
            format!("auth_key=k&auth_timestamp={ts}&auth_version=1.0&filter_by_prefix=presence-&info=user_count");
        let sig = sign("s", &format!("GET\n/apps/3/channels\n{signed}"));
        let honest = format!("{signed}&auth_signature={sig}");
        let req = SignedRequest { method: "GET", path: "/apps/3/channels", query: &honest, body: b"" };
        assert_eq!(verify_api_request("k", "s", &req, ts, 600), Ok(()));
        let forged = format!(
            "auth_key=k&auth_timestamp={ts}&auth_version=1.0&filter_by_prefix=presence-%26info%3Duser_count&auth_signature={sig}"
        );
        let req = SignedRequest { query: &forged, ..req };
        assert_eq!(
            verify_api_request("k", "s", &req, ts, 600),
            Err(ApiAuthError::Ambiguous("filter_by_prefix".into()))
        );
        // Keys too: `a%3Db=c` decodes to the key `a=b`.
        assert!(matches!(query_params("a%3Db=c"), Err(ApiAuthError::Ambiguous(_))));
        assert!(matches!(query_params("a=b%26c"), Err(ApiAuthError::Ambiguous(_))));
        // Other encoded characters are fine (`%2C`, spaces).
        assert!(query_params("channels=a%2Cb&x=y+z").is_ok());
    }
}
