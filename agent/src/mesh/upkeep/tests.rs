use super::newly_lost;

#[test]
fn lost_packets_count_what_each_connection_lost_since_the_last_reading() {
    let mut seen = (1, 0);
    assert_eq!(newly_lost(&mut seen, 1, 0), 0);
    assert_eq!(newly_lost(&mut seen, 1, 5), 5);
    assert_eq!(newly_lost(&mut seen, 1, 5), 0);
    assert_eq!(newly_lost(&mut seen, 1, 7), 2);
    // The peer reconnected: its new connection counts from zero.
    assert_eq!(newly_lost(&mut seen, 2, 3), 3);
    assert_eq!(newly_lost(&mut seen, 2, 4), 1);
}
