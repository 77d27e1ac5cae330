//! Pins the stage key scheme: these keys change only when `KEY_VERSION` is bumped on purpose.
//! If this test fails after a change, either revert what changed the keys, or bump `KEY_VERSION`
//! (src/hash/key.rs) and update the values here in the same commit.

use crate::harness::*;

#[test]
fn keys_of_the_tiny_fixture_are_pinned() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let doc = repo.status_json();
    let keys: Vec<(String, String)> = doc["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s["key"].as_str().unwrap().to_string()))
        .collect();
    let expected = [
        ("lint", "13e624e23cf28bb3b6df08d3d4aa9f59e105269d51f0750f8e37020b8d64471e"),
        ("plan", "4d442ca2262d34aa4b981d845d429160c996c9ef6c46a340313e269204ac162b"),
        ("apply", "16424aeea083bcd7c16f06f8d2c139cdb49bf0b96660e4291a951f32832d0749"),
        ("docs", "50413a9dc27838a519b801dd624557b1801d6e60883dd5f1740ea5bd85ebd34d"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    assert_eq!(keys, expected);
}

#[test]
fn keys_do_not_depend_on_the_checkout_location_or_mtimes() {
    let a = Repo::fixture("tiny");
    let b = Repo::fixture("tiny");
    b.touch_all(100);
    let keys =
        |r: &Repo| r.status_json()["stages"].as_array().unwrap().iter().map(|s| s["key"].clone()).collect::<Vec<_>>();
    assert_eq!(keys(&a), keys(&b));
}
