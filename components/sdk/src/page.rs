//! Paginated lists: `?limit=` (default 100, at most 1000) and an opaque `?cursor=`, the body a
//! JSON array as before, and the next page's URL in `Link: <…>; rel="next"` (as GitHub's API
//! does). Records come from `state.list-keys-after`, so a page costs what its records do,
//! whatever the size of the bucket.

use serde::{de::DeserializeOwned, Serialize};

use crate::store::{self, StoreError};
use crate::{state, Request, Response};

/// Records per page when the client does not say.
pub const DEFAULT_LIMIT: u32 = 100;
/// Most records per page (the host's cap for `list-keys-after`).
pub const MAX_LIMIT: u32 = 1000;

/// Where a page starts: after one of the fixed records the service always lists first, or
/// after a stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    Fixed(usize),
    Key(String),
}

impl After {
    /// Opaque to clients: `f<index>` or `k<hex of the key>`.
    fn cursor(&self) -> String {
        match self {
            After::Fixed(i) => format!("f{i}"),
            After::Key(k) => format!("k{}", hex::encode(k)),
        }
    }

    fn parse(cursor: &str) -> Option<After> {
        match cursor.split_at_checked(1)? {
            ("f", i) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
                i.parse().ok().map(After::Fixed)
            }
            ("k", h) => String::from_utf8(hex::decode(h).ok()?).ok().map(After::Key),
            _ => None,
        }
    }
}

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    after: Option<After>,
}

impl Page {
    /// `?limit=` and `?cursor=` of `query`; anything malformed is a 400.
    pub fn from_query(query: Option<&str>) -> Result<Page, Response> {
        let mut page = Page {
            limit: DEFAULT_LIMIT,
            after: None,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "limit" => {
                    page.limit = value
                        .parse()
                        .ok()
                        .filter(|l| (1..=MAX_LIMIT).contains(l))
                        .ok_or_else(|| {
                            Response::bad_request(format!(
                                "limit must be an integer from 1 to {MAX_LIMIT}, got {value:?}"
                            ))
                        })?;
                }
                "cursor" => {
                    page.after = Some(After::parse(value).ok_or_else(|| {
                        Response::bad_request(
                            "cursor is not one this service gave out; start again without it",
                        )
                    })?);
                }
                _ => {}
            }
        }
        Ok(page)
    }
}

/// One page of `fixed` (listed first, always) and then the JSON records of `bucket`, in key
/// order, each shown as `view` makes it, answering `req`: 200 with a JSON array, and a `Link`
/// to the next page when there may be one.
pub fn list<T: DeserializeOwned, U: Serialize>(
    req: &Request,
    bucket: &str,
    fixed: Vec<T>,
    view: impl FnMut(T) -> Result<U, StoreError>,
) -> Result<Response, Response> {
    let page = Page::from_query(req.query.as_deref())?;
    let (items, next) = read(bucket, fixed, &page)?;
    let items = items.into_iter().map(view).collect::<Result<Vec<U>, _>>()?;
    let mut resp = Response::json(200, &items);
    if let Some(next) = next {
        let link = format!(
            "<{}?limit={}&cursor={}>; rel=\"next\"",
            req.path,
            page.limit,
            next.cursor()
        );
        resp = resp.with_header("link", link);
    }
    Ok(resp)
}

/// The records of `page`, and where the next page starts if this one is full.
fn read<T: DeserializeOwned>(
    bucket: &str,
    fixed: Vec<T>,
    page: &Page,
) -> Result<(Vec<T>, Option<After>), StoreError> {
    let limit = page.limit as usize;
    let (first_fixed, after_key) = match &page.after {
        None => (0, None),
        Some(After::Fixed(i)) => (i + 1, None),
        Some(After::Key(k)) => (fixed.len(), Some(k.clone())),
    };
    let mut items: Vec<T> = fixed.into_iter().skip(first_fixed).take(limit).collect();
    if items.len() == limit {
        return Ok((items, Some(After::Fixed(first_fixed + limit - 1))));
    }
    let room = limit - items.len();
    let keys = state::list_keys_after(bucket, "", after_key.as_deref(), room as u32)
        .map_err(|e| store::failed("list-keys-after", bucket, e))?;
    let next = (keys.len() == room)
        .then(|| keys.last().cloned().map(After::Key))
        .flatten();
    for key in keys {
        // Reads are transactional, so a listed key is still there; skipping is just defensive.
        if let Some(v) = store::get_json(bucket, &key)? {
            items.push(v);
        }
    }
    Ok((items, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_cursors_are_checked_and_round_trip() {
        let page = |q: &str| Page::from_query(Some(q));
        assert_eq!(Page::from_query(None).unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(page("limit=1000").unwrap().limit, 1000);
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "limit=",
            "cursor=zz",
            "cursor=kzz",
            "cursor=f",
        ] {
            assert_eq!(page(bad).unwrap_err().status, 400, "{bad}");
        }
        for after in [
            After::Fixed(2),
            After::Key("00000000000000000042".into()),
            After::Key("a b/ü".into()),
        ] {
            let cursor = after.cursor();
            assert!(
                cursor.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{cursor}"
            );
            assert_eq!(
                page(&format!("limit=5&cursor={cursor}")).unwrap().after,
                Some(after)
            );
        }
    }
}
