//! The commit path under the engine's lock (#25): `cargo bench --bench
//! commit`. 256 owned partitions with 10,000 uncommitted records each
//! behind an unfinished head, every record behind it finished (one range)
//! or every other one (5,000 ranges a partition, more than the metadata
//! holds). Prints, per shape, the median of 11 rounds of: the time under
//! the lock now (snapshots), the encoding now done outside it, and the
//! time the same commit took under the lock before snapshots (every range
//! walked and encoded there, re-created by the bench from that code), and
//! the time under the lock of the next commit when nothing changed.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark that cannot run stops

use std::time::Duration;

use conveyor::processor::bench::commit_path;

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() {
    const PARTITIONS: i32 = 256;
    const RECORDS: i64 = 10_000;
    const ROUNDS: usize = 11;
    for (shape, alternate) in [("one range", false), ("every other finished", true)] {
        let runs: Vec<_> = (0..ROUNDS)
            .map(|_| commit_path(PARTITIONS, RECORDS, alternate))
            .collect();
        let snapshot = median(runs.iter().map(|r| r.snapshot).collect());
        let encode = median(runs.iter().map(|r| r.encode).collect());
        let before = median(runs.iter().map(|r| r.before).collect());
        let unchanged = median(runs.iter().map(|r| r.unchanged).collect());
        let (now_chars, before_chars) = runs[0].characters;
        println!(
            "{PARTITIONS} partitions x {RECORDS} uncommitted, {shape}: under the lock {:.2} ms \
             (before: {:.2} ms), {:.3} ms for the next commit of unchanged progress (before: \
             the same as the first); encoding outside it {:.2} ms; metadata {now_chars} \
             characters (before: {before_chars})",
            snapshot.as_secs_f64() * 1e3,
            before.as_secs_f64() * 1e3,
            unchanged.as_secs_f64() * 1e3,
            encode.as_secs_f64() * 1e3,
        );
    }
}
