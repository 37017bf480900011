//! The persistent TDX collateral cache (`collateral_cache` table), keyed by FMSPC and PCK CA.

use futures::future::BoxFuture;
use sqlx::Row;

use super::{Backend, Store, on_backend, on_writer};
use crate::attestation::collateral::{CachedCollateral, CollateralCache};
use crate::attestation::{AttestationError, RejectReason};

fn unavailable(e: impl std::fmt::Display) -> AttestationError {
    AttestationError::new(
        RejectReason::CollateralUnavailable,
        format!("collateral cache: {e}"),
    )
}

impl CollateralCache for Store {
    fn get<'a>(
        &'a self,
        fmspc: &'a str,
        ca: &'a str,
    ) -> BoxFuture<'a, crate::attestation::Result<Option<CachedCollateral>>> {
        Box::pin(async move {
            let body: Option<String> = on_backend!(self, pool => {
                match sqlx::query("SELECT body FROM collateral_cache WHERE fmspc = $1 AND ca = $2")
                    .bind(fmspc)
                    .bind(ca)
                    .fetch_optional(pool)
                    .await
                {
                    Ok(Some(row)) => row.try_get("body").map(Some),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .map_err(unavailable)?;
            body.map(|b| serde_json::from_str(&b))
                .transpose()
                .map_err(unavailable)
        })
    }

    fn put<'a>(
        &'a self,
        fmspc: &'a str,
        ca: &'a str,
        value: &'a CachedCollateral,
    ) -> BoxFuture<'a, crate::attestation::Result<()>> {
        Box::pin(async move {
            let body = serde_json::to_string(value).map_err(unavailable)?;
            let next_update = i64::try_from(value.next_update).unwrap_or(i64::MAX);
            let fetched_at = i64::try_from(value.fetched_at).unwrap_or(i64::MAX);
            on_writer!(self, pool => {
                sqlx::query(
                    "INSERT INTO collateral_cache (fmspc, ca, body, next_update, fetched_at) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (fmspc, ca) DO UPDATE SET body = excluded.body, next_update = excluded.next_update, fetched_at = excluded.fetched_at",
                )
                .bind(fmspc)
                .bind(ca)
                .bind(&body)
                .bind(next_update)
                .bind(fetched_at)
                .execute(pool)
                .await
                .map(|_| ())
            })
            .map_err(unavailable)?;
            Ok(())
        })
    }
}
