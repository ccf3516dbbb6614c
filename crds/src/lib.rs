//! Custom resource types of Conveyor.
