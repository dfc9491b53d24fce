//! `dim ops`: run single ops from files (owned by the scan developer).
