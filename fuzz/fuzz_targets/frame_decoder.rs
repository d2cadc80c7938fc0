//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder:
//! it must return frames or an error, never panic or loop.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shoal_proto::{decode, Message};

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize) % (data.len().max(1));
    let mut buf = BytesMut::new();
    for chunk in [&data[..split], &data[split..]] {
        buf.extend_from_slice(chunk);
        while let Ok(Some(_)) = decode::<Message>(&mut buf) {}
    }
});
