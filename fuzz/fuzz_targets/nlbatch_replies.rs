//! Fuzzes the reader of the kernel's replies to an element batch (`NLMSG_ERROR` acks with
//! extended-ack attributes): any datagram must give a value or an error, never a panic.

#![no_main]

use egressguard::enforce::layout::{ElemKey, Fam, Role, SetId};
use egressguard::enforce::nlbatch::{Batch, Op, Replies, Verb};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let b4 = SetId::new(Role::Blocked, Fam::V4);
    let ops: Vec<Op> = ["198.18.0.1/32", "198.18.0.0/31", "198.18.1.0/24"]
        .iter()
        .zip([Verb::Add, Verb::Delete, Verb::Add])
        .filter_map(|(k, verb)| {
            Some(Op {
                set: b4,
                key: ElemKey::Net(k.parse().ok()?),
                verb,
                timeout_secs: Some(60),
            })
        })
        .collect();
    let Ok(batch) = Batch::encode("egressguard", &ops, 0, Some(1)) else {
        return;
    };
    let mut replies = Replies::new(&batch);
    // Several datagrams: the input cut at its first byte's value.
    let cut = usize::from(data.first().copied().unwrap_or(0)).min(data.len());
    let _ = replies.absorb(&data[..cut]);
    let _ = replies.absorb(&data[cut..]);
    let _ = replies.complete();
    let _ = replies.outcome();
});
