use super::*;

#[test]
fn lru_evicts_head_and_reports_removal() {
    let mut p = Pool::new(3, 2);
    let mut ev = Vec::new();
    let a = p.alloc(&mut ev).unwrap();
    let h = [7u8; 32];
    p.blocks[a as usize].hash = Some(h);
    p.cached.entry(h).or_default().push(a);
    p.release(&[a]);
    assert_eq!(p.free_len, 3);
    assert_eq!(p.lookup(&[h], 1), 1);
    // Two fresh blocks go first; the cached one (freed last) is evicted third.
    p.alloc(&mut ev).unwrap();
    p.alloc(&mut ev).unwrap();
    assert!(ev.is_empty());
    assert_eq!(p.alloc(&mut ev), Some(a));
    assert_eq!(ev.len(), 1);
    assert_eq!(p.lookup(&[h], 1), 0);
    assert_eq!(p.alloc(&mut ev), None);
}
