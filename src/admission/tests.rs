use super::engine_room::waiting_now;
use super::*;
use crate::engine_load::Fresh;

#[test]
fn shares_split_by_weight_and_never_reach_zero() {
    assert_eq!(share(8, 1, 2), 4);
    assert_eq!(share(9, 2, 3), 6);
    assert_eq!(share(2, 1, 5), 1);
    assert_eq!(share(0, 1, 2), 0);
}

#[test]
fn a_waiter_at_its_keys_share_takes_no_slot() {
    let (m, k) = (Counters::default(), Counters::default());
    assert!(take(&m, 4, Some(&k), Some(1)));
    assert!(!take(&m, 4, Some(&k), Some(1)));
    assert_eq!((m.in_flight(), k.in_flight()), (1, 1));
    assert!(take(&m, 4, None, None));
    assert_eq!(m.in_flight(), 2);
}

#[test]
fn retry_after_rounds_up_to_whole_seconds() {
    assert_eq!(retry_after(Duration::from_millis(1)), 1);
    assert_eq!(retry_after(Duration::from_secs(2)), 2);
    assert_eq!(retry_after(Duration::from_millis(2500)), 3);
}

#[test]
fn an_engines_queue_grows_by_what_was_sent_since_its_sample() {
    let at = Fresh::of;
    // 4 running, 3 waiting when 7 of ours were in flight; 2 more sent since: 5 waiting.
    assert_eq!(waiting_now(&at(4, 3, 7), 9, 4), Some(5));
    // 4 of ours ended since: the queue moved up.
    assert_eq!(waiting_now(&at(4, 3, 7), 3, 4), Some(0));
    // No queue in the sample, a batch of 4 seen before: 2 slots were free, 3 sent since.
    assert_eq!(waiting_now(&at(2, 0, 2), 5, 4), Some(1));
    // Never seen with a queue: free batch slots unknown, no estimate.
    assert_eq!(waiting_now(&at(2, 0, 2), 20, 0), None);
    // The peer replicas had 3 there at the sample and report 6 now: 3 more waiting.
    let peers = Fresh {
        peers_at_scrape: 3,
        peers_now: 6,
        ..at(4, 3, 7)
    };
    assert_eq!(waiting_now(&peers, 9, 4), Some(8));
}
