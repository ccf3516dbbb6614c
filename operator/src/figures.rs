//! The plain figures one reading of a queue gives: what the JobQueue controller observes and
//! the metrics export. Data only, so that the metrics need nothing of the controllers.

use std::time::Duration;

use conveyor_crds::RecentFailure;

/// What the work and dead-letter streams say beyond the consumer figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Health {
    /// Messages in the dead-letter stream.
    pub dead_lettered: u64,
    /// Age of the oldest job in the work stream.
    pub oldest_age: Option<Duration>,
    /// The newest dead letters, newest first (a bounded read of the stream's tail).
    pub tail: Vec<RecentFailure>,
    /// Whether `tail` holds every dead letter (the stream had no more than were read).
    pub tail_complete: bool,
    /// Jobs in the delayed stream (scheduled, not yet due).
    pub delayed: u64,
    /// Jobs in the waiting stream: dependents and continuations not released yet.
    pub waiting: u64,
    /// Jobs that exhausted their attempts and are not dead-lettered yet.
    pub exhausted: conveyor::dlq::Exhausted,
    /// The work stream's counters, for rates.
    pub counters: Counters,
    /// Jobs submitted and finished per second since the previous reading, when
    /// known.
    pub rates: Option<(String, String)>,
    /// Each priority level's consumer figures, for the metrics; `None` for a level whose
    /// consumer could not be read.
    pub levels: Vec<Option<Level>>,
    /// Dead letters ever stored (the dead-letter stream's last sequence), for the metrics.
    pub dead_letters_ever: u64,
}

/// The work stream's counters at one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    /// Last sequence: every job ever stored (submitted, or fallen due).
    pub submitted: u64,
    /// Jobs stored now (not finished).
    pub stored: u64,
}

/// What one priority level's consumer says, for the per-level metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Level {
    /// Jobs on the level not yet delivered (`num_pending`).
    pub pending: u64,
    /// Jobs delivered and not yet acked or terminated (`num_ack_pending`).
    pub in_flight: u64,
    /// Deliveries ever made by the consumer, first ones and redeliveries
    /// (`delivered.consumer_seq`).
    pub deliveries: u64,
}
