//! The Conveyor operator.
