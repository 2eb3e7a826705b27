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

/// Where a page starts: after this key. Opaque to clients: `k<hex of the key>`.
fn cursor(key: &str) -> String {
    format!("k{}", hex::encode(key))
}

fn parse_cursor(cursor: &str) -> Option<String> {
    let hex = cursor.strip_prefix('k')?;
    String::from_utf8(hex::decode(hex).ok()?).ok()
}

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    after: Option<String>,
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
                    page.after = Some(parse_cursor(value).ok_or_else(|| {
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

/// One page of the JSON records of `bucket` and of `builtin` (records the service has without
/// storing them, each with the key it would have), in key order, each shown as `view` makes
/// it, answering `req`: 200 with a JSON array, and a `Link` to the next page when there may be
/// one.
pub fn list<T: DeserializeOwned, U: Serialize>(
    req: &Request,
    bucket: &str,
    builtin: Vec<(String, T)>,
    view: impl FnMut(T) -> Result<U, StoreError>,
) -> Result<Response, Response> {
    let page = Page::from_query(req.query.as_deref())?;
    let (items, next) = read(bucket, builtin, &page)?;
    let items = items.into_iter().map(view).collect::<Result<Vec<U>, _>>()?;
    let mut resp = Response::json(200, &items);
    if let Some(next) = next {
        let link = format!(
            "<{}?limit={}&cursor={}>; rel=\"next\"",
            req.path,
            page.limit,
            cursor(&next)
        );
        resp = resp.with_header("link", link);
    }
    Ok(resp)
}

/// The records of `page`, and the key the next page starts after if this one is full.
fn read<T: DeserializeOwned>(
    bucket: &str,
    builtin: Vec<(String, T)>,
    page: &Page,
) -> Result<(Vec<T>, Option<String>), StoreError> {
    let limit = page.limit as usize;
    let after = page.after.as_deref();
    let stored = state::list_keys_after(bucket, "", after, page.limit)
        .map_err(|e| store::failed("list-keys-after", bucket, e))?;
    let mut items = Vec::with_capacity(limit);
    let mut last = None;
    for (key, record) in merge(builtin, stored, after, limit) {
        let record = match record {
            Some(record) => Some(record),
            // Reads are transactional, so a listed key is still there; skipping is defensive.
            None => store::get_json(bucket, &key)?,
        };
        items.extend(record);
        last = Some(key);
    }
    let next = if items.len() == limit { last } else { None };
    Ok((items, next))
}

/// The first `limit` keys after `after` of `builtin` (with their records) and `stored` (both
/// lists sorted on the way), in key order; a stored key that is also built in is the built-in
/// record.
fn merge<T>(
    mut builtin: Vec<(String, T)>,
    stored: Vec<String>,
    after: Option<&str>,
    limit: usize,
) -> Vec<(String, Option<T>)> {
    builtin.retain(|(key, _)| after.is_none_or(|a| key.as_str() > a));
    builtin.sort_by(|a, b| a.0.cmp(&b.0));
    let mut builtin = builtin.into_iter().peekable();
    let mut stored = stored.into_iter().peekable();
    let mut out = Vec::with_capacity(limit);
    while out.len() < limit {
        let (take_builtin, duplicate) = match (builtin.peek(), stored.peek()) {
            (Some((b, _)), Some(s)) => (b <= s, b == s),
            (Some(_), None) => (true, false),
            (None, Some(_)) => (false, false),
            (None, None) => break,
        };
        if duplicate {
            stored.next();
        }
        if take_builtin {
            let (key, record) = builtin.next().expect("peeked");
            out.push((key, Some(record)));
        } else {
            out.push((stored.next().expect("peeked"), None));
        }
    }
    out
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
        for after in ["00000000000000000042", "a b/ü"] {
            let cursor = cursor(after);
            assert!(
                cursor.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{cursor}"
            );
            assert_eq!(
                page(&format!("limit=5&cursor={cursor}"))
                    .unwrap()
                    .after
                    .as_deref(),
                Some(after)
            );
        }
    }

    #[test]
    fn built_in_records_take_their_place_among_the_stored_ones() {
        let builtin = || vec![("k3".to_string(), 3), ("k1".to_string(), 1)];
        let stored = vec!["k2".to_string(), "k3".to_string(), "k4".to_string()];
        let all = merge(builtin(), stored.clone(), None, 10);
        let want = [("k1", Some(1)), ("k2", None), ("k3", Some(3)), ("k4", None)];
        assert_eq!(
            all,
            want.map(|(k, v)| (k.to_string(), v)).to_vec(),
            "in key order, the built-in k3 once"
        );
        let second = merge(builtin(), vec!["k4".to_string()], Some("k2"), 2);
        assert_eq!(
            second,
            [("k3".to_string(), Some(3)), ("k4".to_string(), None)]
        );
        assert_eq!(
            merge(builtin(), stored, None, 1),
            [("k1".to_string(), Some(1))]
        );
    }
}
