//! `Route::of`: the IMDS router a container's requests go through.
//!
//! Input: `METHOD\nPATH[\nQUERY]` (UTF-8; other inputs are skipped).
//! Whatever the router maps to a route must be a plain path: no `.` or `..`
//! segment, no empty segment, no percent-escape, no whitespace; and a role
//! name taken from the path can never name another path.
#![no_main]

use hyper::Method;
use libfuzzer_sys::fuzz_target;
use metaproxy::surface::Route;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (method, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (path, query) = match rest.split_once('\n') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };

    let route = Route::of(&method, path, query);
    if query.is_some() {
        assert_eq!(route, Route::NotFound, "a query string was routed");
    }
    match route {
        Route::NotFound | Route::MethodNotAllowed => return,
        Route::Token => {
            assert_eq!(method, Method::PUT);
            assert_eq!(path, metaproxy::surface::TOKEN_PATH);
        }
        Route::Metadata(p) => assert_eq!(p, path),
        Route::Credentials { role, .. } => {
            assert!(!role.is_empty(), "empty role from {path:?}");
            assert!(!role.contains('/'), "role {role:?} names a path");
            // `a..b` is a valid IAM role name; `..` alone would climb.
            assert!(role != "." && role != "..", "role {role:?} climbs");
            assert!(path.ends_with(role));
        }
        Route::RoleListing | Route::IamInfo => {}
    }
    assert!(path.starts_with('/'), "relative path routed: {path:?}");
    assert!(!path.contains("//"), "empty segment routed: {path:?}");
    assert!(
        path.split('/').all(|seg| seg != "." && seg != ".."),
        "dot segment routed: {path:?}"
    );
    assert!(!path.contains('%'), "percent-escape routed: {path:?}");
    assert!(
        !path.chars().any(char::is_whitespace),
        "whitespace routed: {path:?}"
    );
});
