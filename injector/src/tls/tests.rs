#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

#[test]
fn certified_key_rejects_garbage_and_mismatched_keys() {
    assert!(certified_key(b"nope", b"nope").is_err());
    let a = crate::bootstrap::generate_all(1_700_000_000, &["a.example".to_owned()], None).unwrap();
    let b = crate::bootstrap::generate_all(1_700_000_000, &["b.example".to_owned()], None).unwrap();
    assert!(certified_key(a.cert.as_bytes(), a.key.as_bytes()).is_ok());
    assert!(certified_key(a.cert.as_bytes(), b.key.as_bytes()).is_err());
    assert!(certified_key(b"", a.key.as_bytes()).is_err());
}

#[test]
fn store_swaps_certificates() {
    let a = crate::bootstrap::generate_all(1_700_000_000, &["a.example".to_owned()], None).unwrap();
    let b = crate::bootstrap::generate_all(1_700_000_000, &["b.example".to_owned()], None).unwrap();
    let ka = certified_key(a.cert.as_bytes(), a.key.as_bytes()).unwrap();
    let kb = certified_key(b.cert.as_bytes(), b.key.as_bytes()).unwrap();
    let store = CertStore::new(ka.clone());
    assert!(Arc::ptr_eq(&store.get(), &ka));
    store.set(kb.clone());
    assert!(Arc::ptr_eq(&store.get(), &kb));
    assert!(server_config(store).is_ok());
}
