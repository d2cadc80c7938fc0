//! Sans-IO cluster decisions for Shoal. No sockets, no clocks: callers pass
//! the member list they believe in, and every agent with the same list makes
//! the same decision.
//!
//! [`membership`] wraps SWIM (foca) so the shell only moves datagrams and timers;
//! [`placement`] chooses the home and replicas of each partition by
//! rendezvous (highest-random-weight) hashing.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod membership;
pub mod placement;
