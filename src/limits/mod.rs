//! Limits on callers: GCRA rate limits per IP, user or tenant, and the login lockout.

pub mod lockout;
pub mod ratelimit;
