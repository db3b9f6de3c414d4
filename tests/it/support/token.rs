//! A small Docker token server (the protocol `auth: token` registries send clients to):
//! `GET /token?service=..&scope=..` with optional Basic auth answers a JWT the registry verifies
//! offline against the certificate in its `rootcertbundle`.
//!
//! Tokens are ES256, signed with `ring`; the signing certificate travels in the JWT header's
//! `x5c`, which distribution 2.8 checks against the bundle (no libtrust key IDs needed).
//! Every request is counted and recorded so tests can assert what a client asked for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;

/// Who the token server knows and what it gives away.
#[derive(Clone)]
pub struct TokenConfig {
    /// The one account.
    pub user: String,
    pub password: String,
    /// Anonymous callers get `pull` (and nothing else); otherwise they get no access at all,
    /// like Docker Hub answering for a private repository.
    pub anonymous_pull: bool,
    /// `expires_in` of issued tokens, seconds.
    pub lifetime_secs: u64,
    /// Every password that starts with `password` is good, as if each were the current one of
    /// a rotation (a new Secret content per sync).
    pub rotating_passwords: bool,
}

impl TokenConfig {
    /// `user`/`password`, no anonymous access, 5-minute tokens.
    pub fn new(user: &str, password: &str) -> Self {
        TokenConfig {
            user: user.into(),
            password: password.into(),
            anonymous_pull: false,
            lifetime_secs: 300,
            rotating_passwords: false,
        }
    }
}

/// One request the token server answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub service: Option<String>,
    /// The `scope` parameters, in order.
    pub scopes: Vec<String>,
    /// The authenticated user; `None` for anonymous callers (and for refused ones).
    pub account: Option<String>,
    /// The password presented, granted or not (tests tell rotations apart by it).
    pub password: Option<String>,
    pub status: u16,
}

/// The `auth: token` settings a registry needs to trust this server.
#[derive(Clone)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    /// Written to the registry's `rootcertbundle`.
    pub root_cert_pem: String,
}

struct Shared {
    config: TokenConfig,
    issuer: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// Base64 (standard, not URL-safe: RFC 7515 §4.1.6) DER of the signing certificate.
    x5c: String,
    count: AtomicUsize,
    log: Mutex<Vec<TokenRequest>>,
    expired_next: AtomicU32,
}

/// A running token server; stops when dropped.
pub struct TokenServer {
    realm: String,
    cert_pem: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    /// Starts on 127.0.0.1 with an ephemeral port, on the current tokio runtime.
    pub async fn start(config: TokenConfig) -> Self {
        let key_pair = rcgen::KeyPair::generate().expect("token signing key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "imagemirror test token signer");
        let cert = params
            .self_signed(&key_pair)
            .expect("self-signed token cert");
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &rng,
        )
        .expect("ring reads rcgen's PKCS#8 key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind token server");
        let realm = format!("http://{}/token", listener.local_addr().unwrap());
        let shared = Arc::new(Shared {
            config,
            issuer: "imagemirror-test-token-issuer".into(),
            key,
            rng,
            x5c: STANDARD.encode(cert.der()),
            count: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            expired_next: AtomicU32::new(0),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenServer {
            realm,
            cert_pem: cert.pem(),
            shared,
            task,
        }
    }

    /// Settings for a registry that names itself `service`.
    pub fn auth_for(&self, service: &str) -> TokenAuth {
        TokenAuth {
            realm: self.realm.clone(),
            service: service.into(),
            issuer: self.shared.issuer.clone(),
            root_cert_pem: self.cert_pem.clone(),
        }
    }

    /// How many token requests were answered (granted or not).
    pub fn count(&self) -> usize {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The next `n` tokens carry an `exp` long past (beyond the registry's 60 s leeway) while
    /// `expires_in` still promises the usual lifetime: to a client they look like tokens that
    /// were revoked after it cached them.
    pub fn issue_expired(&self, n: u32) {
        self.shared.expired_next.store(n, Ordering::SeqCst);
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `user:password` from a Basic Authorization header; `None` when absent or unreadable.
fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, b64) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (u, p) = decoded.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

async fn token(
    State(s): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    s.count.fetch_add(1, Ordering::SeqCst);
    let mut service = None;
    let mut scopes = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*k {
            "service" => service = Some(v.into_owned()),
            "scope" => scopes.push(v.into_owned()),
            _ => {}
        }
    }
    let presented = headers.contains_key(header::AUTHORIZATION);
    let credentials = basic(&headers);
    let password = credentials.as_ref().map(|(_, p)| p.clone());
    let account = credentials
        .filter(|(u, p)| {
            *u == s.config.user
                && (*p == s.config.password
                    || (s.config.rotating_passwords && p.starts_with(&s.config.password)))
        })
        .map(|(u, _)| u);
    let record = |account: Option<String>, status: StatusCode| {
        s.log.lock().unwrap().push(TokenRequest {
            service: service.clone(),
            scopes: scopes.clone(),
            account,
            password: password.clone(),
            status: status.as_u16(),
        });
    };
    if presented && account.is_none() {
        record(None, StatusCode::UNAUTHORIZED);
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, "Basic realm=\"token\""),
                (header::CONTENT_TYPE, "application/json"),
            ],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
        )
            .into_response();
    }
    let access: Vec<_> = scopes
        .iter()
        .filter_map(|scope| grant(scope, account.is_some(), s.config.anonymous_pull))
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let expired = s
        .expired_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let exp = if expired {
        now - 600
    } else {
        now + s.config.lifetime_secs as i64
    };
    let claims = json!({
        "iss": s.issuer,
        "sub": account.clone().unwrap_or_default(),
        // distribution 2.8 reads `aud` as one string.
        "aud": service.clone().unwrap_or_default(),
        "exp": exp,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{:032x}", rand::random::<u128>()),
        "access": access,
    });
    let jwt = sign(&s, &claims);
    record(account, StatusCode::OK);
    let body = json!({
        "token": jwt,
        "access_token": jwt,
        "expires_in": s.config.lifetime_secs,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What one `type:name:actions` scope grants: everything asked to the known user, `pull` only
/// to anonymous callers when allowed, nothing otherwise.
fn grant(scope: &str, authenticated: bool, anonymous_pull: bool) -> Option<serde_json::Value> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    let actions: Vec<&str> = actions
        .split(',')
        .filter(|a| authenticated || (anonymous_pull && *a == "pull"))
        .collect();
    Some(json!({"type": kind, "name": name, "actions": actions}))
}

fn sign(s: &Shared, claims: &serde_json::Value) -> String {
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [s.x5c]});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    // FIXED signing gives r||s, the JWS form distribution verifies (not ASN.1).
    let sig = s.key.sign(&s.rng, input.as_bytes()).expect("ECDSA signing");
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// The parameters of a `Bearer` challenge (`realm`, `service`, `scope`), for harness clients.
pub fn bearer_params(www_authenticate: &str) -> Option<HashMap<String, String>> {
    let (scheme, rest) = www_authenticate.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut out = HashMap::new();
    let mut rest = rest.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        // Values are quoted in practice and may hold commas (`pull,push`).
        let after = after.trim_start().strip_prefix('"')?;
        let end = after.find('"')?;
        out.insert(key, after[..end].to_string());
        rest = after[end + 1..].trim_start();
    }
    Some(out)
}
