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
        ("lint", "2fbe013d0ac94efc0a41cb99f385d23f52effa45a0876aa706226686ca5889d4"),
        ("plan", "b6f36b66ed3d3858ef8871c1cb0cac52d1e2037737ad1a18b630f931d7c56ffa"),
        ("apply", "a3393332ed7f17948e342b232e38b96bf19b3bf7f5be4a35c66f33acd966e705"),
        ("docs", "8c786be68bada7ebd615b3e988637f4c441a95bc9fabde960ece23c91c8ff09d"),
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
