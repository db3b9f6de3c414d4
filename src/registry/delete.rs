//! Manifest deletion (distribution-spec 1.1 `DELETE /v2/<name>/manifests/<reference>`), for
//! pruning.

use super::RegistryClient;
use super::error::{RegistryError, Result};
use super::transport::{Access, check};

impl RegistryClient {
    /// DELETE a manifest by tag or digest. `Ok` on any 2xx (distribution answers 202).
    pub async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<()> {
        let what = self.what(repo, reference);
        let url = self.t.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self
            .t
            .send(&what, &Access::Delete(repo.into()), || {
                self.t.http.delete(&url)
            })
            .await?;
        check(&what, resp).await.map(|_| ())
    }
}

impl RegistryError {
    /// Whether a DELETE was refused as an operation (HTTP 405, or the distribution error code
    /// UNSUPPORTED) rather than failing on the object: deletes disabled, or (for a tag) a
    /// registry that deletes only by digest. CNCF distribution 2.x answers a tag DELETE with
    /// 400 DIGEST_INVALID, which counts too.
    pub fn refuses_delete(&self) -> bool {
        match self {
            RegistryError::Status { status, detail, .. } => {
                *status == 405
                    || detail.contains("UNSUPPORTED")
                    || (*status == 400 && detail.contains("DIGEST_INVALID"))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, detail: &str) -> RegistryError {
        RegistryError::Status {
            what: "r/x:t".into(),
            status,
            detail: detail.into(),
            retry_after: None,
        }
    }

    #[test]
    fn refusals_are_told_from_failures() {
        assert!(status(405, "UNSUPPORTED The operation is unsupported.").refuses_delete());
        assert!(status(405, "(no message)").refuses_delete());
        assert!(status(400, "DIGEST_INVALID provided digest did not match").refuses_delete());
        assert!(status(400, "UNSUPPORTED").refuses_delete());
        assert!(!status(400, "NAME_INVALID").refuses_delete());
        assert!(!status(500, "boom").refuses_delete());
        assert!(!RegistryError::NotFound { what: "x".into() }.refuses_delete());
    }
}
