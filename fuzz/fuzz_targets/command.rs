//! The control-plane decoder (`guildhall_proto::command::decode`) on
//! arbitrary bytes, as [`CommandMessage`] (what an agent reads off its
//! control queue) and as [`CommandReply`] (what the coordinator reads back).
//!
//! Properties: it never panics; whatever decodes re-encodes with
//! `command::encode`, and that decodes to an equal value and encodes to the
//! same bytes again. (The input need not be canonical: postcard reads
//! over-long varints.)

#![no_main]

use guildhall_proto::command::{self, CommandMessage, CommandReply};
use libfuzzer_sys::fuzz_target;
use serde::{Serialize, de::DeserializeOwned};
use std::fmt::Debug;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8]) {
    let Ok(value) = command::decode::<T>(data) else {
        return;
    };
    let bytes = command::encode(&value).expect("a decoded value re-encodes");
    assert!(bytes.len() <= data.len(), "re-encoding grew the value");
    let again = command::decode::<T>(&bytes).expect("a re-encoded value decodes");
    assert_eq!(again, value);
    assert_eq!(command::encode(&again).expect("re-encodes again"), bytes);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<CommandMessage>(data);
    round_trip::<CommandReply>(data);
});
